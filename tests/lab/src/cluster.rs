//! A whole geomx cluster in a lab: certificates, the controller (in a flat lab in the
//! underlay namespace at 10.1.1.1:7946, in a geo-distributed lab at its data center's service
//! address), one agent per host, and the images jobs need. Everything runs as real processes from the workspace's binaries, configured the
//! way docs/deploy.md tells people to configure real hosts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod booted;

pub use booted::Packages;

use crate::cmd;
use crate::error::{LabError, Result};
use crate::images::{PSNODE_IMAGE, build_psnode_image};
use crate::lab::{HostSpec, Lab, LabHost};
use crate::netns::Netns;
use crate::process::LabProcess;
use crate::registry::write_auth_file;

/// The controller's gRPC port.
pub const CONTROLLER_PORT: u16 = 7946;
/// The lab controller's web listener port (`web_listen`: `/metrics` and the dashboard).
pub const WEB_PORT: u16 = 7949;
/// Name of the lab's admin token in the tokens file.
pub const LAB_TOKEN_NAME: &str = "lab";
/// File beside the tokens file keeping the lab's admin secret (mode 0600), for
/// [`Cluster::attach`]: the tokens file holds only its hash.
pub const LAB_TOKEN_FILE: &str = "lab-token";

/// Writes `text` to `path` with mode 0600.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| LabError::io(path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| LabError::io(path, e))
}
/// The image name the seed's job files use; the lab tags its stand-in image with it.
pub const GEOMX_IMAGE: &str = "lizonghango00o1/geomx:cpu-only";
/// The tag of the real MXNet image (scripts/build-mxnet-image.sh).
pub const MXNET_IMAGE: &str = "geomx/mxnet:1.9.1";

/// The seed documents' container subnets of hosts a, b and c.
pub fn seed_subnet(host: &str) -> Option<&'static str> {
    match host {
        "a" => Some("172.17.34.0/24"),
        "b" => Some("172.17.29.0/24"),
        "c" => Some("172.17.33.0/24"),
        _ => None,
    }
}

/// The geomx programs a cluster runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `geomx-controller`.
    pub controller: PathBuf,
    /// `geomx-agent`.
    pub agent: PathBuf,
    /// `geomxctl`.
    pub ctl: PathBuf,
    /// `geomx-psnode` (the test image's entrypoint).
    pub psnode: PathBuf,
}

impl Binaries {
    /// Finds the binaries in `$GEOMX_BIN_DIR`, else next to the running program (for a test,
    /// the parent of its `deps/` directory: cargo's target/debug).
    pub fn find() -> Result<Binaries> {
        let dir = match std::env::var_os("GEOMX_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let exe = std::env::current_exe()
                    .map_err(|e| LabError::Setup(format!("locating this program: {e}")))?;
                let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        Binaries::in_dir(&dir)
    }

    /// The binaries in `dir`; an error names every one that is missing.
    pub fn in_dir(dir: &Path) -> Result<Binaries> {
        let b = Binaries {
            controller: dir.join("geomx-controller"),
            agent: dir.join("geomx-agent"),
            ctl: dir.join("geomxctl"),
            psnode: dir.join("geomx-psnode"),
        };
        let missing: Vec<String> = [&b.controller, &b.agent, &b.ctl, &b.psnode]
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            Ok(b)
        } else {
            Err(LabError::Setup(format!(
                "missing geomx binaries: {} (run `cargo build --workspace --bins`, or set GEOMX_BIN_DIR)",
                missing.join(", ")
            )))
        }
    }
}

/// How to run the cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// TLS everywhere (mTLS for agents, a bearer token for users); false runs `--insecure`.
    pub tls: bool,
    /// How often agents report.
    pub heartbeat_interval: Duration,
    /// After how long without a report a host is lost.
    pub grace_period: Duration,
    /// The agents' periodic network re-check.
    pub network_interval: Duration,
    /// Pin hosts a, b, c to the seed documents' subnets (172.17.34/29/33.0/24).
    pub seed_subnets: bool,
    /// Build the psnode test image on every host, also tagged as [`GEOMX_IMAGE`].
    pub psnode_image: bool,
    /// A root file system tarball of the MXNet image to import as [`MXNET_IMAGE`].
    pub mxnet_tar: Option<PathBuf>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            tls: true,
            heartbeat_interval: Duration::from_millis(500),
            // ten heartbeats: short enough for the loss tests, long enough for a loaded
            // 2-core CI machine running two labs of debug binaries
            grace_period: Duration::from_secs(5),
            network_interval: Duration::from_secs(2),
            seed_subnets: false,
            psnode_image: true,
            mxnet_tar: None,
        }
    }
}

