//! The server's accepted connections: TCP options, the TLS handshake under a time
//! bound (a client that connects and sends nothing is dropped, and never holds up
//! other handshakes), the peer's address and client-certificate subject for the
//! service, and the open-connection count. `server` hands this stream to tonic; `tls`
//! supplies the current certificates; `shards` runs one per extra I/O thread, fed the
//! sockets the listening one passes on.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_core::Stream;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Sleep, Timeout},
};
use tokio_rustls::{server::TlsStream, FallibleAccept};
use tonic::transport::server::Connected;

use super::tls::{self, Tls};
use crate::{auth::PeerInfo, ops::metrics::Metrics};

/// TCP and TLS options of accepted connections.
#[derive(Clone)]
pub struct IncomingOptions {
    pub tcp_keepalive: Duration,
    /// With `Some`, every connection must complete a TLS handshake within the bound.
    pub tls: Option<(Tls, Duration)>,
    /// With `Some`, a connection's reads and writes fail this long after it is accepted,
    /// which closes it whatever its streams are doing: the `--http2 hyper` path's end of
    /// `--max-connection-age-grace` (tonic 0.14's own grace timer skips the GOAWAY at
    /// the age, so tonic is given the age alone; the own HTTP/2 keeps its own timers).
    pub close_after: Option<Duration>,
}

/// A socket accepted on the listening thread for another I/O thread. It travels as a
/// std socket so that it registers with the reactor of the thread that serves it.
pub type HandOff = (std::net::TcpStream, SocketAddr);

/// Where connections come from.
enum Source {
    /// Accepts itself, keeping every `1 + others.len()`-th connection and passing the
    /// rest on, in turn, to the other I/O threads.
    Listener {
        listener: TcpListener,
        others: Vec<mpsc::UnboundedSender<HandOff>>,
        turn: usize,
    },
    /// Takes what the listening thread passes on.
    HandedOff(mpsc::UnboundedReceiver<HandOff>),
}

