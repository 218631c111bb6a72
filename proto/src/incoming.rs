//! The listening socket as a geomx gRPC server (the controller's API, the agent's API)
//! sees it.
//!
//! * Every accepted connection gets a read idle timeout ([`IdleTimeout`]): a connection
//!   from which nothing at all is read for the server's idle timeout is closed. tonic
//!   bounds the TLS handshake (`ServerTlsConfig::timeout`) and hyper's HTTP/2 keepalive
//!   closes an established connection that stops answering pings, but nothing bounded the
//!   time between the two: a client that completed the TLS handshake and never sent the
//!   HTTP/2 preface held its connection (and a file descriptor) forever. A healthy HTTP/2
//!   peer is never idle that long: the server pings it after its keepalive interval
//!   without a frame and it answers.
//! * At most `max_connections` connections are open at once ([`guarded`]): one more is
//!   closed as soon as it is accepted (a flood of connections that never speak costs the
//!   server nothing beyond the cap and holds each slot only until the idle timeout or the
//!   handshake timeout).
//! * An accept error other than a connection's own (out of file descriptors, out of
//!   memory) backs off for [`ACCEPT_ERROR_BACKOFF`] instead of retrying at once: the
//!   listener stays readable while the error lasts, and tonic's accept loop would spin.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// Pause after an accept error that is not about one connection (e.g. `EMFILE`).
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// An I/O stream whose reads fail with `TimedOut` once nothing has been read for `timeout`
/// while a read is waiting. Writes pass through.
#[derive(Debug)]
pub struct IdleTimeout<T> {
    inner: T,
    timeout: Duration,
    last_read: Instant,
    deadline: Pin<Box<Sleep>>,
    /// The connection's slot under the server's cap, given back when it closes.
    _slot: Option<OwnedSemaphorePermit>,
}

impl<T> IdleTimeout<T> {
    /// Wraps `inner`; the idle time counts from now.
    pub fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleTimeout {
            inner,
            timeout,
            last_read: now,
            deadline: Box::pin(tokio::time::sleep_until(now + timeout)),
            _slot: None,
        }
    }

    fn with_slot(mut self, slot: OwnedSemaphorePermit) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let filled = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > filled {
                    // The timer is moved only when it fires: no timer update per read.
                    this.last_read = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => loop {
                if this.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.last_read + this.timeout;
                if due <= Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "nothing received for {}",
                            humantime::format_duration(this.timeout)
                        ),
                    )));
                }
                this.deadline.as_mut().reset(due);
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection info is the TCP stream's own, so that tonic still finds the client's
/// certificate (`TlsConnectInfo<TcpConnectInfo>`) in every request.
impl Connected for IdleTimeout<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Errors that concern one connection only (it went away before it was accepted).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The accepted connections of `listener`, each with a read idle timeout of `idle`, at most
/// `max_connections` open at once (one more is closed at once, logged at most every 10 s).
/// Never yields an error: connection errors are skipped, others are logged and backed off.
pub fn guarded(
    listener: TcpIncoming,
    idle: Duration,
    max_connections: usize,
) -> impl Stream<Item = io::Result<IdleTimeout<TcpStream>>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    futures::stream::unfold(
        (listener, None::<Instant>, None::<Instant>),
        move |(mut listener, mut warned, mut refused_at)| {
            let slots = slots.clone();
            async move {
                loop {
                    match listener.next().await? {
                        Ok(tcp) => match slots.clone().try_acquire_owned() {
                            Ok(slot) => {
                                let conn = IdleTimeout::new(tcp, idle).with_slot(slot);
                                return Some((Ok(conn), (listener, warned, refused_at)));
                            }
                            Err(_) => {
                                if refused_at
                                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
                                {
                                    tracing::warn!(
                                        peer = ?tcp.peer_addr().ok(),
                                        max_connections,
                                        "too many connections: closing new ones (warned at most every 10 s)"
                                    );
                                    refused_at = Some(Instant::now());
                                }
                                drop(tcp);
                            }
                        },
                        Err(e) if is_connection_error(&e) => {
                            tracing::debug!(error = %e, "accept: connection error");
                        }
                        Err(e) => {
                            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                                tracing::warn!(
                                    error = %e,
                                    "cannot accept connections (backing off; warned at most every 10 s)"
                                );
                                warned = Some(Instant::now());
                            }
                            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_silent_peer_times_out_and_a_talking_one_does_not() {
        let timeout = Duration::from_millis(300);
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = IdleTimeout::new(server, timeout);
        let mut buf = [0u8; 8];

        // Talking every 200 ms keeps it open well past the timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"x").await.expect("write");
            let n = server.read(&mut buf).await.expect("read");
            assert_eq!(n, 1);
        }
        // Writes do not count as activity, and do not fail.
        server.write_all(b"pong").await.expect("write");

        // Then silence: the waiting read fails after the timeout, not before.
        let started = Instant::now();
        let err = server.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert!(err.to_string().contains("300ms"), "{err}");
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_slots_come_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut accepted = Box::pin(guarded(
            TcpIncoming::from(listener),
            Duration::from_secs(30),
            2,
        ));
        let mut clients = Vec::new();
        let mut held = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            held.push(accepted.next().await.expect("stream").expect("conn"));
        }
        // the third is closed by the server as soon as it is accepted
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let next = tokio::time::timeout(Duration::from_millis(300), accepted.next()).await;
        assert!(next.is_err(), "a third connection was handed to the server");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the third connection is closed");
        // one held connection closes: a new one is served again
        drop(held.pop());
        let _fourth = TcpStream::connect(addr).await.expect("connect");
        let conn = tokio::time::timeout(Duration::from_secs(5), accepted.next())
            .await
            .expect("served");
        assert!(conn.is_some_and(|c| c.is_ok()));
    }

    #[tokio::test]
    async fn end_of_stream_passes_through() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = IdleTimeout::new(server, Duration::from_secs(30));
        drop(client);
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.expect("eof"), 0);
    }
}
