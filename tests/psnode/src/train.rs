//! The "training" of workers: GeoMX's progress lines, switches to crash or hang, and the
//! optional HTTP heartbeat.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::Config;

/// Exit code of a simulated crash.
pub const CRASH_EXIT_CODE: i32 = 3;

/// Test accuracy after iteration `i` of `n`: rises from about 0.1 towards 0.95.
pub fn accuracy(i: u64, n: u64) -> f64 {
    let n = n.max(1) as f64;
    0.1 + 0.85 * (1.0 - (-3.0 * i as f64 / n).exp())
}

/// One GeoMX progress line.
pub fn progress_line(time_s: f64, epoch: u64, iteration: u64, acc: f64) -> String {
    format!("[Time {time_s:.3}][Epoch {epoch}][Iteration {iteration}] Test Acc {acc:.4}")
}

/// Trains: prints the start line and one progress line per interval; returns the exit code.
pub fn train(cfg: &Config, rank: usize) -> i32 {
    if let Some(slice) = cfg.data_slice {
        println!("psnode: data slice {slice}");
    }
    println!(
        "Start training on {} workers, my rank is {rank}.",
        cfg.all_workers
    );
    let start = Instant::now();
    let mut warned = false;
    for i in 0..=cfg.iterations {
        if cfg.crash_after == Some(i) {
            eprintln!("psnode: simulated crash after {i} iterations (PSNODE_CRASH_AFTER={i})");
            eprintln!("RuntimeError: simulated failure in iteration {}", i + 1);
            return CRASH_EXIT_CODE;
        }
        if cfg.hang_after == Some(i) {
            eprintln!("psnode: hanging after {i} iterations (PSNODE_HANG_AFTER={i})");
            loop {
                std::thread::park();
            }
        }
        if i == cfg.iterations {
            break;
        }
        std::thread::sleep(cfg.interval);
        let it = i + 1;
        let epoch = i / cfg.iters_per_epoch;
        let acc = accuracy(it, cfg.iterations);
        println!(
            "{}",
            progress_line(start.elapsed().as_secs_f64(), epoch, it, acc)
        );
        if cfg.http_heartbeat
            && let Some(url) = &cfg.agent_url
            && let Err(e) = post_heartbeat(url, cfg, it, epoch, acc)
            && !warned
        {
            eprintln!("psnode: heartbeat to {url} failed: {e}");
            warned = true;
        }
    }
    println!(
        "psnode: training done after {} iterations, exiting with {}",
        cfg.iterations, cfg.exit_code
    );
    cfg.exit_code
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The heartbeat body for iteration `step`.
pub fn heartbeat_body(cfg: &Config, step: u64, epoch: u64, acc: f64) -> String {
    let who = match &cfg.job {
        Some(job) => format!(
            "\"job\": {}, \"node\": {}, ",
            json_str(job),
            json_str(&cfg.name)
        ),
        None => String::new(),
    };
    format!(
        "{{{who}\"step\": {step}, \"epoch\": {epoch}, \"metrics\": {{\"accuracy\": {acc:.4}, \"loss\": {:.4}}}}}",
        1.0 - acc
    )
}

/// The HTTP/1.1 request of one heartbeat: `POST <prefix>/v1/heartbeat` with `body`, and
/// the container's token (`GEOMX_HEARTBEAT_TOKEN`) as `Authorization: Bearer ...` when set.
pub fn heartbeat_request(host: &str, prefix: &str, token: Option<&str>, body: &str) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST {prefix}/v1/heartbeat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// POSTs one heartbeat to `<url>/v1/heartbeat` (plain HTTP/1.1, with the container's token
/// when it has one); returns the status code.
pub fn post_heartbeat(
    url: &str,
    cfg: &Config,
    step: u64,
    epoch: u64,
    acc: f64,
) -> std::io::Result<u16> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad(format!("{url}: only http:// is supported")))?;
    let (host, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let prefix = if prefix == "/" { String::new() } else { prefix };
    let body = heartbeat_body(cfg, step, epoch, acc);
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| bad(format!("{host}: no address")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(
        heartbeat_request(host, &prefix, cfg.heartbeat_token.as_deref(), &body).as_bytes(),
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("no HTTP status in {:?}", resp.lines().next())))?;
    if code != 200 {
        return Err(bad(format!(
            "HTTP {code}: {}",
            resp.lines().last().unwrap_or("")
        )));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn accuracy_rises() {
        let n = 20;
        let accs: Vec<f64> = (1..=n).map(|i| accuracy(i, n)).collect();
        assert!(accs.windows(2).all(|w| w[1] > w[0]));
        assert!(accs[0] > 0.1 && accs[0] < 0.3);
        assert!(accs[19] > 0.85 && accs[19] < 0.95);
    }

    #[test]
    fn line_format_is_geomx() {
        assert_eq!(
            progress_line(12.3456, 0, 17, 0.93124),
            "[Time 12.346][Epoch 0][Iteration 17] Test Acc 0.9312"
        );
    }

    #[test]
    fn heartbeat_json() {
        let env: BTreeMap<String, String> = [("GEOMX_JOB", "job1"), ("GEOMX_NODE", "a-worker-0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cfg = Config::from_env(&env, &[]).expect("idle config");
        assert_eq!(
            heartbeat_body(&cfg, 12, 1, 0.9),
            r#"{"job": "job1", "node": "a-worker-0", "step": 12, "epoch": 1, "metrics": {"accuracy": 0.9000, "loss": 0.1000}}"#
        );
        assert_eq!(json_str("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
        let req = heartbeat_request("172.17.0.1:7948", "", Some("ab12"), "{}");
        assert!(
            req.starts_with("POST /v1/heartbeat HTTP/1.1\r\n")
                && req.contains("\r\nAuthorization: Bearer ab12\r\n")
                && req.ends_with("\r\n\r\n{}"),
            "{req:?}"
        );
        assert!(!heartbeat_request("h", "", None, "{}").contains("Authorization"));
    }

    #[test]
    fn crash_and_exit_codes() {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PSNODE_INTERVAL".into(), "1".into());
        env.insert("PSNODE_ITERATIONS".into(), "3".into());
        env.insert("PSNODE_EXIT_CODE".into(), "7".into());
        let cfg = Config::from_env(&env, &[]).expect("config");
        assert_eq!(train(&cfg, 0), 7);
        env.insert("PSNODE_CRASH_AFTER".into(), "2".into());
        let cfg = Config::from_env(&env, &[]).expect("config");
        assert_eq!(train(&cfg, 0), CRASH_EXIT_CODE);
    }
}