/// A running cluster in a lab.
#[derive(Debug)]
pub struct Cluster {
    lab: Lab,
    spec: ClusterSpec,
    bins: Binaries,
    token: String,
}

impl Cluster {
    /// Starts the controller and an agent on every host of `lab`, builds the images, and
    /// waits until every host is ready with its network converged.
    pub fn up(lab: Lab, spec: ClusterSpec, bins: Binaries) -> Result<Cluster> {
        let mut cluster = Cluster {
            lab,
            spec,
            bins,
            token: String::new(),
        };
        cluster.make_certificates()?;
        cluster.write_controller_config()?;
        cluster.start_controller()?;
        let hosts: Vec<LabHost> = cluster.lab.hosts().to_vec();
        for h in &hosts {
            cluster.write_agent_config(h)?;
            cluster.start_agent(&h.name)?;
        }
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        cluster.wait_hosts_ready(&names, Duration::from_secs(90))?;
        // only now: an agent's first pass restarts its host's dockerd to set the bip
        cluster.build_images(&hosts)?;
        Ok(cluster)
    }

    /// Re-opens the cluster of a lab made by `geomx-lab up` (a persistent lab).
    pub fn attach(lab: Lab, bins: Binaries) -> Result<Cluster> {
        // the tokens file holds hashes: the admin secret is kept beside it for the lab
        let token_file = lab.dir().join("tls").join(LAB_TOKEN_FILE);
        let token = std::fs::read_to_string(&token_file)
            .map_err(|e| LabError::io(&token_file, e))?
            .trim()
            .to_string();
        // (ca.pem alone is there for a lab registry also without TLS)
        let tls = lab.dir().join("tls").join("controller.pem").exists();
        Ok(Cluster {
            lab,
            spec: ClusterSpec {
                tls,
                ..ClusterSpec::default()
            },
            bins,
            token,
        })
    }

    /// The lab underneath.
    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab underneath, to change it (its WAN links: [`Lab::set_link`]).
    pub fn lab_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The user token: [`LAB_TOKEN_NAME`], role admin.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The controller's `[auth] tokens_file` (`NAME ROLE sha256:HEX` lines).
    pub fn tokens_file(&self) -> PathBuf {
        self.tls_dir().join("tokens")
    }

    /// The controller's `[auth] revocation_file` (empty at start).
    pub fn revocation_file(&self) -> PathBuf {
        self.tls_dir().join("revoked")
    }

    /// The lab's TLS directory: the CA (`ca.pem`, `ca-key.pem`), the controller's and every
    /// agent's certificate (`agent-<host>.pem`, `agent-<host>-key.pem`).
    pub fn pki_dir(&self) -> PathBuf {
        self.tls_dir()
    }

    /// Makes a user token with `geomxctl certs token --name NAME --role ROLE --tokens-file`
    /// (the controller picks it up by itself); returns its secret.
    pub fn make_token(&self, name: &str, role: &str) -> Result<String> {
        let file = self.tokens_file().display().to_string();
        let out = self.geomxctl_local(&[
            "certs",
            "token",
            "--name",
            name,
            "--role",
            role,
            "--tokens-file",
            &file,
        ])?;
        let secret = out.trim().to_string();
        if secret.is_empty() {
            return Err(LabError::Setup(format!(
                "geomxctl certs token --name {name} printed no secret"
            )));
        }
        Ok(secret)
    }

    /// Runs geomxctl on this machine, outside the lab's namespaces (`certs` needs no
    /// controller); its standard output, or an error with its stderr.
    pub fn ctl_local(&self, args: &[&str]) -> Result<String> {
        self.geomxctl_local(args)
    }

