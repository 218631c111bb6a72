//! A small PKI for geomx: one CA, a certificate for the controller and one per agent.
//!
//! Every certificate carries `O=geomx`, an `OU` naming its role ([`ROLE_AGENT`] or
//! [`ROLE_CONTROLLER`]) and a `CN`: the host name for agents, [`CONTROLLER_CN`] for the
//! controller. Leaf certificates have both the serverAuth and clientAuth extended key
//! usages: agents are clients of the controller and servers of `AgentNodeService`, the
//! controller is the reverse. Keys are ECDSA P-256.
//!
//! File layout in a directory (what `geomxctl certs` writes, see [`CA_CERT_FILE`] and friends):
//! `ca.pem`, `ca-key.pem`, `controller.pem`, `controller-key.pem`, `agent-<host>.pem`,
//! `agent-<host>-key.pem`. Keys are written with mode 0600, certificates with 0644.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::tls::{ROLE_AGENT, ROLE_CONTROLLER};

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the controller certificate.
pub const CONTROLLER_CERT_FILE: &str = "controller.pem";
/// File name of the controller private key.
pub const CONTROLLER_KEY_FILE: &str = "controller-key.pem";
/// Common name of the controller certificate.
pub const CONTROLLER_CN: &str = "geomx-controller";
/// Organization of every geomx certificate.
pub const ORGANIZATION: &str = "geomx";
/// Default validity of the CA, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of controller and agent certificates, in days (90: renew them with
/// `geomxctl certs renew`, see docs/deploy.md "Credentials lifecycle").
pub const DEFAULT_LEAF_DAYS: u32 = 90;

/// File name of an agent's certificate.
pub fn agent_cert_file(host: &str) -> String {
    format!("agent-{host}.pem")
}

/// File name of an agent's private key.
pub fn agent_key_file(host: &str) -> String {
    format!("agent-{host}-key.pem")
}

/// Errors making, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("{what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// "read", "write", ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists and overwriting was not asked for.
    #[error("{} already exists (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    /// Bad input (a SAN, a host name, a validity).
    #[error("{0}")]
    Invalid(String),
}

/// A certificate and its private key, PEM encoded.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes the certificate (0644) and key (0600) to the given paths, refusing to replace
    /// existing files unless `overwrite`.
    pub fn write(&self, cert: &Path, key: &Path, overwrite: bool) -> Result<(), PkiError> {
        if !overwrite {
            for p in [cert, key] {
                if p.exists() {
                    return Err(PkiError::Exists(p.to_owned()));
                }
            }
        }
        write_file(key, self.key_pem.as_bytes(), 0o600)?;
        write_file(cert, self.cert_pem.as_bytes(), 0o644)
    }
}

