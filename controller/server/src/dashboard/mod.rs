//! The controller's web dashboard, served on `web_listen` next to `/metrics`
//! (docs/operations.md, "Dashboard"): the cluster (data centers, hosts, the link matrix),
//! the jobs, and a job's page (its HiPS topology, rendezvous, live training curves, events
//! and a node's log tail).
//!
//! * Pages and scripts are embedded in the binary ([`assets`]); nothing is fetched from
//!   anywhere else at run time (the Content-Security-Policy says so to the browser too).
//! * Everything but the login page and the static assets needs a session ([`session`]:
//!   log in with a token of any role at `/login`) or an `Authorization: Bearer` header;
//!   the dashboard only reads (no call changes anything).
//! * The data is the API's own JSON form ([`geomx_proto::json`], the same as `geomxctl
//!   --output json`); a job page follows its job by server-sent events ([`api`]).

pub mod api;
pub mod assets;
pub mod curves;
pub mod session;
pub mod sites;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use geomx_proto::web::{WebResponse, plain, respond};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, COOKIE, HeaderName, HeaderValue, LOCATION,
    REFERRER_POLICY, SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{HeaderMap, Method, Request, StatusCode};

use crate::auth::{Auth, Caller};
use crate::jobs::Jobs;
use crate::membership::Membership;
use curves::Curves;
use session::Sessions;

/// Largest login request body.
const MAX_LOGIN_BODY: usize = 4096;

/// What the dashboard's routes need.
#[derive(Debug)]
pub struct Dashboard {
    /// The hosts.
    pub membership: Arc<Membership>,
    /// The jobs (absent on a controller without a jobs layer).
    pub jobs: Option<Arc<Jobs>>,
    /// The token store of the user API.
    pub auth: Auth,
    /// Logged-in browsers.
    pub sessions: Sessions,
    /// The training curves.
    pub curves: Arc<Curves>,
    /// Served over HTTPS (the session cookie is `Secure`).
    pub secure: bool,
}

impl Dashboard {
    /// A dashboard over the controller's state.
    pub fn new(
        membership: Arc<Membership>,
        jobs: Option<Arc<Jobs>>,
        auth: Auth,
        curves: Arc<Curves>,
        secure: bool,
    ) -> Self {
        Dashboard {
            membership,
            jobs,
            auth,
            sessions: Sessions::new(),
            curves,
            secure,
        }
    }

