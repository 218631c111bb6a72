//! Who may call what.
//!
//! TLS accepts a connection with or without a client certificate (users have none); a
//! certificate, when presented, is verified against the CA by the TLS layer. Then:
//!
//! * `AgentService`: the caller must present an agent certificate (OU=agent) whose CN equals
//!   the host named in the request, and whose serial is not in the revocation list. A bearer
//!   token does not grant it.
//! * `HostService`, `JobService`: the caller must send `authorization: Bearer <token>` with
//!   one of the configured tokens, not revoked, whose role allows the RPC
//!   ([`crate::credentials::required_role`]: `read` looks, `submit` also submits, cancels and
//!   removes jobs, `admin` also changes hosts). An agent certificate alone does not grant
//!   them. The caller ([`Caller`]: the token's name and role) is put into the request's
//!   extensions for the handlers (events and logs name who submitted, who cancelled).
//! * health and reflection: open.
//!
//! The tokens and the revocation list are those in force in [`Credentials`] at each call:
//! a reload applies to the next call (and ends the watch streams of a revoked agent).
//!
//! In insecure mode (plaintext) there are no certificates: the agent API trusts the host
//! named in the request, and the user API checks tokens only if some are configured (else
//! every caller is `anonymous`, role admin).

use std::sync::Arc;

use geomx_proto::credentials::{Revocations, Role, TokenSet};
use geomx_proto::tls::{PeerIdentity, bearer_token, peer_identity};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::credentials::{CalledMethod, Credentials};
use crate::validate::shorten;

/// Who called a user RPC: the token's name and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (from the tokens file), `anonymous` in insecure mode without tokens.
    pub name: String,
    /// The token's role.
    pub role: Role,
}

impl Caller {
    /// The caller of `request`, as the user interceptor noted it (`unknown` if it did not:
    /// a request that did not come through the interceptor).
    pub fn of<T>(request: &Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(|| Caller {
                name: "unknown".to_owned(),
                role: Role::Read,
            })
    }
}

/// An agent call refused: the status to answer, and the certificate when it was refused
/// because it is revoked.
#[derive(Debug)]
pub struct AgentDenied {
    /// What the agent is told.
    pub status: Status,
    /// The revoked certificate, when that is why.
    pub revoked: Option<PeerIdentity>,
}

impl From<AgentDenied> for Status {
    fn from(d: AgentDenied) -> Status {
        d.status
    }
}

/// The controller's access policy.
#[derive(Clone, Debug)]
pub struct Auth {
    insecure: bool,
    credentials: Arc<Credentials>,
}

impl Auth {
    /// A policy over the (reloadable) `credentials`; `insecure` for plaintext mode.
    pub fn new(credentials: Arc<Credentials>, insecure: bool) -> Self {
        Auth {
            insecure,
            credentials,
        }
    }

    /// A policy with fixed tokens and nothing revoked (tests).
    pub fn with_tokens(tokens: TokenSet, insecure: bool) -> Self {
        Auth::new(
            Arc::new(Credentials::fixed(tokens, Revocations::default())),
            insecure,
        )
    }

    /// The credentials in use.
    pub fn credentials(&self) -> &Arc<Credentials> {
        &self.credentials
    }

    /// Whether connections are plaintext without certificates.
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// Checks the caller of an `AgentService` RPC is the agent of `host`, with a certificate
    /// that is not revoked; returns its identity (`None` in insecure mode).
    pub fn check_agent<T>(
        &self,
        request: &Request<T>,
        host: &str,
    ) -> Result<Option<PeerIdentity>, AgentDenied> {
        let denied = |status| AgentDenied {
            status,
            revoked: None,
        };
        if self.insecure {
            return Ok(None);
        }
        let Some(id) = peer_identity(request) else {
            return Err(denied(Status::unauthenticated(
                "AgentService requires the agent's client certificate signed by the geomx CA (mTLS); bearer tokens do not grant it",
            )));
        };
        if !id.is_agent() {
            return Err(denied(Status::permission_denied(format!(
                "certificate {id} is not an agent certificate (OU=agent)"
            ))));
        }
        if id.common_name != host {
            return Err(denied(Status::permission_denied(format!(
                "certificate CN={} may not act for host {}",
                id.common_name,
                shorten(host)
            ))));
        }
        if self.revoked(&id) {
            return Err(AgentDenied {
                status: Status::permission_denied(format!(
                    "certificate {id} serial {} is revoked (the controller's revocation list): this agent needs a new certificate (geomxctl certs renew --new-key, or certs agent --force)",
                    id.serial
                )),
                revoked: Some(id),
            });
        }
        Ok(Some(id))
    }

    /// Whether the certificate of `id` is revoked now.
    pub fn revoked(&self, id: &PeerIdentity) -> bool {
        self.credentials
            .snapshot()
            .revoked
            .serial_revoked(&id.serial)
    }

