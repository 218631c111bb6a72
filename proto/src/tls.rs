//! TLS and authentication helpers shared by the controller, the agent and `geomxctl`.
//!
//! * [`TlsFiles`] names the three PEM files of a party (CA, certificate, key);
//!   [`TlsFiles::load`] reads and checks them into [`TlsMaterial`], which builds tonic's
//!   [`ServerTlsConfig`] (client certificates optional at the TLS layer, verified against the
//!   CA when presented) and [`ClientTlsConfig`] (CA plus our own certificate for mTLS).
//! * [`peer_identity`] reads the verified client certificate of a tonic [`Request`]:
//!   common name (the host name of an agent), organizational unit (its role,
//!   [`ROLE_AGENT`] or [`ROLE_CONTROLLER`]) and serial (for the revocation list).
//! * [`bearer_token`] reads `authorization: Bearer <token>` on the user API (checked against
//!   [`crate::credentials::TokenSet`]); [`BearerInterceptor`] adds it on the client side.
//!
//! Client certificates are optional at the TLS layer because people using `geomxctl` have
//! none; every service then enforces what it needs (agents: a certificate whose CN is the
//! host; users: a token).

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Organizational unit (OU) of agent certificates.
pub const ROLE_AGENT: &str = "agent";
/// Organizational unit (OU) of the controller's certificate.
pub const ROLE_CONTROLLER: &str = "controller";
/// Minimum length of a bearer token.
pub const MIN_TOKEN_LEN: usize = 16;
/// Maximum length of a bearer token.
pub const MAX_TOKEN_LEN: usize = 512;

/// Errors loading TLS material or tokens.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file was meant to hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM certificate.
    #[error("{}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" block): {reason}", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// A file holds no PEM private key.
    #[error("{}: no private key found (expected a PEM \"BEGIN PRIVATE KEY\" block): {reason}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// A certificate could not be decoded as X.509.
    #[error("{}: not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate {
        /// The file (or a description of where the certificate came from).
        path: PathBuf,
        /// What the X.509 parser said.
        reason: String,
    },
    /// A token is unusable.
    #[error("{0}")]
    BadToken(String),
    /// A private key file every user of the machine may read.
    #[error("{}: the private key is readable by every user (mode {mode:04o}); refusing it: chmod 0600 {} (and make a new key and certificate if others may have read it)", path.display(), path.display())]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// The PEM files of one party: the CA that signs every geomx certificate, and the party's
/// own certificate and private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Own certificate (PEM), signed by the CA.
    pub cert: PathBuf,
    /// Own private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Reads and checks the three files. A private key that every user of the machine may
    /// read (`o+r`) is refused ([`TlsError::KeyExposed`]); one its group may read is loaded
    /// with a warning.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        check_key_mode(&self.key)?;
        let ca = read(&self.ca, "CA certificate")?;
        let cert = read(&self.cert, "certificate")?;
        let key = read(&self.key, "private key")?;
        TlsMaterial::from_pem_labeled(ca, &self.ca, cert, &self.cert, key, &self.key)
    }
}

/// The permission bits of `path` when group or others may read it (`None`: they may not,
/// or the mode cannot be read).
pub fn exposed_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o044 != 0).then_some(mode)
}

/// Refuses a private key file every user may read; warns when its group may.
pub fn check_key_mode(key: &Path) -> Result<(), TlsError> {
    let Some(mode) = exposed_mode(key) else {
        return Ok(());
    };
    if mode & 0o004 != 0 {
        return Err(TlsError::KeyExposed {
            path: key.to_owned(),
            mode,
        });
    }
    tracing::warn!(
        key = %key.display(),
        mode = format!("{mode:04o}"),
        "the private key is readable by its group: chmod 0600 {}",
        key.display()
    );
    Ok(())
}