    /// Answers a request for a dashboard path; `None` for other paths.
    pub async fn route(
        self: &Arc<Self>,
        peer: SocketAddr,
        req: Request<Incoming>,
    ) -> Option<WebResponse> {
        let path = req.uri().path().to_owned();
        let response = match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, "/") => match self.caller(req.headers()) {
                Ok(_) => page(assets::INDEX_HTML),
                Err(_) => redirect("/login"),
            },
            (Method::GET | Method::HEAD, "/login") => page(assets::LOGIN_HTML),
            (Method::POST, "/login") => self.login(peer, req).await,
            (Method::POST, "/logout") => self.logout(req.headers()),
            // browsers ask for it whatever the page says
            (Method::GET | Method::HEAD, "/favicon.ico") => match assets::find("favicon.svg") {
                Some((content_type, body)) => respond(StatusCode::OK, content_type, body),
                None => plain(StatusCode::NOT_FOUND, "no icon"),
            },
            (Method::GET | Method::HEAD, p) if p.starts_with("/assets/") => {
                match assets::find(&p["/assets/".len()..]) {
                    Some((content_type, body)) => respond(StatusCode::OK, content_type, body),
                    None => plain(StatusCode::NOT_FOUND, "no such asset"),
                }
            }
            (method, p) if p.starts_with("/api/") => {
                if method != Method::GET && method != Method::HEAD {
                    plain(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "the dashboard API only reads: use GET",
                    )
                } else {
                    match self.caller(req.headers()) {
                        Ok(caller) => {
                            let span =
                                tracing::debug_span!("dashboard", caller = %caller.name, path = %p);
                            let _enter = span.enter();
                            api::route(self, &req).await
                        }
                        Err(why) => api::error(StatusCode::UNAUTHORIZED, &why),
                    }
                }
            }
            _ => return None,
        };
        Some(secured(response))
    }

    /// The caller of a request: its `Authorization: Bearer` header, else its session's
    /// token, checked against the tokens and revocation list now.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Caller, String> {
        if headers.contains_key(hyper::header::AUTHORIZATION) {
            return check(&self.auth, headers.clone());
        }
        let id = session_cookie(headers)
            .ok_or_else(|| "not logged in: log in at /login with a token".to_owned())?;
        let token = self
            .sessions
            .token(id, Instant::now())
            .ok_or_else(|| "the session ended: log in again at /login".to_owned())?;
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the session's token is not a header value".to_owned())?;
        h.insert(hyper::header::AUTHORIZATION, value);
        check(&self.auth, h)
    }

    async fn login(&self, peer: SocketAddr, req: Request<Incoming>) -> WebResponse {
        let source = peer.ip().to_canonical();
        if !self.sessions.may_try(source, Instant::now()) {
            return plain(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins from this address: wait a minute",
            );
        }
        let body = match Limited::new(req.into_body(), MAX_LOGIN_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a login is at most {MAX_LOGIN_BODY} bytes"),
                );
            }
        };
        let Some(token) = form_value(&body, "token") else {
            return plain(StatusCode::BAD_REQUEST, "send the form field \"token\"");
        };
        let mut h = HeaderMap::new();
        let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
            self.sessions.failed(source, Instant::now());
            return plain(StatusCode::UNAUTHORIZED, "invalid bearer token");
        };
        h.insert(hyper::header::AUTHORIZATION, value);
        match check(&self.auth, h) {
            Ok(caller) => {
                let id = self.sessions.create(&token, Instant::now());
                tracing::info!(caller = %caller.name, %source, "dashboard login");
                let mut r = redirect("/");
                if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, self.secure)) {
                    r.headers_mut().insert(SET_COOKIE, v);
                }
                r
            }
            Err(why) => {
                self.sessions.failed(source, Instant::now());
                tracing::info!(%source, reason = %why, "dashboard login refused");
                plain(StatusCode::UNAUTHORIZED, why)
            }
        }
    }

    fn logout(&self, headers: &HeaderMap) -> WebResponse {
        if let Some(id) = session_cookie(headers) {
            self.sessions.remove(id);
        }
        let mut r = redirect("/login");
        if let Ok(v) = HeaderValue::from_str(&session::clear_cookie(self.secure)) {
            r.headers_mut().insert(SET_COOKIE, v);
        }
        r
    }
}

/// Checks the bearer token in `headers` (any role may read).
fn check(auth: &Auth, headers: HeaderMap) -> Result<Caller, String> {
    auth.authorize_reader(&headers)
}

/// The session id in a request's cookies, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::session_id)
}

/// The value of `field` in an `application/x-www-form-urlencoded` body.
fn form_value(body: &[u8], field: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == field)
        .and_then(|(_, v)| percent_decode(v))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Decodes `%XX` and `+` of a form value; `None` for a malformed escape or non-UTF-8.
fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn page(html: &'static str) -> WebResponse {
    let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", html);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn redirect(to: &'static str) -> WebResponse {
    let mut r = plain(StatusCode::SEE_OTHER, format!("see {to}"));
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    r
}

/// The headers every dashboard response carries: nothing but this origin may be loaded,
/// framed or referred to.
fn secured(mut r: WebResponse) -> WebResponse {
    let h = r.headers_mut();
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_decoded_and_malformed_ones_refused() {
        assert_eq!(
            form_value(b"a=1&token=ab%2Bc+d", "token").as_deref(),
            Some("ab+c d")
        );
        assert_eq!(form_value(b"token=", "token"), None);
        assert_eq!(form_value(b"token=%zz", "token"), None);
        assert_eq!(form_value(b"token=%f", "token"), None);
        assert_eq!(form_value(b"other=1", "token"), None);
        assert_eq!(form_value(&[0xff, b'='], "token"), None);
    }
}
