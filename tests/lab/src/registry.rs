//! The lab's container registry: Debian's `docker-registry` (the distribution v2 server) in a
//! network namespace of its own, on the underlay of a flat lab or in one data center of a
//! geo-distributed lab, with TLS from the lab's CA (`<lab>/tls/ca.pem`, the one that signs
//! the controller's and agents' certificates) and htpasswd (bcrypt) authentication.
//!
//! Every lab dockerd trusts the CA for the registry: its `/etc/docker` is `<host>/docker/etc`
//! (bound in the daemon's own mount namespace) with `certs.d/<ip:port>/ca.crt` in it. Clients
//! log in with the [`Registry::auth_file`] (a Docker `config.json`) or the user and password.
//!
//! Files, all under `<lab>/registry/`: `config.yml`, `htpasswd`, `tls/` (certificate and key),
//! `data/` (the blobs), `client/config.json`, `registry.json` (what [`Registry`] holds).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cmd;
use crate::error::{LabError, Result};
use crate::netns::Netns;

/// The registry's port.
pub const REGISTRY_PORT: u16 = 5000;
/// The repository and tag of the lab's test image (busybox) in the registry.
pub const REGISTRY_TEST_IMAGE: &str = "geomx/test:latest";
/// The repository and tag of the MXNet image in the registry.
pub const REGISTRY_MXNET_IMAGE: &str = "geomx/mxnet:1.9.1";
/// Where scripts/build-mxnet-image.sh caches the MXNet root file system.
pub const MXNET_CACHE: &str = "/var/cache/geomx/mxnet-1.9.1.tar";
/// The registry's user.
pub const REGISTRY_USER: &str = "geomx";
/// The interface of the registry's namespace on its bridge (in the bridge's namespace).
pub(crate) const BRIDGE_PORT: &str = "reg0";

/// What registry a lab runs ([`crate::LabSpec::registry`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrySpec {
    /// Its data center in a geo-distributed lab: this, else the topology's `[registry] dc`,
    /// else the first data center.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dc: Option<String>,
    /// A root file system tarball pushed as [`REGISTRY_MXNET_IMAGE`] (see
    /// [`RegistrySpec::with_cached_mxnet`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mxnet_tar: Option<PathBuf>,
}

impl RegistrySpec {
    /// Also pushes the MXNet image when [`MXNET_CACHE`] exists.
    pub fn with_cached_mxnet(mut self) -> RegistrySpec {
        let p = PathBuf::from(MXNET_CACHE);
        if p.is_file() {
            self.mxnet_tar = Some(p);
        }
        self
    }
}

/// A running lab registry: where it is and how to log in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    /// Its address (`ip:port`, what image references start with).
    pub addr: SocketAddrV4,
    /// Its data center (geo-distributed labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dc: Option<String>,
    /// The user.
    pub user: String,
    /// The password.
    pub password: String,
    /// `<lab>/registry`.
    pub dir: PathBuf,
    /// The CA certificate that signed the registry's (the lab's CA).
    pub ca: PathBuf,
    /// Its network namespace.
    pub netns_name: String,
}

impl Registry {
    /// `ip:port`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The full reference of `repo_tag` in this registry (`10.1.1.253:5000/geomx/test:latest`).
    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// A Docker `config.json` holding the credentials (`docker --config <its dir>`).
    pub fn auth_file(&self) -> PathBuf {
        self.dir.join("client").join("config.json")
    }

    /// The registry's network namespace.
    pub fn netns(&self) -> Netns {
        Netns::named(&self.netns_name)
    }

    /// The registry's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// What `geomx-lab env` exports for it.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("GEOMX_LAB_REGISTRY".into(), self.host_port()),
            ("GEOMX_LAB_REGISTRY_USER".into(), self.user.clone()),
            ("GEOMX_LAB_REGISTRY_PASSWORD".into(), self.password.clone()),
            (
                "GEOMX_LAB_REGISTRY_CA".into(),
                self.ca.display().to_string(),
            ),
            (
                "GEOMX_LAB_REGISTRY_AUTH".into(),
                self.auth_file().display().to_string(),
            ),
        ]
    }

    /// Reads the registry of the lab in `lab_dir`, if it has one.
    pub(crate) fn load(lab_dir: &Path) -> Option<Registry> {
        let text = std::fs::read_to_string(lab_dir.join("registry").join("registry.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self) -> Result<()> {
        let file = self.dir.join("registry.json");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::Setup(format!("registry.json: {e}")))?;
        write_private(&file, text.as_bytes())
    }
}

/// The registry's address in a network whose last usable address is `service_ip`: the one
/// below it.
pub(crate) fn registry_ip(service_ip: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(service_ip) - 1)
}

/// Where the registry lives: its bridge's namespace, its address and prefix, its gateway.
pub(crate) struct Placement {
    pub bridge: Netns,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dc: Option<String>,
}