/// The accepted connections, ready for HTTP/2. Dropping it closes the listener.
pub struct Incoming {
    source: Source,
    options: IncomingOptions,
    metrics: Metrics,
    handshakes: FuturesUnordered<Handshake>,
    /// After an accept error (out of file descriptors, say), wait before trying again
    /// rather than spin.
    pause: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, options: IncomingOptions, metrics: Metrics) -> Incoming {
        Incoming::with_source(
            Source::Listener {
                listener,
                others: Vec::new(),
                turn: 0,
            },
            options,
            metrics,
        )
    }

    /// The connections the listening thread passes on through `handed_off`.
    pub fn handed_off(
        handed_off: mpsc::UnboundedReceiver<HandOff>,
        options: IncomingOptions,
        metrics: Metrics,
    ) -> Incoming {
        Incoming::with_source(Source::HandedOff(handed_off), options, metrics)
    }

    /// Shares the accepted connections with `others`, round robin: the first goes to
    /// `others[0]`, and this thread keeps every `1 + others.len()`-th.
    pub fn share_with(mut self, others: Vec<mpsc::UnboundedSender<HandOff>>) -> Incoming {
        if let Source::Listener { others: o, .. } = &mut self.source {
            *o = others;
        }
        self
    }

    fn with_source(source: Source, options: IncomingOptions, metrics: Metrics) -> Incoming {
        Incoming {
            source,
            options,
            metrics,
            handshakes: FuturesUnordered::new(),
            pause: None,
        }
    }

    fn configure(&self, tcp: &TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let keepalive = socket2::TcpKeepalive::new().with_time(self.options.tcp_keepalive);
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

impl Incoming {
    /// The next connection this thread serves, if one is ready.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Option<(TcpStream, SocketAddr)> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return None;
                }
                self.pause = None;
            }
            match &mut self.source {
                Source::HandedOff(handed_off) => {
                    let (std, addr) = match handed_off.poll_recv(cx) {
                        Poll::Ready(Some(handed)) => handed,
                        // Closed: the listening thread stopped accepting.
                        Poll::Ready(None) | Poll::Pending => return None,
                    };
                    match TcpStream::from_std(std) {
                        Ok(tcp) => return Some((tcp, addr)),
                        Err(e) => {
                            tracing::warn!(peer = %addr, error = %e, "cannot register a connection; dropped")
                        }
                    }
                }
                Source::Listener {
                    listener,
                    others,
                    turn,
                } => match listener.poll_accept(cx) {
                    Poll::Ready(Ok((tcp, addr))) => {
                        *turn = (*turn + 1) % (others.len() + 1);
                        let Some(other) = turn.checked_sub(1).and_then(|i| others.get(i)) else {
                            return Some((tcp, addr));
                        };
                        match tcp.into_std() {
                            Ok(std) => {
                                if other.send((std, addr)).is_err() {
                                    tracing::warn!(peer = %addr, "I/O thread gone; connection dropped");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(peer = %addr, error = %e, "cannot hand a connection over; dropped")
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "accept failed; pausing accepts for 100ms");
                        self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                    }
                    Poll::Pending => return None,
                },
            }
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<ServerIo>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while let Some((tcp, addr)) = this.poll_accept(cx) {
            this.configure(&tcp);
            match &this.options.tls {
                None => {
                    let peer = PeerInfo {
                        addr: Some(addr),
                        client_subject: None,
                    };
                    let io = ServerIo::new(
                        Transport::Plain(tcp),
                        peer,
                        &this.metrics,
                        this.options.close_after,
                    );
                    return Poll::Ready(Some(Ok(io)));
                }
                Some((tls, bound)) => this.handshakes.push(Handshake {
                    addr,
                    accept: tokio::time::timeout(
                        *bound,
                        tls.acceptor().accept(tcp).into_fallible(),
                    ),
                }),
            }
        }
        while let Poll::Ready(Some((addr, outcome))) = this.handshakes.poll_next_unpin(cx) {
            match outcome {
                Ok(Ok(stream)) => {
                    let client_subject = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(tls::client_subject)
                        .map(Arc::from);
                    let peer = PeerInfo {
                        addr: Some(addr),
                        client_subject,
                    };
                    let io = ServerIo::new(
                        Transport::Tls(Box::new(stream)),
                        peer,
                        &this.metrics,
                        this.options.close_after,
                    );
                    return Poll::Ready(Some(Ok(io)));
                }
                Ok(Err((e, tcp))) => {
                    let reason = refusal(&e);
                    this.metrics.tls_handshake_failures(reason);
                    tracing::debug!(peer = %addr, error = %e, reason, "TLS handshake failed");
                    let bound = this.options.tls.as_ref().map_or(LINGER, |(_, b)| *b);
                    tokio::spawn(linger(tcp, bound.min(LINGER)));
                }
                Err(_) => {
                    this.metrics.tls_handshake_failures("timeout");
                    tracing::debug!(peer = %addr, "TLS handshake timed out; connection dropped");
                }
            }
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// One TLS handshake under its time bound, remembering the peer for the log.
    struct Handshake {
        addr: SocketAddr,
        #[pin]
        accept: Timeout<FallibleAccept<TcpStream>>,
    }
}

type HandshakeOutcome =
    Result<Result<TlsStream<TcpStream>, (io::Error, TcpStream)>, tokio::time::error::Elapsed>;

/// Why a handshake failed, as the `reason` of `tickerd_tls_handshake_failures_total`: what
/// an operator acts on (clients without a certificate after mTLS was turned on, clients
/// that do not trust the server's certificate, plaintext clients on the TLS port).
fn refusal(e: &io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_client_certificate",
        Some(E::AlertReceived(_)) => "refused_by_client",
        Some(E::InvalidMessage(_) | E::InappropriateMessage { .. }) => "not_tls",
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => "incompatible",
        _ => "error",
    }
}

/// How long, and for how many bytes, a failed handshake's socket stays open; see `linger`.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Closes a socket whose handshake failed so that the client can read why. The alert
/// rustls wrote (say, "certificate required") is the client's only clue, but a TLS 1.3
/// client sends its first request right after its certificate, before it learns it was
/// refused; closing with that request unread makes the kernel answer with a reset, and
/// the client then reports "broken pipe" or "connection reset" instead of the alert. So
/// the write side is shut after the alert and what the client still sends is read and
/// dropped until it closes, for at most `LINGER` (or the handshake bound, if shorter) and
/// `LINGER_BYTES`. That holds a socket no longer than a client that connects and stays
/// silent may already hold one, so it gives a flood nothing new.
async fn linger(mut tcp: TcpStream, within: Duration) {
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(within, async {
        while left > 0 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

impl Future for Handshake {
    type Output = (SocketAddr, HandshakeOutcome);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        this.accept.poll(cx).map(|outcome| (*this.addr, outcome))
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, counted in `tickerd_connections_active` while open.
pub struct ServerIo {
    transport: Transport,
    peer: PeerInfo,
    metrics: Metrics,
    /// When reads and writes start to fail (`IncomingOptions::close_after`).
    closes_at: Option<Pin<Box<Sleep>>>,
}

impl ServerIo {
    fn new(
        transport: Transport,
        peer: PeerInfo,
        metrics: &Metrics,
        close_after: Option<Duration>,
    ) -> ServerIo {
        metrics.connections.inc();
        ServerIo {
            transport,
            peer,
            metrics: metrics.clone(),
            closes_at: close_after.map(|after| Box::pin(tokio::time::sleep(after))),
        }
    }

    /// Fails once the connection's time is up. Polled with every read, so the
    /// connection's task, which always has a read pending, wakes when it is.
    fn check_time(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(at) = &mut self.closes_at else {
            return Ok(());
        };
        match at.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived --max-connection-age and its grace",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl ServerIo {
    /// Who is on the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl Drop for ServerIo {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

impl Connected for ServerIo {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_time(cx)?;
        match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_time(cx)?;
        match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_time(cx)?;
        match &mut this.transport {
            Transport::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    /// Deliberately not vectored. h2 copies a DATA frame into its 16 KiB write buffer
    /// only below a threshold (256 bytes with vectored writes, 1024 without); a larger
    /// frame is chained and flushed on its own, one syscall per frame. A stream's
    /// batch of ticks is often 300-1000 bytes, so with the vectored threshold each
    /// stream's frame cost a write; below 1024 the frames of every stream of the
    /// connection leave together (`benches/README.md`: writes and CPU per delivery
    /// roughly halved).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(io) => Pin::new(io).poll_flush(cx),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}
