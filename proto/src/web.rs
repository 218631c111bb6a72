//! A small, bounded HTTP/1.1 server (plain or HTTPS) for the daemons' web endpoints: the
//! controller's `web_listen` (`/metrics`, later the dashboard) and the agent's
//! `metrics_listen`.
//!
//! The bounds are those of the gRPC listeners ([`crate::incoming::guarded`]: a connection
//! cap, a read idle timeout per connection) plus a TLS handshake timeout, a header read
//! timeout, a header size cap and a deadline per connection ([`WebLimits`]). What a request
//! gets is up to the handler (a router function of the daemon).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpIncoming};

/// The body of a [`WebResponse`]: whole ([`respond`]) or streamed ([`streamed`]).
pub type WebBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response of a web handler.
pub type WebResponse = Response<WebBody>;

/// Bounds of a [`WebServer`].
#[derive(Clone, Copy, Debug)]
pub struct WebLimits {
    /// Most connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// A connection from which nothing is read for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a request's headers to arrive.
    pub header_timeout: Duration,
    /// A connection is closed this long after it was accepted, whatever it is doing.
    pub connection_deadline: Duration,
}

impl Default for WebLimits {
    /// 64 connections, 30 s idle, 10 s for the handshake and for headers, 60 s a
    /// connection (a scrape every 15 s keeps its connection for a few scrapes).
    fn default() -> Self {
        WebLimits {
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            connection_deadline: Duration::from_secs(60),
        }
    }
}

/// Largest buffered request head (headers) a connection may send.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// A bound web listener, served by [`WebServer::serve`].
pub struct WebServer {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: WebLimits,
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl WebServer {
    /// Binds `addr` (port 0: any free port); HTTPS with `tls`, plain HTTP without.
    pub async fn bind(
        addr: SocketAddr,
        tls: Option<rustls::ServerConfig>,
        limits: WebLimits,
    ) -> std::io::Result<WebServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(WebServer {
            listener,
            tls: tls.map(|c| TlsAcceptor::from(Arc::new(c))),
            limits,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves every request with `handler(peer, request)` until `shutdown` (which also
    /// closes the open connections).
    pub async fn serve<F, Fut>(self, handler: F, shutdown: CancellationToken)
    where
        F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = WebResponse> + Send + 'static,
    {
        use futures::StreamExt;
        let WebServer {
            listener,
            tls,
            limits,
        } = self;
        let accepted = crate::incoming::guarded(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            limits.idle_timeout,
            limits.max_connections,
        );
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let conn = tokio::select! {
                () = shutdown.cancelled() => return,
                c = accepted.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => continue,
                    None => return,
                },
            };
            let Some(peer) = conn.connect_info().remote_addr() else {
                continue;
            };
            let handler = handler.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let served = async {
                    match tls {
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                limits.handshake_timeout,
                                acceptor.accept(conn),
                            )
                            .await
                            {
                                Ok(Ok(stream)) => {
                                    serve_connection(stream, peer, handler, limits).await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "web: TLS handshake failed");
                                }
                                Err(_) => tracing::debug!(%peer, "web: TLS handshake timed out"),
                            }
                        }
                        None => serve_connection(conn, peer, handler, limits).await,
                    }
                };
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    r = tokio::time::timeout(limits.connection_deadline, served) => {
                        if r.is_err() {
                            tracing::debug!(%peer, "web: connection deadline, closed");
                        }
                    }
                }
            });
        }
    }
}

async fn serve_connection<S, F, Fut>(stream: S, peer: SocketAddr, handler: F, limits: WebLimits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = WebResponse> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(peer, req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "web connection");
    }
}

/// A response of `status` with `body` as `content_type`.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> WebResponse {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A plain-text response of `status`.
pub fn plain(status: StatusCode, message: impl Into<String>) -> WebResponse {
    let mut text = message.into();
    text.push('\n');
    respond(status, "text/plain; charset=utf-8", text)
}

/// A 200 response of `content_type` whose body is every chunk `chunks` yields, sent as it
/// comes (chunked), ending when the sender is dropped (server-sent events, say). The
/// connection's bounds ([`WebLimits`]) still apply: a stream must end before the
/// connection's deadline, and one whose client reads nothing is closed by its idle timeout.
pub fn streamed(
    content_type: &'static str,
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
) -> WebResponse {
    let frames = futures::stream::unfold(chunks, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