/// A certificate authority able to sign geomx certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA named `common_name`, valid for `days`.
    pub fn generate(common_name: &str, days: u32) -> Result<Self, PkiError> {
        let what = || format!("making the CA {common_name:?}");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity(days)?;
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: what(),
            source,
        })?;
        let key_pem = key.serialize_pem();
        let certified = CertifiedIssuer::self_signed(params.clone(), key).map_err(|source| {
            PkiError::Generate {
                what: what(),
                source,
            }
        })?;
        let cert_pem = certified.pem();
        // Rebuild an owned issuer from the same parameters and key.
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Generate {
            what: what(),
            source,
        })?;
        Ok(CertificateAuthority {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| PkiError::Generate {
            what: "reading the CA key".into(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| PkiError::Generate {
                what: "reading the CA certificate".into(),
                source,
            })?;
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca-key.pem`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read_string(&dir.join(CA_CERT_FILE))?;
        let key = read_string(&dir.join(CA_KEY_FILE))?;
        CertificateAuthority::from_pem(&cert, &key)
    }

    /// Writes `dir/ca.pem` (0644) and `dir/ca-key.pem` (0600), creating `dir` (0700) if needed.
    pub fn write(&self, dir: &Path, overwrite: bool) -> Result<(), PkiError> {
        create_dir(dir)?;
        IssuedCert {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
        .write(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE), overwrite)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues the controller's certificate with the given subject alternative names
    /// (each an IP address or a DNS name; the addresses agents and users connect to).
    pub fn issue_controller(&self, sans: &[String], days: u32) -> Result<IssuedCert, PkiError> {
        if sans.is_empty() {
            return Err(PkiError::Invalid(
                "the controller certificate needs at least one subject alternative name (the IP or DNS name agents and users connect to)".into(),
            ));
        }
        let sans = sans
            .iter()
            .map(|s| parse_san(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.issue_leaf(CONTROLLER_CN, ROLE_CONTROLLER, sans, days)
    }

    /// Issues an agent's certificate: CN = `host`, IP SAN = `underlay_ip` (so the controller
    /// can call the agent's API by address), DNS SAN = `host`, plus `extra_sans`.
    pub fn issue_agent(
        &self,
        host: &str,
        underlay_ip: IpAddr,
        extra_sans: &[String],
        days: u32,
    ) -> Result<IssuedCert, PkiError> {
        check_host_name(host)?;
        let mut sans = vec![SanType::IpAddress(underlay_ip), parse_san(host)?];
        for s in extra_sans {
            sans.push(parse_san(s)?);
        }
        self.issue_leaf(host, ROLE_AGENT, sans, days)
    }

    /// **For tests only** (geomx itself never calls it): issues a leaf certificate like
    /// [`CertificateAuthority::issue_agent`], but with any organizational unit (`None`: no OU
    /// at all) and any validity window: e.g. one that ended in the past (an expired
    /// certificate), or an OU that is not a geomx role. `sans` are IP addresses or DNS names.
    pub fn issue_for_tests(
        &self,
        common_name: &str,
        organizational_unit: Option<&str>,
        sans: &[String],
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        let sans = sans
            .iter()
            .map(|s| parse_san(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.sign_leaf(
            common_name,
            organizational_unit,
            sans,
            OffsetDateTime::from(not_before),
            OffsetDateTime::from(not_after),
        )
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        role: &str,
        sans: Vec<SanType>,
        days: u32,
    ) -> Result<IssuedCert, PkiError> {
        let (not_before, not_after) = validity(days)?;
        self.sign_leaf(common_name, Some(role), sans, not_before, not_after)
    }

    /// Re-issues the geomx leaf certificate `cert_pem` (an agent's or the controller's,
    /// signed by this CA): the same CN, OU and SANs, a new serial, valid for `days` from now.
    /// With `key_pem` (the certificate's own key, checked to match) the key is kept and the
    /// returned [`IssuedCert`] carries it again; without, a new key is made.
    pub fn renew(
        &self,
        cert_pem: &str,
        key_pem: Option<&str>,
        days: u32,
    ) -> Result<Renewal, PkiError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        use x509_parser::extensions::GeneralName;

        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("no PEM certificate: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
        let ca_der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("the CA certificate: {e}")))?;
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der.as_ref())
            .map_err(|e| PkiError::Invalid(format!("the CA certificate: {e}")))?;
        if cert.issuer() != ca.subject() {
            return Err(PkiError::Invalid(format!(
                "the certificate was issued by {}, not by this CA ({}): renew it with the CA that made it",
                cert.issuer(),
                ca.subject()
            )));
        }
        if cert.is_ca() {
            return Err(PkiError::Invalid(
                "a CA certificate cannot be renewed this way (make a new CA with `geomxctl certs init`)".into(),
            ));
        }
        let id = crate::tls::identity_from_der(der.as_ref()).map_err(PkiError::Invalid)?;
        let role = match id.organizational_unit.as_deref() {
            Some(r @ (ROLE_AGENT | ROLE_CONTROLLER)) => r.to_owned(),
            other => {
                return Err(PkiError::Invalid(format!(
                    "{id}: not a geomx agent or controller certificate (OU is {other:?}, expected {ROLE_AGENT:?} or {ROLE_CONTROLLER:?})"
                )));
            }
        };
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                sans.push(match name {
                    GeneralName::DNSName(d) => parse_san(d)?,
                    GeneralName::IPAddress(b) if b.len() == 4 => {
                        SanType::IpAddress(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes")))
                    }
                    GeneralName::IPAddress(b) if b.len() == 16 => SanType::IpAddress(IpAddr::from(
                        <[u8; 16]>::try_from(*b).expect("16 bytes"),
                    )),
                    other => {
                        return Err(PkiError::Invalid(format!(
                            "subject alternative name {other} cannot be carried over"
                        )));
                    }
                });
            }
        }
        let key = match key_pem {
            Some(pem) => {
                let key = KeyPair::from_pem(pem).map_err(|source| PkiError::Generate {
                    what: "reading the certificate's key".into(),
                    source,
                })?;
                if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
                    return Err(PkiError::Invalid(
                        "the key does not belong to the certificate (pass the certificate's own key, or --new-key)".into(),
                    ));
                }
                Some(key)
            }
            None => None,
        };
        let old_serial = crate::credentials::serial_of_bytes(cert.raw_serial());
        let (not_before, not_after) = validity(days)?;
        let issued = self.sign_leaf_with(
            &id.common_name,
            Some(&role),
            sans,
            not_before,
            not_after,
            key,
        )?;
        Ok(Renewal {
            common_name: id.common_name,
            role,
            old_serial,
            issued,
        })
    }

    /// Signs a leaf certificate (server and client auth) for `common_name` with the
    /// organizational unit `role` (`None`: none), `sans` and the validity window.
    fn sign_leaf(
        &self,
        common_name: &str,
        role: Option<&str>,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        self.sign_leaf_with(common_name, role, sans, not_before, not_after, None)
    }

    /// [`CertificateAuthority::sign_leaf`] with the given key (`None`: a new one).
    fn sign_leaf_with(
        &self,
        common_name: &str,
        role: Option<&str>,
        sans: Vec<SanType>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        key: Option<KeyPair>,
    ) -> Result<IssuedCert, PkiError> {
        let what = || format!("issuing the certificate of {common_name:?}");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, ORGANIZATION);
        if let Some(role) = role {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, role);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = match key {
            Some(k) => k,
            None => KeyPair::generate().map_err(|source| PkiError::Generate {
                what: what(),
                source,
            })?,
        };
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: what(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A re-issued certificate ([`CertificateAuthority::renew`]).
#[derive(Clone, Debug)]
pub struct Renewal {
    /// Its common name (the host, or [`CONTROLLER_CN`]).
    pub common_name: String,
    /// Its role ([`ROLE_AGENT`] or [`ROLE_CONTROLLER`]).
    pub role: String,
    /// The serial of the certificate it replaces (normalized), to revoke it.
    pub old_serial: String,
    /// The new certificate and its key.
    pub issued: IssuedCert,
}

/// The files of a lab PKI made by [`make_lab_pki`].
#[derive(Clone, Debug)]
pub struct LabPki {
    /// Directory holding everything.
    pub dir: PathBuf,
    /// `dir/ca.pem`.
    pub ca: PathBuf,
    /// `dir/controller.pem`.
    pub controller_cert: PathBuf,
    /// `dir/controller-key.pem`.
    pub controller_key: PathBuf,
    /// `(host, cert, key)` per agent.
    pub agents: Vec<(String, PathBuf, PathBuf)>,
    /// A fresh user token, role admin, named [`LAB_TOKEN_NAME`] (its hash is written to
    /// `dir/tokens`, mode 0600).
    pub token: String,
    /// `dir/tokens`.
    pub tokens_file: PathBuf,
}

/// Name of the admin token of [`make_lab_pki`].
pub const LAB_TOKEN_NAME: &str = "lab";

/// Makes a complete PKI for a lab or tests in `dir`: a CA, the controller certificate
/// with `controller_sans`, one certificate per `(host, underlay IP)`, and a tokens file with
/// one fresh admin token named [`LAB_TOKEN_NAME`]. Existing files are replaced.
pub fn make_lab_pki(
    dir: &Path,
    controller_sans: &[String],
    agents: &[(String, IpAddr)],
) -> Result<LabPki, PkiError> {
    let ca = CertificateAuthority::generate("geomx lab CA", DEFAULT_CA_DAYS)?;
    ca.write(dir, true)?;
    let controller = ca.issue_controller(controller_sans, DEFAULT_LEAF_DAYS)?;
    let controller_cert = dir.join(CONTROLLER_CERT_FILE);
    let controller_key = dir.join(CONTROLLER_KEY_FILE);
    controller.write(&controller_cert, &controller_key, true)?;
    let mut written = Vec::new();
    for (host, ip) in agents {
        let issued = ca.issue_agent(host, *ip, &[], DEFAULT_LEAF_DAYS)?;
        let cert = dir.join(agent_cert_file(host));
        let key = dir.join(agent_key_file(host));
        issued.write(&cert, &key, true)?;
        written.push((host.clone(), cert, key));
    }
    let token = generate_token();
    let tokens_file = dir.join("tokens");
    write_file(
        &tokens_file,
        token_line(LAB_TOKEN_NAME, crate::credentials::Role::Admin, &token).as_bytes(),
        0o600,
    )?;
    Ok(LabPki {
        dir: dir.to_owned(),
        ca: dir.join(CA_CERT_FILE),
        controller_cert,
        controller_key,
        agents: written,
        token,
        tokens_file,
    })
}

/// What a certificate says, for `geomxctl certs show`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Subject, e.g. `O=geomx, OU=agent, CN=a`.
    pub subject: String,
    /// Issuer.
    pub issuer: String,
    /// Serial number (hex).
    pub serial: String,
    /// Subject alternative names (`IP:..`, `DNS:..`).
    pub sans: Vec<String>,
    /// Extended key usages (`serverAuth`, `clientAuth`, ...).
    pub extended_key_usages: Vec<String>,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// Start of validity (Unix seconds).
    pub not_before: i64,
    /// End of validity (Unix seconds).
    pub not_after: i64,
}

/// Reads the first certificate of a PEM text.
pub fn describe_certificate(pem: &[u8]) -> Result<CertificateInfo, PkiError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;

    let der = CertificateDer::from_pem_slice(pem)
        .map_err(|e| PkiError::Invalid(format!("no PEM certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            sans.push(match name {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => {
                        let b: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
                        format!("IP:{}", std::net::Ipv4Addr::from(b))
                    }
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(bytes);
                        format!("IP:{}", std::net::Ipv6Addr::from(b))
                    }
                    _ => "IP:?".to_owned(),
                },
                other => format!("{other}"),
            });
        }
    }
    let mut extended_key_usages = Vec::new();
    if let Ok(Some(ext)) = cert.extended_key_usage() {
        let eku = ext.value;
        for (on, name) in [
            (eku.server_auth, "serverAuth"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.any, "any"),
        ] {
            if on {
                extended_key_usages.push(name.to_owned());
            }
        }
    }
    Ok(CertificateInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        sans,
        extended_key_usages,
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The tokens file line of a token: `NAME ROLE sha256:HEX` and a newline.
pub fn token_line(name: &str, role: crate::credentials::Role, secret: &str) -> String {
    format!(
        "{name} {role} {}\n",
        crate::credentials::hash_secret(secret)
    )
}

/// Writes `contents` to `path` atomically (a temporary file beside it, fsync, rename), with
/// `mode` (e.g. 0o600 for a key or a tokens file).
pub fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    write_file(path, contents, mode)
}

/// A fresh random bearer token: 32 random bytes as 64 hex digits.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and without a leading zero byte: a valid DER INTEGER of 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The validity window of a certificate valid for `days` from now (an hour of slack for
/// clocks that are a little behind).
fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), PkiError> {
    if days == 0 || days > 36_500 {
        return Err(PkiError::Invalid(format!(
            "validity must be 1..=36500 days, not {days}"
        )));
    }
    let now = OffsetDateTime::now_utc();
    Ok((
        now - Duration::hours(1),
        now + Duration::days(i64::from(days)),
    ))
}

fn parse_san(s: &str) -> Result<SanType, PkiError> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !valid {
        return Err(PkiError::Invalid(format!(
            "{s:?} is neither an IP address nor a DNS name"
        )));
    }
    let name = s
        .to_owned()
        .try_into()
        .map_err(|source| PkiError::Generate {
            what: format!("DNS name {s:?}"),
            source,
        })?;
    Ok(SanType::DnsName(name))
}

fn check_host_name(host: &str) -> Result<(), PkiError> {
    let ok = !host.is_empty()
        && host.len() <= 63
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !host.starts_with('-')
        && !host.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "host name {host:?} must be 1..63 characters of [a-z0-9-], not starting or ending with '-'"
        )))
    }
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "cannot read",
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| PkiError::Io {
        action: "cannot create directory",
        path: dir.to_owned(),
        source,
    })
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename) with `mode`.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io {
        action: "cannot write",
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent)?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| PkiError::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io_err)?;
    #[cfg(unix)]
    {
        // The mode given to open() only applies to new files; make sure of it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    file.write_all(contents).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TlsFiles, TlsMaterial, identity_from_der};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn lab_pki_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_lab_pki(
            dir.path(),
            &["127.0.0.1".into(), "localhost".into()],
            &[("a".into(), "10.1.1.1".parse().unwrap())],
        )
        .unwrap();
        let ctl = TlsFiles {
            ca: pki.ca.clone(),
            cert: pki.controller_cert.clone(),
            key: pki.controller_key.clone(),
        }
        .load()
        .unwrap();
        assert!(ctl.own_identity().is_controller());
        assert_eq!(ctl.own_identity().common_name, CONTROLLER_CN);
        let (_, cert, key) = &pki.agents[0];
        let agent = TlsFiles {
            ca: pki.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }
        .load()
        .unwrap();
        assert!(agent.own_identity().is_agent());
        assert_eq!(agent.own_identity().common_name, "a");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(&pki.tokens_file)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A CA loaded back from disk signs certificates that name it as issuer.
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let issued = ca
            .issue_agent("b", "10.1.1.2".parse().unwrap(), &[], 30)
            .unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_from_der(&der).unwrap().common_name, "b");
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap();
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(parsed.issuer(), ca_parsed.subject());
        let info = describe_certificate(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(info.sans, ["IP:10.1.1.2", "DNS:b"]);
        assert_eq!(info.extended_key_usages, ["serverAuth", "clientAuth"]);
        assert!(info.subject.contains("CN=b") && info.subject.contains("OU=agent"));
        assert!(!info.is_ca);
        assert!(
            describe_certificate(ca.cert_pem().as_bytes())
                .unwrap()
                .is_ca
        );
    }

    #[test]
    fn refuses_bad_input() {
        let ca = CertificateAuthority::generate("t", 1).unwrap();
        assert!(ca.issue_controller(&[], 1).is_err());
        assert!(ca.issue_controller(&["not a name".into()], 1).is_err());
        assert!(
            ca.issue_agent("Bad_Name", "10.0.0.1".parse().unwrap(), &[], 1)
                .is_err()
        );
        assert!(CertificateAuthority::generate("t", 0).is_err());
        let dir = tempfile::tempdir().unwrap();
        ca.write(dir.path(), false).unwrap();
        assert!(matches!(
            ca.write(dir.path(), false),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn renewal_keeps_the_subject_and_sans_with_a_new_serial() {
        let ca = CertificateAuthority::generate("t", 10).unwrap();
        let old = ca
            .issue_agent("a", "10.1.1.34".parse().unwrap(), &["a.example".into()], 5)
            .unwrap();
        let before = describe_certificate(old.cert_pem.as_bytes()).unwrap();
        // keeping the key
        let r = ca.renew(&old.cert_pem, Some(&old.key_pem), 90).unwrap();
        assert_eq!((r.common_name.as_str(), r.role.as_str()), ("a", ROLE_AGENT));
        assert_eq!(r.issued.key_pem, old.key_pem);
        let after = describe_certificate(r.issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(after.subject, before.subject);
        assert_eq!(after.sans, ["IP:10.1.1.34", "DNS:a", "DNS:a.example"]);
        assert_ne!(after.serial, before.serial);
        assert_eq!(
            crate::credentials::normalize_serial(&before.serial).unwrap(),
            r.old_serial
        );
        assert!(after.not_after - after.not_before > 89 * 86_400);
        TlsMaterial::from_pem(ca.cert_pem(), r.issued.cert_pem.clone(), r.issued.key_pem)
            .expect("the renewed certificate goes with its key");
        // a new key
        let r = ca.renew(&old.cert_pem, None, 30).unwrap();
        assert_ne!(r.issued.key_pem, old.key_pem);
        TlsMaterial::from_pem(ca.cert_pem(), r.issued.cert_pem, r.issued.key_pem).unwrap();
        // the controller's
        let ctl = ca.issue_controller(&["10.1.1.1".into()], 5).unwrap();
        let r = ca.renew(&ctl.cert_pem, None, 30).unwrap();
        assert_eq!(r.role, ROLE_CONTROLLER);
        assert_eq!(r.common_name, CONTROLLER_CN);
        // refusals: another CA's certificate, a key of another certificate, a CA
        let other = CertificateAuthority::generate("other", 10).unwrap();
        let err = other
            .renew(&old.cert_pem, None, 30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not by this CA"), "{err}");
        let err = ca
            .renew(&old.cert_pem, Some(&ctl.key_pem), 30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not belong"), "{err}");
        assert!(ca.renew(ca.cert_pem(), None, 30).is_err());
    }

    #[test]
    fn the_lab_tokens_file_holds_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_lab_pki(dir.path(), &["127.0.0.1".into()], &[]).unwrap();
        let text = std::fs::read_to_string(&pki.tokens_file).unwrap();
        assert!(!text.contains(&pki.token), "{text}");
        let f = crate::credentials::parse_tokens_file(&text, "tokens").unwrap();
        let set = crate::credentials::TokenSet::new(f.tokens).unwrap();
        let t = set.find(&pki.token).unwrap();
        assert_eq!(t.name, LAB_TOKEN_NAME);
        assert_eq!(t.role, crate::credentials::Role::Admin);
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = generate_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, generate_token());
        crate::tls::validate_token(&a).unwrap();
    }
}
