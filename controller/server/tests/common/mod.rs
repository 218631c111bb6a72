//! A controller in-process on 127.0.0.1 with real TLS (a fresh PKI in a tempdir) and real
//! tonic clients.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use geomx_controller::{ControllerConfig, JobOptions, RunningController};
use geomx_proto::pki::{LabPki, make_lab_pki};
use geomx_proto::tls::{BearerInterceptor, TlsFiles, client_config_ca_only};
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::host_service_client::HostServiceClient;
use geomx_proto::v1::job_service_client::JobServiceClient;
use geomx_proto::v1::{
    DesiredState, Host, HostReport, ListHostsRequest, RegisterRequest, RegisterResponse,
};
use tempfile::TempDir;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub const HEARTBEAT: Duration = Duration::from_millis(200);
pub const GRACE: Duration = Duration::from_millis(1000);

/// Hosts with certificates in every lab, and their underlay IPs.
pub const HOSTS: [(&str, &str); 4] = [
    ("a", "10.1.1.1"),
    ("b", "10.1.1.2"),
    ("c", "10.1.1.3"),
    ("d", "10.1.1.4"),
];

pub fn ip_of(host: &str) -> &'static str {
    HOSTS
        .iter()
        .find(|(h, _)| *h == host)
        .map(|(_, ip)| *ip)
        .expect("a lab host")
}

pub struct Lab {
    pub dir: TempDir,
    pub pki: LabPki,
    pub state_dir: PathBuf,
    pub controller: Option<RunningController>,
    pub addr: SocketAddr,
    pub insecure: bool,
    /// Options of the jobs layer used by [`Lab::boot`].
    pub job_options: JobOptions,
}

pub type UserHosts = HostServiceClient<InterceptedService<Channel, BearerInterceptor>>;
pub type UserJobs = JobServiceClient<InterceptedService<Channel, BearerInterceptor>>;

impl Lab {
    pub async fn start() -> Lab {
        Lab::start_with(false).await
    }

    pub async fn start_insecure() -> Lab {
        Lab::start_with(true).await
    }

    /// A TLS lab whose controller runs the jobs layer with `job_options`.
    pub async fn start_with_jobs(job_options: JobOptions) -> Lab {
        Lab::start_full(false, job_options).await
    }

    async fn start_with(insecure: bool) -> Lab {
        Lab::start_full(insecure, JobOptions::default()).await
    }

