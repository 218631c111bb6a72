//! The dashboard's JSON API (GET only, behind the session check of [`super::Dashboard`]):
//!
//! | path | answer |
//! |---|---|
//! | `/api/cluster` | `{"hosts": [...], "sites": [...]}`: every host (the JSON of `geomxctl hosts -o json`) and the data centers ([`super::sites`]) |
//! | `/api/jobs` | `{"jobs": [...]}`: every job, newest first, without nodes |
//! | `/api/jobs/NAME` | `{"job": {...}, "events": [...], "points": [...], "seq": N}`: the job with its nodes and rendezvous, its events, its curve points ([`super::curves`]) |
//! | `/api/jobs/NAME/logs/NODE?tail=N` | `{"lines": [{"text", "stderr"}], "truncated"}`: the node's last N lines (default 200, at most [`MAX_LOG_LINES`]) from its host's agent |
//! | `/api/jobs/NAME/stream` | server-sent events: `job` (`{"job", "events"}` when it changed) and `points` (new curve points, `id:` their last sequence number), for [`STREAM_LIFETIME`], then the stream ends and the browser reconnects (sending `Last-Event-ID`) |

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use geomx_proto::json::{event_json, host_json, job_json};
use geomx_proto::v1::UserLogsRequest;
use geomx_proto::web::{WebResponse, respond, streamed};
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONNECTION, HeaderValue};
use hyper::{Request, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::Dashboard;
use super::sites::sites;
use crate::hosts::host_message;
use crate::jobs::Jobs;

/// Most lines of a log tail.
pub const MAX_LOG_LINES: u32 = 2000;
/// Most bytes of a log tail answer (the rest is cut, `truncated: true`).
pub const MAX_LOG_BYTES: usize = 1 << 20;
/// Time allowed to fetch a log tail from the agent.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one event stream lasts. Below the web listener's idle timeout (30 s: the
/// browser sends nothing while it listens), so the stream ends cleanly and the browser
/// reconnects on a new connection before the connection would be cut.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(25);
/// Least time between two messages of a stream.
pub const STREAM_DEBOUNCE: Duration = Duration::from_millis(300);
/// Most events a stream message carries (the newest).
pub const STREAM_EVENTS: usize = 200;

/// Answers one API request (the caller is authorized).
pub async fn route<B>(d: &Arc<Dashboard>, req: &Request<B>) -> WebResponse {
    let path = req.uri().path();
    let parts: Vec<&str> = path
        .trim_start_matches("/api/")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if parts.iter().any(|p| !valid_segment(p)) {
        return error(StatusCode::BAD_REQUEST, "a name in the path is not valid");
    }
    match parts.as_slice() {
        ["cluster"] => cluster(d),
        ["jobs", rest @ ..] => {
            let Some(jobs) = d.jobs.as_ref() else {
                return error(StatusCode::NOT_FOUND, "this controller runs no jobs");
            };
            match rest {
                [] => json_ok(
                    &json!({ "jobs": jobs.list().iter().map(job_json).collect::<Vec<_>>() }),
                ),
                [name] => job(d, jobs, name),
                [name, "stream"] => stream(d, jobs.clone(), name, last_event_id(req)),
                [name, "logs", node] => logs(jobs, name, node, tail(req)).await,
                _ => error(StatusCode::NOT_FOUND, "no such API path"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such API path"),
    }
}

/// A JSON error `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> WebResponse {
    let mut r = respond(
        status,
        "application/json",
        json!({ "error": message }).to_string(),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"geomx\""),
        );
    }
    r
}

fn json_ok(v: &Value) -> WebResponse {
    let mut r = respond(StatusCode::OK, "application/json", v.to_string());
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn status_error(s: &tonic::Status) -> WebResponse {
    let code = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable => StatusCode::BAD_GATEWAY,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(code, s.message())
}

/// Job, node and host names: what geomx's names are made of.
fn valid_segment(s: &str) -> bool {
    s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn query_value<'a, B>(req: &'a Request<B>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn tail<B>(req: &Request<B>) -> u32 {
    query_value(req, "tail")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(200)
        .clamp(1, MAX_LOG_LINES)
}

fn last_event_id<B>(req: &Request<B>) -> u64 {
    req.headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .or_else(|| query_value(req, "after").and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn cluster(d: &Dashboard) -> WebResponse {
    let hosts: Vec<_> = d.membership.hosts().iter().map(host_message).collect();
    let json_hosts: Vec<Value> = hosts
        .iter()
        .filter_map(|h| serde_json::to_value(host_json(h)).ok())
        .collect();
    json_ok(&json!({ "hosts": json_hosts, "sites": sites(&hosts) }))
}

fn events_json(jobs: &Jobs, name: &str) -> Vec<Value> {
    let events = jobs.events(name).unwrap_or_default();
    let skip = events.len().saturating_sub(STREAM_EVENTS);
    events.iter().skip(skip).map(event_json).collect()
}

fn job(d: &Dashboard, jobs: &Jobs, name: &str) -> WebResponse {
    let job = match jobs.get(name) {
        Ok(j) => j,
        Err(s) => return status_error(&s),
    };
    let (points, seq) = d.curves.since(&job.name, 0);
    json_ok(&json!({
        "job": job_json(&job),
        "events": events_json(jobs, name),
        "points": points,
        "seq": seq,
    }))
}

async fn logs(jobs: &Jobs, name: &str, node: &str, tail: u32) -> WebResponse {
    let request = UserLogsRequest {
        job: name.to_owned(),
        node: node.to_owned(),
        follow: false,
        tail,
        generation: None,
    };
    let fetched = tokio::time::timeout(LOG_TIMEOUT, async {
        let mut stream = jobs.logs(request).await?;
        let mut lines = Vec::new();
        let mut bytes = 0usize;
        let mut truncated = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            for line in chunk.lines {
                bytes += line.len();
                if bytes > MAX_LOG_BYTES {
                    truncated = true;
                    break;
                }
                lines.push(json!({ "text": line, "stderr": chunk.stderr }));
            }
            if truncated {
                break;
            }
        }
        Ok::<_, tonic::Status>((lines, truncated))
    })
    .await;
    match fetched {
        Ok(Ok((lines, truncated))) => json_ok(&json!({ "lines": lines, "truncated": truncated })),
        Ok(Err(s)) => status_error(&s),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the node's host did not send its output within {}",
                humantime::format_duration(LOG_TIMEOUT)
            ),
        ),
    }
}

/// One server-sent event.
fn sse(event: &str, id: Option<u64>, data: &Value) -> Bytes {
    let mut s = String::new();
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    s.push_str(&format!("event: {event}\ndata: {data}\n\n"));
    Bytes::from(s)
}

fn stream(d: &Arc<Dashboard>, jobs: Arc<Jobs>, name: &str, after: u64) -> WebResponse {
    if let Err(s) = jobs.get(name) {
        return status_error(&s);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let d = d.clone();
    let name = name.to_owned();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + STREAM_LIFETIME;
        let mut changes = jobs.subscribe_changes();
        let mut reports = jobs.subscribe_reports();
        let mut points_rx = d.curves.subscribe();
        let mut after = after;
        let mut last_job: Option<Value> = None;
        // events come with persisted changes only: read again after one, not per report
        let mut events: Option<Vec<Value>> = None;
        if tx
            .send(Bytes::from_static(b"retry: 1000\n\n"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let Ok(job) = jobs.get(&name) else { return };
            let shown = events.get_or_insert_with(|| events_json(&jobs, &name));
            let message = json!({ "job": job_json(&job), "events": shown });
            if last_job.as_ref() != Some(&message) {
                if tx.send(sse("job", None, &message)).await.is_err() {
                    return;
                }
                last_job = Some(message);
            }
            let (points, seq) = d.curves.since(&job.name, after);
            if !points.is_empty() {
                if tx
                    .send(sse(
                        "points",
                        Some(seq),
                        &json!({ "points": points, "seq": seq }),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
                after = seq;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
                _ = changes.changed() => events = None,
                _ = reports.changed() => {}
                _ = points_rx.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(10)) => {
                    if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = tokio::time::sleep(STREAM_DEBOUNCE) => {}
            }
        }
    });
    let mut r = streamed("text/event-stream", rx);
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // one stream per connection: the connection ends with the stream (see STREAM_LIFETIME)
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    // a reverse proxy (nginx) in front must pass the events on as they come
    h.insert(
        hyper::header::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_names_only() {
        for ok in ["mxnet-ps", "a-worker-1", "job_2.x"] {
            assert!(valid_segment(ok), "{ok}");
        }
        for bad in ["..%2f", "a b", "<script>", &"x".repeat(129)] {
            assert!(!valid_segment(bad), "{bad}");
        }
    }

    #[test]
    fn a_server_sent_event_is_framed() {
        let b = sse("points", Some(7), &json!({"seq": 7}));
        assert_eq!(&b[..], b"id: 7\nevent: points\ndata: {\"seq\":7}\n\n");
        let b = sse("job", None, &json!(1));
        assert_eq!(&b[..], b"event: job\ndata: 1\n\n");
    }

    #[test]
    fn the_tail_and_the_last_event_id_come_from_the_request() {
        let r = Request::builder()
            .uri("/api/jobs/j/logs/n?tail=99999")
            .header("last-event-id", "12")
            .body(())
            .unwrap();
        assert_eq!(tail(&r), MAX_LOG_LINES);
        assert_eq!(last_event_id(&r), 12);
        let r = Request::builder()
            .uri("/api/jobs/j/stream?after=5")
            .body(())
            .unwrap();
        assert_eq!(tail(&r), 200);
        assert_eq!(last_event_id(&r), 5);
    }
}
