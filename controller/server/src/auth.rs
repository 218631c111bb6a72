//! Who may call what.
//!
//! TLS accepts a connection with or without a client certificate (users have none); a
//! certificate, when presented, is verified against the CA by the TLS layer. Then:
//!
//! * `AgentService`: the caller must present an agent certificate (OU=agent) whose CN equals
//!   the host named in the request. A bearer token does not grant it.
//! * `HostService`, `JobService`: the caller must send `authorization: Bearer <token>` with
//!   one of the configured tokens. An agent certificate alone does not grant them.
//! * health and reflection: open.
//!
//! In insecure mode (plaintext) there are no certificates: the agent API trusts the host
//! named in the request, and the user API checks tokens only if some are configured.

use std::sync::Arc;

use geomx_proto::tls::{BearerTokens, bearer_token, peer_identity};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::validate::shorten;

/// The controller's access policy.
#[derive(Clone, Debug)]
pub struct Auth {
    insecure: bool,
    tokens: Arc<BearerTokens>,
}

impl Auth {
    /// A policy with the given user tokens; `insecure` for plaintext mode.
    pub fn new(tokens: BearerTokens, insecure: bool) -> Self {
        Auth {
            insecure,
            tokens: Arc::new(tokens),
        }
    }

    /// Requires the caller of an `AgentService` RPC to be the agent of `host`.
    pub fn authorize_agent<T>(&self, request: &Request<T>, host: &str) -> Result<(), Status> {
        if self.insecure {
            return Ok(());
        }
        let Some(id) = peer_identity(request) else {
            return Err(Status::unauthenticated(
                "AgentService requires the agent's client certificate signed by the geomx CA (mTLS); bearer tokens do not grant it",
            ));
        };
        if !id.is_agent() {
            return Err(Status::permission_denied(format!(
                "certificate {id} is not an agent certificate (OU=agent)"
            )));
        }
        if id.common_name != host {
            return Err(Status::permission_denied(format!(
                "certificate CN={} may not act for host {}",
                id.common_name,
                shorten(host)
            )));
        }
        Ok(())
    }

    /// Requires a configured bearer token on a user RPC.
    pub fn authorize_user<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.insecure && self.tokens.is_empty() {
            return Ok(());
        }
        match bearer_token(request.metadata())? {
            Some(_) => self.tokens.verify(request.metadata()),
            None => match peer_identity(request) {
                Some(id) => Err(Status::permission_denied(format!(
                    "certificate {id} does not grant the user API; send \"authorization: Bearer <token>\""
                ))),
                None => self.tokens.verify(request.metadata()),
            },
        }
    }

    /// An interceptor enforcing [`Auth::authorize_user`] on a whole service.
    pub fn user_interceptor(&self) -> UserInterceptor {
        UserInterceptor { auth: self.clone() }
    }
}

/// Interceptor of the user services (see [`Auth::authorize_user`]).
#[derive(Clone, Debug)]
pub struct UserInterceptor {
    auth: Auth,
}

impl Interceptor for UserInterceptor {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.auth.authorize_user(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_requests() {
        let tokens = BearerTokens::new(["0123456789abcdef"]);
        let secure = Auth::new(tokens.clone(), false);
        // No certificate at all: agent API refused, token required on the user API.
        let req = Request::new(());
        assert_eq!(
            secure.authorize_agent(&req, "a").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            secure.authorize_user(&req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        assert!(secure.authorize_user(&req).is_ok());
        // A token does not grant the agent API.
        assert!(secure.authorize_agent(&req, "a").is_err());

        let insecure_open = Auth::new(BearerTokens::default(), true);
        assert!(insecure_open.authorize_user(&Request::new(())).is_ok());
        assert!(
            insecure_open
                .authorize_agent(&Request::new(()), "a")
                .is_ok()
        );
        let insecure_tokens = Auth::new(tokens, true);
        assert!(insecure_tokens.authorize_user(&Request::new(())).is_err());
    }
}