    /// Requires the caller of an `AgentService` RPC to be the agent of `host`.
    pub fn authorize_agent<T>(&self, request: &Request<T>, host: &str) -> Result<(), Status> {
        self.check_agent(request, host)
            .map(drop)
            .map_err(|d| d.status)
    }

    /// Authenticates an HTTP caller of the web listener (`/metrics`, the dashboard) by the
    /// bearer token in `headers`, as [`Auth::authorize_user`] does for the gRPC API; any
    /// role may read. The refusal is said for people.
    pub fn authorize_reader(&self, headers: &hyper::HeaderMap) -> Result<Caller, String> {
        let mut request = Request::new(());
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers.clone());
        match self.authorize_user(&request) {
            Ok(caller) if caller.role.allows(Role::Read) => Ok(caller),
            Ok(caller) => Err(format!("token {:?} may not read", caller.name)),
            Err(status) => Err(status.message().to_owned()),
        }
    }

    /// Authenticates the caller of a user RPC by its bearer token (any role).
    pub fn authorize_user<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let snapshot = self.credentials.snapshot();
        if self.insecure && snapshot.tokens.is_empty() {
            return Ok(Caller {
                name: "anonymous".to_owned(),
                role: Role::Admin,
            });
        }
        let presented = match bearer_token(request.metadata())? {
            Some(t) => t,
            None => {
                return Err(match peer_identity(request) {
                    Some(id) => Status::permission_denied(format!(
                        "certificate {id} does not grant the user API; send \"authorization: Bearer <token>\""
                    )),
                    None => Status::unauthenticated(
                        "missing \"authorization: Bearer <token>\" (geomxctl: --token or GEOMX_TOKEN)",
                    ),
                });
            }
        };
        let Some(token) = snapshot.tokens.find(presented) else {
            return Err(Status::unauthenticated("invalid bearer token"));
        };
        if snapshot.revoked.token_revoked(&token.name) {
            if self
                .credentials
                .note_refusal(&format!("token/{}", token.name), "")
            {
                tracing::warn!(token = %token.name, "a revoked token was presented; refused");
            }
            return Err(Status::unauthenticated(format!(
                "token {:?} is revoked (the controller's revocation list); ask an admin for a new one",
                token.name
            )));
        }
        Ok(Caller {
            name: token.name.clone(),
            role: token.role,
        })
    }

    /// Authenticates the caller of `called` and checks its role allows it.
    pub fn authorize_call<T>(
        &self,
        request: &Request<T>,
        called: &CalledMethod,
    ) -> Result<Caller, Status> {
        let caller = self.authorize_user(request)?;
        if !caller.role.allows(called.needed) {
            tracing::warn!(caller = %caller.name, role = %caller.role, method = %called.name, needed = %called.needed, "call refused: the token's role does not allow it");
            return Err(Status::permission_denied(format!(
                "token {:?} has role {}: {} needs role {}{}",
                caller.name,
                caller.role,
                called.name,
                called.needed,
                if called.needed == Role::Admin {
                    ""
                } else {
                    " (or admin)"
                }
            )));
        }
        if called.needed > Role::Read {
            tracing::info!(caller = %caller.name, role = %caller.role, method = %called.name, "user call");
        } else {
            tracing::debug!(caller = %caller.name, role = %caller.role, method = %called.name, "user call");
        }
        Ok(caller)
    }

    /// An interceptor enforcing [`Auth::authorize_call`] on a whole service; the service
    /// must be wrapped in [`crate::credentials::MethodRoles`] (else every call needs admin).
    pub fn user_interceptor(&self) -> UserInterceptor {
        UserInterceptor { auth: self.clone() }
    }
}

/// Interceptor of the user services (see [`Auth::authorize_call`]).
#[derive(Clone, Debug)]
pub struct UserInterceptor {
    auth: Auth,
}

