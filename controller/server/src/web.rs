//! The controller's web listener (`web_listen`): HTTPS with the controller's certificate
//! (plain HTTP only when the controller itself runs insecure), bounded as
//! [`geomx_proto::web`] bounds it, routing by path. Today it serves `/metrics`
//! ([`crate::metrics`]) and the dashboard ([`crate::dashboard`]: every other path).
//!
//! `/metrics` needs `Authorization: Bearer <token>` with a token of the controller's token
//! store (any role: `read` suffices; revoked tokens are refused, as on the gRPC API), or a
//! source address inside one of the `metrics_allow` networks. Otherwise: 401.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use geomx_proto::web::{WebResponse, plain, respond};
use hyper::body::Incoming;
use hyper::header::{ALLOW, HeaderValue, WWW_AUTHENTICATE};
use hyper::{HeaderMap, Method, Request, StatusCode};
use ipnet::IpNet;

use crate::auth::Auth;
use crate::dashboard::Dashboard;
use crate::metrics::ControllerMetrics;

/// What the routes need.
#[derive(Debug)]
pub struct WebState {
    /// The registry `/metrics` renders.
    pub metrics: Arc<ControllerMetrics>,
    /// The token store of the user API.
    pub auth: Auth,
    /// Source networks allowed without a token.
    pub metrics_allow: Vec<IpNet>,
    /// The dashboard (every path but `/metrics`).
    pub dashboard: Arc<Dashboard>,
}

/// Answers one request.
pub async fn route(state: Arc<WebState>, peer: SocketAddr, req: Request<Incoming>) -> WebResponse {
    match req.uri().path() {
        "/metrics" => {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                return r;
            }
            if let Err(why) = authorize(&state.auth, &state.metrics_allow, peer.ip(), req.headers())
            {
                return unauthorized(&why);
            }
            respond(
                StatusCode::OK,
                geomx_proto::exposition::CONTENT_TYPE,
                state.metrics.render(),
            )
        }
        _ => {
            let dashboard = state.dashboard.clone();
            match dashboard.route(peer, req).await {
                Some(r) => r,
                None => plain(StatusCode::NOT_FOUND, "not found: try / or /metrics"),
            }
        }
    }
}

/// Admits a source in `metrics_allow` or a valid, unrevoked bearer token of any role;
/// otherwise says why not.
fn authorize(
    auth: &Auth,
    allow: &[IpNet],
    peer: IpAddr,
    headers: &HeaderMap,
) -> Result<(), String> {
    let peer = peer.to_canonical();
    if allow.iter().any(|net| net.contains(&peer)) {
        return Ok(());
    }
    match auth.authorize_reader(headers) {
        Ok(caller) => {
            tracing::debug!(caller = %caller.name, "metrics scrape");
            Ok(())
        }
        Err(why) => {
            tracing::debug!(%peer, reason = %why, "metrics scrape refused");
            Err(why)
        }
    }
}

fn unauthorized(why: &str) -> WebResponse {
    let mut r = plain(
        StatusCode::UNAUTHORIZED,
        format!("{why} (a token of any role, or a source address in metrics_allow)"),
    );
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"geomx\""),
    );
    r
}

#[cfg(test)]
mod tests {
    use geomx_proto::credentials::{Role, Token, TokenSet};

    use super::*;

    fn headers(token: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                hyper::header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_read_token_or_an_allowed_source_may_scrape_and_nothing_else() {
        let tokens = TokenSet::new(vec![Token::hashed(
            "grafana",
            Role::Read,
            "grafana-0123456789abcdef",
        )])
        .unwrap();
        let auth = Auth::with_tokens(tokens, false);
        let allow: Vec<IpNet> = vec!["10.9.0.0/16".parse().unwrap()];
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(
            authorize(
                &auth,
                &allow,
                outside,
                &headers(Some("grafana-0123456789abcdef"))
            )
            .is_ok()
        );
        let why = authorize(&auth, &allow, outside, &headers(None)).unwrap_err();
        assert!(why.contains("missing"), "{why}");
        let refused = unauthorized(&why);
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(refused.headers().contains_key(WWW_AUTHENTICATE));
        let why = authorize(
            &auth,
            &allow,
            outside,
            &headers(Some("wrong-0123456789abcdef")),
        )
        .unwrap_err();
        assert!(why.contains("invalid"), "{why}");
        // inside metrics_allow, as IPv4 or IPv4-mapped IPv6
        assert!(authorize(&auth, &allow, "10.9.3.4".parse().unwrap(), &headers(None)).is_ok());
        assert!(
            authorize(
                &auth,
                &allow,
                "::ffff:10.9.3.4".parse().unwrap(),
                &headers(None)
            )
            .is_ok()
        );
        assert!(authorize(&auth, &allow, "10.8.3.4".parse().unwrap(), &headers(None)).is_err());
    }
}
