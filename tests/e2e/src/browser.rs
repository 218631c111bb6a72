//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the
//! dashboard's tests: it runs inside a lab namespace (so it reaches the lab controller's
//! `web_listen` and nothing else), trusts exactly the lab controller's key
//! (`--ignore-certificate-errors-spki-list` with the SHA-256 of its public key), and
//! collects every console error, uncaught exception and failed load of the page.
//!
//! The protocol client is small and synchronous: JSON commands over one WebSocket
//! (`tungstenite`), a page session attached in flat mode, events buffered while a command
//! waits for its answer.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use geomx_lab::{Lab, LabProcess, Netns};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// The DevTools port inside the browser's namespace.
const DEVTOOLS_PORT: u16 = 9222;

/// A running headless Chromium with one page.
pub struct Browser {
    process: LabProcess,
    ws: WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    /// Console errors, exceptions and failed requests seen so far.
    errors: Vec<String>,
    /// Every console message (for failure reports).
    console: Vec<String>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("session", &self.session)
            .field("errors", &self.errors)
            .finish()
    }
}

/// The SHA-256 of the public key of the certificate in `pem` (base64), as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
pub fn spki_pin(pem: &Path) -> anyhow::Result<String> {
    let script = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A",
        pem.display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .context("running openssl")?;
    let pin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || pin.len() != 44 {
        bail!(
            "the key pin of {}: {}",
            pem.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(pin)
}

impl Browser {
    /// Starts Chromium in `netns` of `lab` (a lab process: the lab's teardown stops it
    /// too), trusting the certificate whose key pin is `pin`, and opens a blank page.
    pub fn launch(lab: &Lab, netns: &Netns, pin: Option<&str>) -> anyhow::Result<Browser> {
        let profile = lab.dir().join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let mut argv = vec![
            "chromium".to_string(),
            "--headless=new".into(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-extensions".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--hide-scrollbars".into(),
            "--window-size=1400,1800".into(),
            format!("--user-data-dir={}", profile.display()),
            format!("--remote-debugging-port={DEVTOOLS_PORT}"),
            "--remote-debugging-address=127.0.0.1".into(),
        ];
        if let Some(pin) = pin {
            argv.push(format!("--ignore-certificate-errors-spki-list={pin}"));
        }
        argv.push("about:blank".into());
        let process = lab.spawn(netns, "chromium", &argv, &[])?;
        let devtools = SocketAddr::from(([127, 0, 0, 1], DEVTOOLS_PORT));
        let start = Instant::now();
        let browser_url = loop {
            if process.pid().is_none() {
                bail!("chromium exited at start:\n{}", process.log_tail(30));
            }
            if let Ok(url) = version_url(netns, devtools) {
                break url;
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "chromium's DevTools did not answer within 30 s:\n{}",
                    process.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = netns.connect_tcp(devtools, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let (ws, _) = tungstenite::client(browser_url.as_str(), stream)
            .map_err(|e| anyhow::anyhow!("DevTools WebSocket {browser_url}: {e}"))?;
        let mut b = Browser {
            process,
            ws,
            session: String::new(),
            next_id: 0,
            errors: Vec::new(),
            console: Vec::new(),
        };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }))?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        )?;
        b.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
        ] {
            b.call(domain, json!({}))?;
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 1800, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(b)
    }

    /// A browser in the controller's namespace of TLS cluster `c`, trusting its controller's
    /// key, logged in to its dashboard with the lab token.
    pub fn logged_in(c: &geomx_lab::Cluster) -> anyhow::Result<Browser> {
        let mut b = Browser::launch(
            c.lab(),
            &c.lab().controller_netns(),
            Some(&spki_pin(&c.controller_cert())?),
        )?;
        b.log_in(&c.web_url(), c.token())?;
        Ok(b)
    }

    /// Sends a command (to the page session once attached) and waits for its answer.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .with_context(|| format!("sending {method}"))?;
        loop {
            let m = self
                .ws
                .read()
                .with_context(|| format!("waiting for the answer to {method}"))?;
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            self.note_event(&v);
        }
    }

    fn note_event(&mut self, v: &Value) {
        let params = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") => {
                let text: Vec<String> = params["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| a["description"].to_string())
                    })
                    .collect();
                let line = format!(
                    "console.{}: {}",
                    params["type"].as_str().unwrap_or("?"),
                    text.join(" ")
                );
                if params["type"] == "error" || params["type"] == "assert" {
                    self.errors.push(line.clone());
                }
                self.console.push(line);
            }
            Some("Runtime.exceptionThrown") => {
                let d = &params["exceptionDetails"];
                self.errors.push(format!(
                    "uncaught: {} {}",
                    d["text"].as_str().unwrap_or_default(),
                    d["exception"]["description"].as_str().unwrap_or_default()
                ));
            }
            Some("Log.entryAdded") => {
                let e = &params["entry"];
                let line = format!(
                    "{} {}: {} {}",
                    e["source"].as_str().unwrap_or_default(),
                    e["level"].as_str().unwrap_or_default(),
                    e["text"].as_str().unwrap_or_default(),
                    e["url"].as_str().unwrap_or_default()
                );
                if e["level"] == "error" {
                    self.errors.push(line.clone());
                }
                self.console.push(line);
            }
            Some("Network.loadingFailed") if params["canceled"] != json!(true) => {
                self.errors.push(format!(
                    "load failed: {} ({})",
                    params["errorText"].as_str().unwrap_or_default(),
                    params["type"].as_str().unwrap_or_default()
                ));
            }
            _ => {}
        }
    }

    /// Loads `url` and waits until its document is complete.
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url }))?;
        if let Some(e) = r["errorText"].as_str() {
            bail!("loading {url}: {e}");
        }
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(30),
        )
        .with_context(|| format!("loading {url}"))
        .map(drop)
    }

    /// The value of the JavaScript expression `expr` in the page (promises awaited).
    pub fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` until it is truthy (polling every 200 ms) and returns its value;
    /// fails after `timeout` naming the expression.
    pub fn wait_for(&mut self, expr: &str, timeout: Duration) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let v = self.eval(expr)?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!(
                    "not true after {:?}: {expr}\nerrors:\n{}\nconsole:\n{}",
                    timeout,
                    self.errors.join("\n"),
                    self.console.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG of the whole page to `path`.
    pub fn screenshot(&mut self, path: &Path) -> anyhow::Result<PathBuf> {
        let r = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
        )?;
        let data = r["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("screenshot: {}", path.display());
        Ok(path.to_owned())
    }

    /// Logs in to the dashboard at `web` through its login form with `token` and waits for
    /// the cluster page (checking first that without a session it shows the login page).
    pub fn log_in(&mut self, web: &str, token: &str) -> anyhow::Result<()> {
        self.navigate(&format!("{web}/"))?;
        self.wait_for(
            "location.pathname === '/login' && document.getElementById('token') !== null",
            Duration::from_secs(10),
        )
        .context("without a session the dashboard shows its login page")?;
        self.eval(&format!(
            "document.getElementById('token').value = {}; document.getElementById('login').requestSubmit(); true",
            json!(token)
        ))?;
        self.wait_for(
            "location.pathname === '/' && document.getElementById('cluster') !== null",
            Duration::from_secs(20),
        )
        .context("after login the dashboard shows the cluster")?;
        Ok(())
    }

    /// The console errors, uncaught exceptions and failed loads so far.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Reads the events that arrived since the last command (console messages of
    /// scripts that ran meanwhile) by a round trip.
    pub fn drain(&mut self) -> anyhow::Result<()> {
        self.eval("1").map(drop)
    }

    /// Stops the browser.
    pub fn close(self) -> anyhow::Result<()> {
        let Browser {
            process, mut ws, ..
        } = self;
        let _ = ws.close(None);
        process.stop(Duration::from_secs(5))?;
        Ok(())
    }
}

/// The browser's WebSocket URL from `/json/version`.
fn version_url(netns: &Netns, devtools: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = netns.connect_tcp(devtools, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /json/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    // the DevTools server keeps the connection open: read the headers, then Content-Length
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let body = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("DevTools closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .context("no Content-Length")?;
        if body.len() >= length {
            break body[..length].to_owned();
        }
    };
    let body = body.as_str();
    let v: Value = serde_json::from_str(body)?;
    v["webSocketDebuggerUrl"]
        .as_str()
        .map(str::to_owned)
        .context("no webSocketDebuggerUrl")
}

/// Where the tests put screenshots: `$GEOMX_TEST_ARTIFACTS` or `target/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("GEOMX_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts")
        })
}

/// `curl` inside the lab controller's namespace of `c`, trusting the lab CA: the HTTP status
/// and the body.
pub fn curl(c: &geomx_lab::Cluster, args: &[&str]) -> anyhow::Result<(u16, String)> {
    curl_in(&c.lab().controller_netns(), Some(&c.ca_cert()), args)
}

/// `curl` inside `netns` (trusting `ca` for HTTPS): the HTTP status and the body.
pub fn curl_in(netns: &Netns, ca: Option<&Path>, args: &[&str]) -> anyhow::Result<(u16, String)> {
    let ca = ca.map(|p| p.display().to_string());
    let mut argv = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    if let Some(ca) = &ca {
        argv.extend_from_slice(&["--cacert", ca]);
    }
    argv.extend_from_slice(args);
    let out = netns.run(&argv)?;
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// The sum of the samples named `name` (every label set) in Prometheus text `body`, parsed
/// by the `prometheus-parse` crate; `None` when there is none or the text does not parse.
pub fn scrape(body: &str, name: &str) -> Option<f64> {
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).ok()?;
    let values: Vec<f64> = parsed
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
