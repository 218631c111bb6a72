//! A real `geomx-controller` process on 127.0.0.1 with TLS on (a fresh lab PKI), and the
//! client identities to talk to it.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use geomx_proto::pki::{CertificateAuthority, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, generate_token};
use geomx_proto::tls::{TlsMaterial, client_config_ca_only};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// A CA, the controller's certificate and a user token, in a directory; agent identities
/// are issued on demand (in memory).
pub struct Pki {
    ca: CertificateAuthority,
    ca_pem: String,
    /// `ca.pem`.
    pub ca_file: PathBuf,
    /// `controller.pem`.
    pub cert_file: PathBuf,
    /// `controller-key.pem`.
    pub key_file: PathBuf,
    /// `tokens` (one token).
    pub tokens_file: PathBuf,
    /// The user token.
    pub token: String,
}

impl Pki {
    /// Makes the CA, the controller certificate (SANs 127.0.0.1 and localhost) and a token
    /// in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        let ca = CertificateAuthority::generate("geomx bench CA", DEFAULT_CA_DAYS)
            .context("making the CA")?;
        ca.write(dir, true).context("writing the CA")?;
        let controller = ca
            .issue_controller(
                &["127.0.0.1".to_owned(), "localhost".to_owned()],
                DEFAULT_LEAF_DAYS,
            )
            .context("issuing the controller certificate")?;
        let cert_file = dir.join("controller.pem");
        let key_file = dir.join("controller-key.pem");
        controller
            .write(&cert_file, &key_file, true)
            .context("writing the controller certificate")?;
        let token = generate_token();
        let tokens_file = dir.join("tokens");
        std::fs::write(&tokens_file, format!("{token}\n"))
            .with_context(|| format!("writing {}", tokens_file.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tokens_file, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod {}", tokens_file.display()))?;
        }
        Ok(Pki {
            ca_pem: ca.cert_pem().to_owned(),
            ca,
            ca_file: dir.join("ca.pem"),
            cert_file,
            key_file,
            tokens_file,
            token,
        })
    }

    /// The mTLS client identity of agent `host` (CN=host, OU=agent, IP SAN = `underlay`).
    pub fn agent_tls(&self, host: &str, underlay: IpAddr) -> anyhow::Result<ClientTlsConfig> {
        let issued = self
            .ca
            .issue_agent(host, underlay, &[], DEFAULT_LEAF_DAYS)
            .with_context(|| format!("issuing the certificate of agent {host}"))?;
        let material = TlsMaterial::from_pem(
            self.ca_pem.as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
        )
        .with_context(|| format!("loading the certificate of agent {host}"))?;
        Ok(material.client_config())
    }

    /// TLS for users: trust the CA, no client certificate.
    pub fn user_tls(&self) -> ClientTlsConfig {
        client_config_ca_only(self.ca_pem.as_bytes())
    }
}

/// A `geomx-controller` child process; stopped (TERM, then KILL) when dropped.
pub struct ControllerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    stopped: bool,
}

impl ControllerProcess {
    /// Starts `bin` on 127.0.0.1 (a free port) with TLS from `pki`, state in `state_dir`,
    /// its log in `log`, plus `extra` flags; waits until it serves.
    pub fn start(
        bin: &Path,
        pki: &Pki,
        state_dir: &Path,
        log: &Path,
        extra: &[&str],
    ) -> anyhow::Result<ControllerProcess> {
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            // /metrics on any free port: the default 0.0.0.0:7949 is the host's
            .arg("--web-listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--tls-ca")
            .arg(&pki.ca_file)
            .arg("--tls-cert")
            .arg(&pki.cert_file)
            .arg("--tls-key")
            .arg(&pki.key_file)
            .arg("--tokens-file")
            .arg(&pki.tokens_file)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("GEOMX_CONTROLLER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .context("the controller has no standard error")?;
        let mut file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if line.contains("geomx-controller serving")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("listen="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut proc = ControllerProcess {
            child,
            addr: "127.0.0.1:0".parse().context("address")?,
            log: log.to_owned(),
            stopped: false,
        };
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    proc.addr = addr;
                    return Ok(proc);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed: the process is ending
                    std::thread::sleep(Duration::from_millis(200));
                    bail!(
                        "geomx-controller exited before serving:\n{}",
                        proc.log_tail(20)
                    );
                }
            }
            if let Some(status) = proc
                .child
                .try_wait()
                .context("waiting for the controller")?
            {
                proc.stopped = true;
                bail!(
                    "geomx-controller exited ({status}) before serving:\n{}",
                    proc.log_tail(20)
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "geomx-controller did not serve within 30 s:\n{}",
                    proc.log_tail(20)
                );
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://addr`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A TLS channel to it with `tls`.
    pub async fn channel(&self, tls: ClientTlsConfig) -> anyhow::Result<Channel> {
        let ep = Endpoint::from_shared(self.url())
            .context("controller URL")?
            .tls_config(tls)
            .context("TLS config")?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10));
        ep.connect()
            .await
            .with_context(|| format!("connecting to the controller at {}", self.url()))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`; returns its exit status.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.terminate(grace)
    }

    fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.stopped = true;
        if let Some(status) = self
            .child
            .try_wait()
            .context("waiting for the controller")?
        {
            return Ok(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid")?);
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("waiting for the controller")?
            {
                return Ok(status);
            }
            if start.elapsed() > grace {
                let _ = self.child.kill();
                return self
                    .child
                    .wait()
                    .context("waiting for the killed controller");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.terminate(Duration::from_secs(3));
        }
    }
}