/// Builds the registry's namespace on its bridge, makes its certificate (with `geomxctl`,
/// from the lab's CA in `tls_dir`, made first if missing), user and configuration, starts it
/// and waits until it answers.
pub(crate) fn start(
    lab_dir: &Path,
    tls_dir: &Path,
    netns_name: &str,
    place: Placement,
    geomxctl: &Path,
) -> Result<Registry> {
    let dir = lab_dir.join("registry");
    for d in [dir.join("tls"), dir.join("data"), dir.join("client")] {
        std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    }
    // the namespace, on the bridge like a host
    let ns = Netns::create(netns_name)?;
    crate::lab::plug(
        &ns,
        &place.bridge,
        BRIDGE_PORT,
        place.ip,
        place.prefix,
        place.gateway,
    )?;

    // TLS from the lab's CA
    std::fs::create_dir_all(tls_dir).map_err(|e| LabError::io(tls_dir, e))?;
    let ca = tls_dir.join("ca.pem");
    let tls_s = tls_dir.display().to_string();
    if !ca.exists() {
        cmd::run(Command::new(geomxctl).args(["certs", "init", "--dir", &tls_s]))?;
    }
    let cert_dir = dir.join("tls");
    cmd::run(Command::new(geomxctl).args([
        "certs",
        "controller",
        "--dir",
        &tls_s,
        "--out",
        &cert_dir.display().to_string(),
        "--san",
        &place.ip.to_string(),
        "--no-loopback",
        "--force",
    ]))?;

    // a user with a bcrypt password
    let password: String = (0..24)
        .map(|_| {
            const CHARS: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
            CHARS[rand::random_range(0..CHARS.len())] as char
        })
        .collect();
    let line = cmd::run(Command::new("htpasswd").args(["-nbB", REGISTRY_USER, &password]))
        .map_err(|e| match e {
            LabError::Spawn { .. } => LabError::Setup(
                "htpasswd not found (apt-get install apache2-utils; scripts/install-deps.sh)"
                    .into(),
            ),
            e => e,
        })?;
    write_private(&dir.join("htpasswd"), line.trim().as_bytes())?;
    let addr = SocketAddrV4::new(place.ip, REGISTRY_PORT);
    write_auth_file(
        &dir.join("client").join("config.json"),
        addr,
        REGISTRY_USER,
        &password,
    )?;

    let config = format!(
        "# the geomx lab's registry (tests/lab/src/registry.rs)\n\
         version: 0.1\n\
         log:\n  level: info\n  formatter: text\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
         auth:\n  htpasswd:\n    realm: geomx-lab\n    path: {htpasswd}\n",
        data = dir.join("data").display(),
        cert = cert_dir.join("controller.pem").display(),
        key = cert_dir.join("controller-key.pem").display(),
        htpasswd = dir.join("htpasswd").display(),
    );
    let config_file = dir.join("config.yml");
    write_private(&config_file, config.as_bytes())?;
    let reg = Registry {
        addr,
        dc: place.dc,
        user: REGISTRY_USER.into(),
        password,
        dir: dir.clone(),
        ca,
        netns_name: netns_name.into(),
    };
    reg.save()?;

    let program = ["/usr/bin/docker-registry", "/usr/bin/registry"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            LabError::Setup(
                "docker-registry not found (apt-get install docker-registry; scripts/install-deps.sh)"
                    .into(),
            )
        })?;
    let p = crate::process::LabProcess::spawn(
        &dir,
        "registry",
        &ns,
        &[
            program.to_string(),
            "serve".into(),
            config_file.display().to_string(),
        ],
        &[],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ns
            .connect_tcp(SocketAddr::V4(addr), Duration::from_millis(500))
            .is_ok()
        {
            return Ok(reg);
        }
        if p.pid().is_none() || Instant::now() > deadline {
            return Err(LabError::Setup(format!(
                "the registry did not start on {addr}:\n{}",
                p.log_tail(20)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes `dockerd_dir`'s daemon trust the lab CA for `reg`: `etc/certs.d/<ip:port>/ca.crt`.
pub(crate) fn trust(dockerd_etc: &Path, reg: &Registry) -> Result<()> {
    let d = dockerd_etc.join("certs.d").join(reg.host_port());
    std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    std::fs::copy(&reg.ca, d.join("ca.crt")).map_err(|e| LabError::io(&reg.ca, e))?;
    Ok(())
}

/// Writes a Docker `config.json` (mode 0600) holding `user` and `password` for the registry
/// at `addr` (what `docker --config` and the agent's `registry_auth_file` read).
pub fn write_auth_file(path: &Path, addr: SocketAddrV4, user: &str, password: &str) -> Result<()> {
    let auth = base64(format!("{user}:{password}").as_bytes());
    write_private(
        path,
        format!("{{\n  \"auths\": {{\n    \"{addr}\": {{ \"auth\": \"{auth}\" }}\n  }}\n}}\n")
            .as_bytes(),
    )
}

pub(crate) fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LabError::io(path, e))?;
    f.write_all(contents).map_err(|e| LabError::io(path, e))
}

/// Standard base64 with padding (Docker's `auth` field).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"geomx:pass"), "Z2VvbXg6cGFzcw==");
    }

    #[test]
    fn the_registry_sits_just_below_the_service_address() {
        assert_eq!(
            registry_ip(Ipv4Addr::new(10, 2, 1, 254)),
            Ipv4Addr::new(10, 2, 1, 253)
        );
    }
}