    /// Like [`Cluster::ctl`] with another user token.
    pub fn ctl_as(&self, token: &str, args: &[&str]) -> Result<Output> {
        let mut c = self
            .lab
            .controller_netns()
            .command(&self.bins.ctl.display().to_string());
        let env: Vec<(String, String)> = self
            .ctl_env(&self.controller_url())
            .into_iter()
            .map(|(k, v)| {
                if k == "GEOMX_TOKEN" {
                    (k, token.to_string())
                } else {
                    (k, v)
                }
            })
            .collect();
        c.args(args).envs(env);
        cmd::output(&mut c)
    }

    /// The controller's URL as hosts (and the underlay namespace) reach it.
    pub fn controller_url(&self) -> String {
        let scheme = if self.spec.tls { "https" } else { "http" };
        format!("{scheme}://{}:{CONTROLLER_PORT}", self.lab.controller_ip())
    }

    /// The dashboard's URL (the controller's `web_listen`) as hosts (and the underlay
    /// namespace) reach it.
    pub fn web_url(&self) -> String {
        let scheme = if self.spec.tls { "https" } else { "http" };
        format!("{scheme}://{}:{WEB_PORT}", self.lab.controller_ip())
    }

    /// The controller's web listener in the underlay namespace.
    pub fn web_addr(&self) -> SocketAddr {
        SocketAddr::from((self.lab.controller_ip(), WEB_PORT))
    }

    /// The controller's address in the underlay namespace.
    pub fn controller_addr(&self) -> SocketAddr {
        SocketAddr::from((self.lab.controller_ip(), CONTROLLER_PORT))
    }

    /// The controller's certificate (PEM), in a TLS cluster.
    pub fn controller_cert(&self) -> PathBuf {
        self.tls_dir().join("controller.pem")
    }

    /// The cluster's CA certificate (PEM), in a TLS cluster.
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    fn tls_dir(&self) -> PathBuf {
        self.lab.dir().join("tls")
    }

    fn controller_dir(&self) -> PathBuf {
        self.lab.dir().join("controller")
    }

    /// Where the controller of a cluster on `lab` keeps its state (its `state_dir`). Known
    /// before [`Cluster::up`], so that a test can put a file system of its own there first
    /// (a small tmpfs, say: the lab unmounts everything under its directory at teardown).
    pub fn controller_state_dir_of(lab: &Lab) -> PathBuf {
        lab.dir().join("controller").join("state")
    }

    /// The controller's state directory (see [`Cluster::controller_state_dir_of`]).
    pub fn controller_state_dir(&self) -> PathBuf {
        Cluster::controller_state_dir_of(&self.lab)
    }

    /// The environment for geomxctl (`GEOMX_CONTROLLER`, `GEOMX_TOKEN`, `GEOMX_CA`) with the
    /// controller at `url`.
    pub fn ctl_env(&self, url: &str) -> Vec<(String, String)> {
        let mut env = vec![("GEOMX_CONTROLLER".to_string(), url.to_string())];
        if self.spec.tls {
            env.push(("GEOMX_TOKEN".into(), self.token.clone()));
            env.push((
                "GEOMX_CA".into(),
                self.tls_dir().join("ca.pem").display().to_string(),
            ));
        }
        env
    }

    fn make_certificates(&mut self) -> Result<()> {
        let dir = self.tls_dir();
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        if !self.spec.tls {
            return Ok(());
        }
        let d = dir.display().to_string();
        // the lab's registry may have made the lab's CA already
        if !dir.join("ca.pem").exists() {
            self.geomxctl_local(&["certs", "init", "--dir", &d])?;
        }
        self.geomxctl_local(&[
            "certs",
            "controller",
            "--dir",
            &d,
            "--san",
            &self.lab.controller_ip().to_string(),
        ])?;
        for h in self.lab.hosts().to_vec() {
            self.issue_agent_certificate(&h)?;
        }
        // a fresh tokens file (hashes) and an empty revocation list, as docs/deploy.md says
        let tokens = dir.join("tokens");
        let _ = std::fs::remove_file(&tokens);
        self.token = self.make_token(LAB_TOKEN_NAME, "admin")?;
        let keep = dir.join(LAB_TOKEN_FILE);
        write_private(&keep, &format!("{}\n", self.token))?;
        let revoked = dir.join("revoked");
        std::fs::write(
            &revoked,
            "# geomxctl certs revoke --revocation-file <this file> ...\n",
        )
        .map_err(|e| LabError::io(&revoked, e))?;
        Ok(())
    }