/// Loaded and checked PEM material of one party.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    own: PeerIdentity,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.own)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Checks PEM text held in memory (e.g. fresh from [`crate::pki`]).
    pub fn from_pem(
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let mem = Path::new("<memory>");
        TlsMaterial::from_pem_labeled(
            ca_pem.into(),
            mem,
            cert_pem.into(),
            mem,
            key_pem.into(),
            mem,
        )
    }

    fn from_pem_labeled(
        ca_pem: Vec<u8>,
        ca_path: &Path,
        cert_pem: Vec<u8>,
        cert_path: &Path,
        key_pem: Vec<u8>,
        key_path: &Path,
    ) -> Result<Self, TlsError> {
        let ca_der = first_certificate(&ca_pem, ca_path)?;
        identity_from_der(&ca_der).map_err(|reason| TlsError::BadCertificate {
            path: ca_path.to_owned(),
            reason,
        })?;
        let cert_der = first_certificate(&cert_pem, cert_path)?;
        let own = identity_from_der(&cert_der).map_err(|reason| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            reason,
        })?;
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoPrivateKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            own,
        })
    }

    /// The identity written in our own certificate.
    pub fn own_identity(&self) -> &PeerIdentity {
        &self.own
    }

    /// The CA certificate, as tonic wants it.
    pub fn ca_certificate(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Our certificate and key, as tonic wants them.
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Server side: present our certificate; accept client certificates signed by the CA
    /// but do not require one (users have none; services enforce what they need).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca_certificate())
            .client_auth_optional(true)
    }

    /// Server side requiring a client certificate signed by the CA at the TLS layer (for the
    /// agent's `AgentNodeService`; still check the role with [`require_controller`]).
    pub fn server_config_client_required(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca_certificate())
            .client_auth_optional(false)
    }

    /// A rustls server configuration presenting our certificate chain, asking for no client
    /// certificate, speaking HTTP/1.1 (for plain HTTPS listeners outside tonic, e.g. the
    /// controller's `web_listen`).
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mem = Path::new("<certificate>");
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::NoCertificate {
                path: mem.to_owned(),
                reason: e.to_string(),
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| TlsError::NoPrivateKey {
                path: Path::new("<key>").to_owned(),
                reason: e.to_string(),
            })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| TlsError::BadCertificate {
                path: mem.to_owned(),
                reason: e.to_string(),
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Client side with mTLS: trust only the CA and present our certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca_certificate())
            .identity(self.identity())
    }
}

/// Client side without a certificate (users): trust only the CA in `ca_pem`.
pub fn client_config_ca_only(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

/// Reads a CA certificate file and checks that it holds a certificate.
pub fn load_ca(path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(path, "CA certificate")?;
    first_certificate(&pem, path)?;
    Ok(pem)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn first_certificate(pem: &[u8], path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem).map_err(|e| TlsError::NoCertificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Who is on the other end of a connection, from its certificate's subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Common name: the host name for agents, `geomx-controller` for the controller.
    pub common_name: String,
    /// Organizational unit: the role ([`ROLE_AGENT`], [`ROLE_CONTROLLER`]), if present.
    pub organizational_unit: Option<String>,
    /// Serial number, normalized ([`crate::credentials::normalize_serial`]: lowercase hex,
    /// no colons or leading zeros), as the revocation list compares it.
    pub serial: String,
}

impl PeerIdentity {
    /// True for a certificate made for an agent (OU = [`ROLE_AGENT`]).
    pub fn is_agent(&self) -> bool {
        self.organizational_unit.as_deref() == Some(ROLE_AGENT)
    }

    /// True for a certificate made for the controller (OU = [`ROLE_CONTROLLER`]).
    pub fn is_controller(&self) -> bool {
        self.organizational_unit.as_deref() == Some(ROLE_CONTROLLER)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.organizational_unit {
            Some(ou) => write!(f, "CN={} OU={}", self.common_name, ou),
            None => write!(f, "CN={}", self.common_name),
        }
    }
}

/// Reads common name and organizational unit from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .ok_or_else(|| "the certificate's subject has no common name (CN)".to_owned())?
        .as_str()
        .map_err(|e| format!("the common name is not a string: {e}"))?
        .to_owned();
    let organizational_unit = subject
        .iter_organizational_unit()
        .next()
        .and_then(|ou| ou.as_str().ok())
        .map(str::to_owned);
    Ok(PeerIdentity {
        common_name,
        organizational_unit,
        serial: crate::credentials::serial_of_bytes(cert.raw_serial()),
    })
}

/// The identity of the verified client certificate of `request`, if the client presented one.
///
/// The TLS layer has already checked the certificate against the CA (a certificate from
/// another CA fails the handshake), so a `Some` here is authenticated. Plaintext connections
/// and clients without a certificate give `None`; so does a certificate whose subject cannot
/// be read (it then identifies nobody).
pub fn peer_identity<T>(request: &Request<T>) -> Option<PeerIdentity> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    identity_from_der(leaf.as_ref()).ok()
}