    async fn start_full(insecure: bool, job_options: JobOptions) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let agents: Vec<(String, IpAddr)> = HOSTS
            .iter()
            .map(|(h, ip)| ((*h).to_owned(), ip.parse().expect("ip")))
            .collect();
        let pki = make_lab_pki(
            &dir.path().join("pki"),
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            &agents,
        )
        .expect("lab pki");
        let state_dir = dir.path().join("state");
        let mut lab = Lab {
            dir,
            pki,
            state_dir,
            controller: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            insecure,
            job_options,
        };
        lab.boot().await;
        lab
    }

    pub fn config(&self) -> ControllerConfig {
        let tls = TlsFiles {
            ca: self.pki.ca.clone(),
            cert: self.pki.controller_cert.clone(),
            key: self.pki.controller_key.clone(),
        };
        let mut config = ControllerConfig::new(&self.state_dir, (!self.insecure).then_some(tls));
        config.insecure = self.insecure;
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.heartbeat_interval = HEARTBEAT;
        config.grace_period = GRACE;
        config.shutdown_timeout = Duration::from_secs(5);
        config.tokens = vec![self.pki.token.clone()];
        config.web_listen = Some("127.0.0.1:0".parse().expect("addr"));
        config
    }

    pub async fn boot(&mut self) {
        let running = geomx_controller::start_with_options(self.config(), self.job_options.clone())
            .await
            .expect("controller starts");
        self.addr = running.local_addr();
        self.controller = Some(running);
    }

    pub fn controller(&self) -> &RunningController {
        self.controller.as_ref().expect("running")
    }

    pub async fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    pub fn url(&self) -> String {
        if self.insecure {
            format!("http://{}", self.addr)
        } else {
            format!("https://{}", self.addr)
        }
    }

    pub async fn channel(
        &self,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut ep = Endpoint::from_shared(self.url())?.connect_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            ep = ep.tls_config(tls)?;
        }
        ep.connect().await
    }

    /// mTLS client config of a lab agent.
    pub fn agent_tls(&self, host: &str) -> ClientTlsConfig {
        let (_, cert, key) = self
            .pki
            .agents
            .iter()
            .find(|(h, _, _)| h == host)
            .expect("a lab agent");
        TlsFiles {
            ca: self.pki.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }
        .load()
        .expect("agent tls")
        .client_config()
    }

    /// A rustls client trusting the lab CA, offering `alpn`, without a certificate.
    pub fn rustls_client(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(&self.pki.ca).expect("ca");
        roots
            .add(CertificateDer::from_pem_slice(&ca).expect("ca pem"))
            .expect("root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// `GET /metrics` on the controller's web listener (HTTPS unless insecure), with
    /// `token` as a bearer token: the status code and the body.
    pub async fn scrape(&self, token: Option<&str>) -> (u16, String) {
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let (status, head, body) = self.web("GET", "/metrics", &auth, "").await;
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "a whole body: {head}"
        );
        (status, body)
    }

    /// One request to the controller's web listener (HTTPS unless insecure): `headers` are
    /// whole header lines (each ending in CRLF); the status, the response head and the body
    /// (read until the server closes the connection).
    pub async fn web(
        &self,
        method: &str,
        path: &str,
        headers: &str,
        body: &str,
    ) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.controller().web_addr().expect("web_listen is set");
        let length = if body.is_empty() && method == "GET" {
            String::new()
        } else {
            format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            )
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}{length}Connection: close\r\n\r\n{body}"
        );
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut response = Vec::new();
        let exchange = async {
            if self.insecure {
                let mut tcp = tcp;
                tcp.write_all(request.as_bytes()).await?;
                tcp.read_to_end(&mut response).await
            } else {
                let name =
                    rustls::pki_types::ServerName::try_from("localhost").expect("server name");
                let mut tls = tokio_rustls::TlsConnector::from(self.rustls_client(b"http/1.1"))
                    .connect(name, tcp)
                    .await?;
                tls.write_all(request.as_bytes()).await?;
                tls.read_to_end(&mut response).await
            }
        };
        tokio::time::timeout(Duration::from_secs(40), exchange)
            .await
            .expect("an answer within 40 s")
            .expect("the request");
        let text = String::from_utf8(response).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, head.to_owned(), body.to_owned())
    }

    /// `GET path` on the web listener over TLS, reading the (streamed) response until
    /// `done(text so far)` holds; the text, or a panic after `within`.
    pub async fn web_until(
        &self,
        path: &str,
        headers: &str,
        within: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.controller().web_addr().expect("web_listen is set");
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        let mut tls = tokio_rustls::TlsConnector::from(self.rustls_client(b"http/1.1"))
            .connect(name, tcp)
            .await
            .expect("TLS");
        tls.write_all(request.as_bytes()).await.expect("request");
        let mut text = String::new();
        let read = async {
            let mut buf = [0u8; 16384];
            loop {
                let n = tls.read(&mut buf).await.expect("read");
                assert!(n > 0, "the stream ended before the condition held:\n{text}");
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                if done(&text) {
                    return;
                }
            }
        };
        if tokio::time::timeout(within, read).await.is_err() {
            panic!("not within {within:?}: {path}:\n{text}");
        }
        text
    }

    /// `/metrics` with the lab's token, parsed by a Prometheus text-format parser.
    pub async fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, body) = self.scrape(Some(&self.pki.token)).await;
        assert_eq!(status, 200, "{body}");
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("Prometheus text format")
    }

    /// TLS client config without a certificate.
    pub fn ca_only_tls(&self) -> ClientTlsConfig {
        client_config_ca_only(&std::fs::read(&self.pki.ca).expect("ca"))
    }

    pub async fn agent(&self, host: &str) -> AgentServiceClient<Channel> {
        let tls = (!self.insecure).then(|| self.agent_tls(host));
        AgentServiceClient::new(self.channel(tls).await.expect("agent connects"))
    }

    pub async fn user_hosts(&self, token: &str) -> UserHosts {
        let tls = (!self.insecure).then(|| self.ca_only_tls());
        let channel = self.channel(tls).await.expect("user connects");
        HostServiceClient::with_interceptor(channel, BearerInterceptor::new(token).expect("token"))
    }

    pub async fn user_jobs(&self, token: &str) -> UserJobs {
        let tls = (!self.insecure).then(|| self.ca_only_tls());
        let channel = self.channel(tls).await.expect("user connects");
        JobServiceClient::with_interceptor(channel, BearerInterceptor::new(token).expect("token"))
    }

    pub async fn list_hosts(&self) -> Vec<Host> {
        self.user_hosts(&self.pki.token)
            .await
            .list_hosts(ListHostsRequest {})
            .await
            .expect("list hosts")
            .into_inner()
            .hosts
    }

    pub async fn host(&self, name: &str) -> Host {
        self.list_hosts()
            .await
            .into_iter()
            .find(|h| h.name == name)
            .expect("host listed")
    }
}