    fn issue_agent_certificate(&self, h: &LabHost) -> Result<()> {
        if !self.spec.tls {
            return Ok(());
        }
        let d = self.tls_dir().display().to_string();
        self.geomxctl_local(&[
            "certs",
            "agent",
            "--dir",
            &d,
            "--name",
            &h.name,
            "--ip",
            &h.underlay_ip.to_string(),
            "--force",
        ])
        .map(drop)
    }

    fn geomxctl_local(&self, args: &[&str]) -> Result<String> {
        cmd::run(Command::new(&self.bins.ctl).args(args))
    }

    fn write_controller_config(&self) -> Result<()> {
        let dir = self.controller_dir();
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let tls = self.tls_dir();
        let mut text = format!(
            "# geomx-controller of lab {lab}\n\
             listen = \"{ctl_ip}:{CONTROLLER_PORT}\"\n\
             web_listen = \"{ctl_ip}:{WEB_PORT}\"\n\
             cluster_cidr = \"172.17.0.0/16\"\n\
             host_subnet_prefix = 24\n\
             state_dir = \"{state}\"\n\
             heartbeat_interval = \"{hb}ms\"\n\
             grace_period = \"{grace}ms\"\n\
             shutdown_timeout = \"3s\"\n",
            lab = self.lab.name(),
            ctl_ip = self.lab.controller_ip(),
            state = self.controller_state_dir().display(),
            hb = self.spec.heartbeat_interval.as_millis(),
            grace = self.spec.grace_period.as_millis(),
        );
        if self.spec.tls {
            text.push_str(&format!(
                "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[auth]\ntokens_file = \"{}\"\nrevocation_file = \"{}\"\n",
                tls.join("ca.pem").display(),
                tls.join("controller.pem").display(),
                tls.join("controller-key.pem").display(),
                tls.join("tokens").display(),
                tls.join("revoked").display(),
            ));
        } else {
            text.push_str("insecure = true\n");
        }
        let file = dir.join("controller.toml");
        std::fs::write(&file, text).map_err(|e| LabError::io(&file, e))
    }