/// Requires the caller of `request` to hold the controller's certificate
/// (OU = [`ROLE_CONTROLLER`]); for services the agent serves to the controller only.
pub fn require_controller<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    match peer_identity(request) {
        Some(id) if id.is_controller() => Ok(id),
        Some(id) => Err(Status::permission_denied(format!(
            "certificate {id} is not the controller's (OU={ROLE_CONTROLLER})"
        ))),
        None => Err(Status::unauthenticated(
            "a client certificate signed by the geomx CA is required",
        )),
    }
}

/// Checks that `token` can be used as a bearer token: printable ASCII without spaces,
/// [`MIN_TOKEN_LEN`]..=[`MAX_TOKEN_LEN`] characters.
pub fn validate_token(token: &str) -> Result<(), TlsError> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(TlsError::BadToken(format!(
            "a token must have at least {MIN_TOKEN_LEN} characters (this one has {}); `geomxctl certs token` makes one",
            token.len()
        )));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TlsError::BadToken(format!(
            "a token must have at most {MAX_TOKEN_LEN} characters"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TlsError::BadToken(
            "a token must be printable ASCII without spaces".to_owned(),
        ));
    }
    Ok(())
}

/// The bearer token of `authorization` in `metadata`: `Ok(None)` when the header is absent,
/// `UNAUTHENTICATED` when it is present but not `Bearer <token>`.
pub fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        Status::unauthenticated("authorization header must be \"Bearer <token>\"")
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Status::unauthenticated(
            "authorization header must be \"Bearer <token>\"",
        ));
    }
    Ok(Some(token.trim()))
}

/// Client-side interceptor adding `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerInterceptor {
    value: AsciiMetadataValue,
}

impl fmt::Debug for BearerInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerInterceptor(..)")
    }
}

impl BearerInterceptor {
    /// An interceptor for `token`; refuses tokens that cannot be sent in a header.
    pub fn new(token: &str) -> Result<Self, TlsError> {
        let value = format!("Bearer {}", token.trim())
            .parse::<AsciiMetadataValue>()
            .map_err(|_| {
                TlsError::BadToken("the token contains characters a header cannot carry".into())
            })?;
        Ok(BearerInterceptor { value })
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_others_can_read_is_noticed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "x").expect("write");
        for (mode, exposed, refused) in [
            (0o600, false, false),
            (0o400, false, false),
            (0o640, true, false),
            (0o644, true, true),
            (0o604, true, true),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            assert_eq!(exposed_mode(&key).is_some(), exposed, "{mode:o}");
            assert_eq!(check_key_mode(&key).is_err(), refused, "{mode:o}");
        }
        assert_eq!(exposed_mode(&dir.path().join("missing")), None);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = TlsFiles {
            ca: key.clone(),
            cert: key.clone(),
            key: key.clone(),
        }
        .load()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("readable by every user (mode 0644)") && err.contains("chmod 0600"),
            "{err}"
        );
    }

    #[test]
    fn bearer_header() {
        let mut md = MetadataMap::new();
        assert_eq!(bearer_token(&md).unwrap(), None);
        md.insert(
            "authorization",
            "Basic 0123456789abcdef0123".parse().unwrap(),
        );
        assert!(bearer_token(&md).is_err());
        md.insert(
            "authorization",
            "bearer  0123456789abcdef0123 ".parse().unwrap(),
        );
        assert_eq!(bearer_token(&md).unwrap(), Some("0123456789abcdef0123"));
        md.insert("authorization", "Bearer".parse().unwrap());
        assert!(bearer_token(&md).is_err());
    }

    #[test]
    fn token_rules() {
        assert!(validate_token("short").is_err());
        assert!(validate_token("has a space in it, long enough").is_err());
        assert!(validate_token("0123456789abcdef").is_ok());
    }

    #[test]
    fn interceptor_sets_header() {
        let mut i = BearerInterceptor::new("0123456789abcdef").unwrap();
        let req = i.call(Request::new(())).unwrap();
        assert_eq!(
            bearer_token(req.metadata()).unwrap(),
            Some("0123456789abcdef")
        );
        assert!(BearerInterceptor::new("bad\ntoken").is_err());
    }
}