pub fn register_request(host: &str) -> RegisterRequest {
    RegisterRequest {
        host: host.to_owned(),
        underlay_ip: ip_of(host).to_owned(),
        pinned_subnet: String::new(),
        agent_version: "test-agent 0.1".to_owned(),
        agent_url: format!("https://{}:7947", ip_of(host)),
        ..Default::default()
    }
}

pub async fn register(client: &mut AgentServiceClient<Channel>, host: &str) -> RegisterResponse {
    client
        .register(register_request(host))
        .await
        .expect("register")
        .into_inner()
}

pub fn report(host: &str) -> HostReport {
    HostReport {
        host: host.to_owned(),
        agent_version: "test-agent 0.1".to_owned(),
        ..Default::default()
    }
}

/// Heartbeats for `host` every [`HEARTBEAT`] until the task is aborted.
pub fn heartbeat(
    mut client: AgentServiceClient<Channel>,
    host: &str,
) -> tokio::task::JoinHandle<()> {
    let host = host.to_owned();
    tokio::spawn(async move {
        loop {
            let _ = client.report(report(&host)).await;
            tokio::time::sleep(HEARTBEAT).await;
        }
    })
}

pub fn peer_names(state: &DesiredState) -> Vec<String> {
    state.peers.iter().map(|p| p.name.clone()).collect()
}

/// The next desired state on `stream`, within `within`.
pub async fn next_state(
    stream: &mut tonic::Streaming<DesiredState>,
    within: Duration,
) -> DesiredState {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a desired state in time")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads desired states until one satisfies `pred`, within `within` overall.
pub async fn wait_state(
    stream: &mut tonic::Streaming<DesiredState>,
    within: Duration,
    pred: impl Fn(&DesiredState) -> bool,
) -> DesiredState {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let state = next_state(stream, left).await;
        if pred(&state) {
            return state;
        }
    }
}

/// The value of the sample `metric` whose labels include `labels` (counters, gauges and
/// untyped samples), `None` if there is none.
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .find_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The type of metric `name` as the parser read it: "counter", "gauge", "histogram", ...
pub fn kind(scrape: &prometheus_parse::Scrape, name: &str) -> Option<&'static str> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .map(|s| match s.value {
            Value::Counter(_) => "counter",
            Value::Gauge(_) => "gauge",
            Value::Histogram(_) => "histogram",
            Value::Summary(_) => "summary",
            Value::Untyped(_) => "untyped",
        })
}