    /// Starts the controller (again) and waits until it accepts connections.
    pub fn start_controller(&self) -> Result<LabProcess> {
        let config = self.controller_dir().join("controller.toml");
        let p = self.lab.spawn(
            &self.lab.controller_netns(),
            "controller",
            &[
                self.bins.controller.display().to_string(),
                "--config".into(),
                config.display().to_string(),
            ],
            &[("GEOMX_LOG".into(), "info".into())],
        )?;
        let start = Instant::now();
        loop {
            if p.pid().is_none() {
                return Err(LabError::Setup(format!(
                    "the controller exited at start:\n{}",
                    p.log_tail(20)
                )));
            }
            if self
                .lab
                .controller_netns()
                .connect_tcp(self.controller_addr(), Duration::from_millis(200))
                .is_ok()
            {
                return Ok(p);
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(LabError::Timeout {
                    what: format!("the controller to listen:\n{}", p.log_tail(20)),
                    seconds: 20.0,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The controller process.
    pub fn controller(&self) -> LabProcess {
        self.lab.process("controller")
    }

    /// The `state_dir` of the agent of `host` (its lock, the last desired state, what
    /// daemon.json held before geomx).
    pub fn agent_state_dir(&self, host: &str) -> Result<PathBuf> {
        Ok(self.lab.host(host)?.dir().join("agent-state"))
    }

    fn agent_config_path(&self, host: &str) -> PathBuf {
        self.lab.dir().join(host).join("agent.toml")
    }

    fn write_agent_config(&self, h: &LabHost) -> Result<()> {
        let d = h.dockerd()?;
        let tls = self.tls_dir();
        let mut text = format!(
            "# geomx-agent of host {name} in lab {lab}\n\
             name = \"{name}\"\n\
             controller = \"{url}\"\n\
             underlay_ip = \"{ip}\"\n\
             state_dir = \"{state}\"\n\
             daemon_json = \"{daemon_json}\"\n\
             docker_host = \"{docker}\"\n\
             docker_restart_command = \"{restart}\"\n\
             network_interval = \"{interval}ms\"\n",
            name = h.name,
            lab = self.lab.name(),
            url = self.controller_url(),
            ip = h.underlay_ip,
            state = self.agent_state_dir(&h.name)?.display(),
            daemon_json = d.daemon_json().display(),
            docker = d.url(),
            restart = d.restart_script().display(),
            interval = self.spec.network_interval.as_millis(),
        );
        if self.spec.seed_subnets
            && let Some(s) = seed_subnet(&h.name)
        {
            text.push_str(&format!("pinned_subnet = \"{s}\"\n"));
        }
        if let Some(reg) = self.lab.registry() {
            let auth = self.registry_auth_file(&h.name);
            write_auth_file(&auth, reg.addr, &reg.user, &reg.password)?;
            text.push_str(&format!("registry_auth_file = \"{}\"\n", auth.display()));
        }
        if self.spec.tls {
            text.push_str(&format!(
                "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                tls.join("ca.pem").display(),
                tls.join(format!("agent-{}.pem", h.name)).display(),
                tls.join(format!("agent-{}-key.pem", h.name)).display(),
            ));
        } else {
            text.push_str("insecure = true\n");
        }
        let file = self.agent_config_path(&h.name);
        std::fs::write(&file, text).map_err(|e| LabError::io(&file, e))
    }

    /// The agent of `host`'s `registry_auth_file` (written, mode 0600, with the lab
    /// registry's credentials when the lab has a registry).
    pub fn registry_auth_file(&self, host: &str) -> PathBuf {
        self.lab.dir().join(host).join("registry-auth.json")
    }

    /// Overwrites the `registry_auth_file` of `host` with `user` and `password` for the lab's
    /// registry (a wrong password, say); the agent reads it again for its next pull, so
    /// nothing restarts. [`Cluster::reset_registry_auth`] puts the right ones back.
    pub fn set_registry_auth(&self, host: &str, user: &str, password: &str) -> Result<()> {
        let reg = self
            .lab
            .registry()
            .ok_or_else(|| LabError::Setup(format!("lab {} runs no registry", self.lab.name())))?;
        self.lab.host(host)?;
        write_auth_file(&self.registry_auth_file(host), reg.addr, user, password)
    }

    /// Writes the lab registry's own credentials to the `registry_auth_file` of `host` again.
    pub fn reset_registry_auth(&self, host: &str) -> Result<()> {
        let reg = self
            .lab
            .registry()
            .ok_or_else(|| LabError::Setup(format!("lab {} runs no registry", self.lab.name())))?;
        self.set_registry_auth(host, &reg.user, &reg.password)
    }

    /// Starts the agent of `host` (again).
    pub fn start_agent(&self, host: &str) -> Result<LabProcess> {
        let h = self.lab.host(host)?;
        self.lab.spawn(
            h.netns(),
            &format!("agent-{host}"),
            &[
                self.bins.agent.display().to_string(),
                "run".into(),
                "--config".into(),
                self.agent_config_path(host).display().to_string(),
            ],
            &[("GEOMX_LOG".into(), "info".into())],
        )
    }

    /// Sets (or with `None` removes) `backend` in the agent.toml of `host` and restarts its
    /// agent gracefully; returns the new agent process.
    pub fn set_agent_backend(&self, host: &str, backend: Option<&str>) -> Result<LabProcess> {
        let file = self.agent_config_path(host);
        let text = std::fs::read_to_string(&file).map_err(|e| LabError::io(&file, e))?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("backend "))
            .map(str::to_string)
            .collect();
        if let Some(b) = backend {
            // before any [table]
            lines.insert(1, format!("backend = \"{b}\""));
        }
        let mut out = lines.join("\n");
        out.push('\n');
        std::fs::write(&file, out).map_err(|e| LabError::io(&file, e))?;
        self.agent(host).stop(std::time::Duration::from_secs(10))?;
        self.start_agent(host)
    }

    /// Why the agent of `host` will not become ready, if it is gone for good: its process
    /// exited, or (a booted host) its unit failed.
    fn agent_gone(&self, host: &str) -> Option<String> {
        if let Ok(m) = self.lab.host(host).and_then(|h| h.machine().cloned()) {
            return booted::unit_failure(&m, "geomx-agent");
        }
        let a = self.agent(host);
        a.pid()
            .is_none()
            .then(|| format!("the agent of {host} exited:\n{}", a.log_tail(30)))
    }

    /// The agent process of `host`.
    pub fn agent(&self, host: &str) -> LabProcess {
        self.lab.process(&format!("agent-{host}"))
    }

    /// Adds a host to the lab and starts its agent; does not wait for it, and builds no
    /// images on it (see [`Cluster::build_images`]).
    pub fn add_host(&mut self, spec: HostSpec) -> Result<()> {
        let h = self.lab.add_host(spec)?.clone();
        self.issue_agent_certificate(&h)?;
        self.write_agent_config(&h)?;
        self.start_agent(&h.name).map(drop)
    }

    /// Builds the cluster's images on `hosts` (after their agents set the bip: an agent's
    /// first pass restarts dockerd).
    pub fn build_images(&self, hosts: &[LabHost]) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|h| s.spawn(move || self.build_host_images(h)))
                .collect();
            handles
                .into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(LabError::Setup("image build panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect::<Result<()>>()?;
        // jobs are admitted on what the agents reported: wait until the controller knows
        let mut wanted: Vec<&str> = Vec::new();
        if self.spec.psnode_image {
            wanted.push(GEOMX_IMAGE);
        }
        if self.spec.mxnet_tar.is_some() {
            wanted.push(MXNET_IMAGE);
        }
        let start = Instant::now();
        loop {
            let hosts_json = self.hosts()?;
            let known = |h: &LabHost| {
                hosts_json.iter().any(|j| {
                    j["name"] == h.name.as_str()
                        && wanted.iter().all(|w| {
                            j["images"]
                                .as_array()
                                .is_some_and(|imgs| imgs.iter().any(|i| i == *w))
                        })
                })
            };
            if hosts.iter().all(known) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(LabError::Timeout {
                    what: format!("the controller to see images {wanted:?} on every host"),
                    seconds: 30.0,
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn build_host_images(&self, h: &LabHost) -> Result<()> {
        let d = h.dockerd()?;
        if self.spec.psnode_image {
            build_psnode_image(
                d,
                &self.bins.psnode,
                PSNODE_IMAGE,
                &h.dir().join("psnode-image"),
            )?;
            d.docker(&["tag", PSNODE_IMAGE, GEOMX_IMAGE])?;
        }
        if let Some(tar) = &self.spec.mxnet_tar {
            import_rootfs_tar(h, tar, MXNET_IMAGE)?;
        }
        Ok(())
    }

    /// Runs geomxctl inside the underlay namespace (where 10.1.1.1 is) with the lab's
    /// controller URL, token and CA.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        let mut c = self
            .lab
            .controller_netns()
            .command(&self.bins.ctl.display().to_string());
        c.args(args).envs(self.ctl_env(&self.controller_url()));
        cmd::output(&mut c)
    }

    /// Runs `geomxctl <args> --output json` and parses what it prints; fails on a non-zero
    /// exit.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.ctl(&all)?;
        if !out.status.success() {
            return Err(LabError::Command {
                command: format!("geomxctl {}", all.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Setup(format!(
                "geomxctl {}: not JSON ({e}): {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// The controller's view of the hosts (`geomxctl hosts --output json`).
    pub fn hosts(&self) -> Result<Vec<serde_json::Value>> {
        let v = self.ctl_json(&["hosts"])?;
        Ok(v.get("hosts")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until every host in `names` is ready with its network converged.
    pub fn wait_hosts_ready(&self, names: &[String], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let last = match self.hosts() {
                Ok(hosts) => {
                    let ready = |n: &String| {
                        hosts.iter().any(|h| {
                            h["name"] == n.as_str()
                                && h["state"] == "ready"
                                && h["network_converged"] == true
                        })
                    };
                    if names.iter().all(ready) {
                        return Ok(());
                    }
                    serde_json::to_string(&hosts).unwrap_or_default()
                }
                Err(e) => e.to_string(),
            };
            for n in names {
                if let Some(why) = self.agent_gone(n) {
                    return Err(LabError::Setup(why));
                }
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("hosts {names:?} to be ready (last: {last})"),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes `job_toml` to `<lab>/jobs/<file_name>` and submits it with
    /// `geomxctl submit --detach`; returns geomxctl's output whatever its exit status.
    pub fn submit_text(&self, file_name: &str, job_toml: &str) -> Result<Output> {
        let dir = self.lab.dir().join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let file = dir.join(file_name);
        std::fs::write(&file, job_toml).map_err(|e| LabError::io(&file, e))?;
        self.ctl(&["submit", "--detach", &file.display().to_string()])
    }

    /// Submits `job_toml` and fails unless the controller accepted it.
    pub fn submit_ok(&self, file_name: &str, job_toml: &str) -> Result<()> {
        let out = self.submit_text(file_name, job_toml)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LabError::Command {
                command: format!("geomxctl submit --detach {file_name}"),
                status: out.status.to_string(),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
    }

    /// `geomxctl status JOB --output json`.
    pub fn job(&self, name: &str) -> Result<serde_json::Value> {
        self.ctl_json(&["status", name])
    }

    /// Polls the job until `done` accepts it, failing after `timeout` with the last status.
    pub fn wait_job(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let last = match self.job(name) {
                Ok(j) if done(&j) => return Ok(j),
                Ok(j) => j.to_string(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > timeout {
                return Err(LabError::Timeout {
                    what: format!("job {name}: {what} (last status: {last})"),
                    seconds: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the job's phase is `phase` (e.g. "Running", "Succeeded"); fails at once
    /// when the job ended in another phase (Succeeded, Failed, Cancelled), with its reason.
    pub fn wait_phase(
        &self,
        name: &str,
        phase: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let mut ended = None;
        let j = self.wait_job(name, timeout, &format!("phase {phase}"), |j| {
            let now = j["phase"].as_str().unwrap_or_default();
            if now != phase && ["Succeeded", "Failed", "Cancelled"].contains(&now) {
                ended = Some(j.clone());
            }
            now == phase || ended.is_some()
        })?;
        match ended {
            None => Ok(j),
            Some(j) => Err(LabError::JobEnded {
                job: name.to_string(),
                phase: j["phase"].as_str().unwrap_or_default().to_string(),
                wanted: phase.to_string(),
                reason: j["reason"].as_str().unwrap_or_default().to_string(),
                status: j.to_string(),
            }),
        }
    }

    /// The names of the geomx containers (role containers and sandboxes) on `host`.
    pub fn geomx_containers(&self, host: &str) -> Result<Vec<String>> {
        let out = self.lab.host(host)?.dockerd()?.docker(&[
            "ps",
            "-a",
            "--filter",
            "label=io.geomx.managed=true",
            "--format",
            "{{.Names}}",
        ])?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// Tears the cluster and its lab down.
    pub fn down(self) -> Result<()> {
        self.lab.down()
    }
}

/// Imports a root file system tarball as image `tag` into a host's dockerd.
pub fn import_rootfs_tar(h: &LabHost, tar: &Path, tag: &str) -> Result<()> {
    let d = h.dockerd()?;
    d.docker(&[
        "import".as_ref(),
        "--change".as_ref(),
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".as_ref(),
        "--change".as_ref(),
        "ENV PYTHONUNBUFFERED=1".as_ref(),
        "--change".as_ref(),
        "WORKDIR /opt/geomx".as_ref(),
        "--change".as_ref(),
        "CMD [\"python3\"]".as_ref(),
        tar.as_os_str(),
        tag.as_ref(),
    ])
    .map(drop)
}

/// A TCP forwarder: accepts on `listen` (in the namespace this process runs in) and connects
/// each client to `target` inside `netns`. Lets programs in the machine's own namespace (a
/// person's geomxctl) reach the lab's controller over loopback. Runs until killed.
pub fn forward(listen: SocketAddr, netns: &Netns, target: SocketAddr) -> Result<()> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| LabError::Setup(format!("bind {listen}: {e}")))?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = match netns.connect_tcp(target, Duration::from_secs(5)) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "forward: connecting to the controller");
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        std::thread::spawn(move || pipe(client, u2));
        std::thread::spawn(move || pipe(upstream, c2));
    }
    Ok(())
}

fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// The IPv4 loopback address and port people's geomxctl uses to reach a lab's controller.
pub const FORWARD_ADDR: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, CONTROLLER_PORT);
/// The IPv4 loopback address and port people's browsers use to reach a lab's dashboard.
pub const WEB_FORWARD_ADDR: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, WEB_PORT);