impl Interceptor for UserInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let called = request
            .extensions()
            .get::<CalledMethod>()
            .cloned()
            .unwrap_or(CalledMethod {
                name: "an RPC not wrapped in MethodRoles".to_owned(),
                needed: Role::Admin,
            });
        let caller = self.auth.authorize_call(&request, &called)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::required_role;
    use geomx_proto::credentials::Token;

    fn with_bearer(token: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    }

    fn called(path: &str) -> CalledMethod {
        CalledMethod {
            name: path.trim_start_matches("/geomx.v1.").to_owned(),
            needed: required_role(path),
        }
    }

    #[test]
    fn plaintext_requests() {
        let tokens = TokenSet::new(vec![Token::hashed(
            "admin",
            Role::Admin,
            "0123456789abcdef",
        )])
        .unwrap();
        let secure = Auth::with_tokens(tokens.clone(), false);
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
        let req = with_bearer("0123456789abcdef");
        let caller = secure.authorize_user(&req).unwrap();
        assert_eq!(caller.name, "admin");
        // A token does not grant the agent API.
        assert!(secure.authorize_agent(&req, "a").is_err());
        assert_eq!(
            secure
                .authorize_user(&with_bearer("0123456789abcdef-no"))
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );

        let insecure_open = Auth::with_tokens(TokenSet::default(), true);
        assert_eq!(
            insecure_open
                .authorize_user(&Request::new(()))
                .unwrap()
                .name,
            "anonymous"
        );
        assert!(
            insecure_open
                .authorize_agent(&Request::new(()), "a")
                .is_ok()
        );
        let insecure_tokens = Auth::with_tokens(tokens, true);
        assert!(insecure_tokens.authorize_user(&Request::new(())).is_err());
    }

    #[test]
    fn roles_per_method() {
        let tokens = TokenSet::new(vec![
            Token::hashed("alice", Role::Admin, "alice-0123456789abcdef"),
            Token::hashed("ci", Role::Submit, "ci-0123456789abcdef"),
            Token::hashed("grafana", Role::Read, "grafana-0123456789abcdef"),
        ])
        .unwrap();
        let auth = Auth::with_tokens(tokens, false);
        let cases = [
            ("/geomx.v1.JobService/ListJobs", [true, true, true]),
            ("/geomx.v1.JobService/WatchJob", [true, true, true]),
            ("/geomx.v1.JobService/NodeLogs", [true, true, true]),
            ("/geomx.v1.HostService/ListHosts", [true, true, true]),
            ("/geomx.v1.JobService/SubmitJob", [true, true, false]),
            ("/geomx.v1.JobService/CancelJob", [true, true, false]),
            ("/geomx.v1.JobService/RemoveJob", [true, true, false]),
            ("/geomx.v1.HostService/PullImage", [true, true, false]),
            ("/geomx.v1.HostService/CordonHost", [true, false, false]),
            ("/geomx.v1.HostService/RemoveHost", [true, false, false]),
        ];
        for (path, allowed) in cases {
            for (secret, ok) in [
                "alice-0123456789abcdef",
                "ci-0123456789abcdef",
                "grafana-0123456789abcdef",
            ]
            .into_iter()
            .zip(allowed)
            {
                let r = auth.authorize_call(&with_bearer(secret), &called(path));
                assert_eq!(r.is_ok(), ok, "{secret} {path}: {r:?}");
                if let Err(s) = r {
                    assert_eq!(s.code(), tonic::Code::PermissionDenied);
                }
            }
        }
        let err = auth
            .authorize_call(
                &with_bearer("grafana-0123456789abcdef"),
                &called("/geomx.v1.JobService/CancelJob"),
            )
            .unwrap_err();
        assert_eq!(
            err.message(),
            "token \"grafana\" has role read: JobService/CancelJob needs role submit (or admin)"
        );
        let err = auth
            .authorize_call(
                &with_bearer("ci-0123456789abcdef"),
                &called("/geomx.v1.HostService/CordonHost"),
            )
            .unwrap_err();
        assert_eq!(
            err.message(),
            "token \"ci\" has role submit: HostService/CordonHost needs role admin"
        );
    }

    #[test]
    fn the_interceptor_puts_the_caller_and_fails_closed() {
        let tokens = TokenSet::new(vec![Token::hashed(
            "ci",
            Role::Submit,
            "ci-0123456789abcdef",
        )])
        .unwrap();
        let mut i = Auth::with_tokens(tokens, false).user_interceptor();
        let mut req = with_bearer("ci-0123456789abcdef");
        req.extensions_mut()
            .insert(called("/geomx.v1.JobService/SubmitJob"));
        let req = i.call(req).unwrap();
        assert_eq!(
            Caller::of(&req),
            Caller {
                name: "ci".into(),
                role: Role::Submit
            }
        );
        // without MethodRoles around the service: admin is needed
        let err = i.call(with_bearer("ci-0123456789abcdef")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_revoked_token_is_refused_on_its_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let revoked = dir.path().join("revoked");
        std::fs::write(
            &tokens,
            geomx_proto::pki::token_line("ci", Role::Submit, "ci-0123456789abcdef"),
        )
        .unwrap();
        std::fs::write(&revoked, "# nothing yet\n").unwrap();
        let (c, _) = Credentials::load(crate::credentials::Sources {
            inline: vec![],
            tokens_file: Some(tokens),
            revocation_file: Some(revoked.clone()),
        })
        .unwrap();
        let auth = Auth::new(Arc::new(c), false);
        let list = called("/geomx.v1.JobService/ListJobs");
        assert!(
            auth.authorize_call(&with_bearer("ci-0123456789abcdef"), &list)
                .is_ok()
        );
        std::fs::write(&revoked, "token ci\n").unwrap();
        auth.credentials().reload_if_changed();
        let err = auth
            .authorize_call(&with_bearer("ci-0123456789abcdef"), &list)
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("token \"ci\" is revoked"), "{err}");
    }
}
