//! Serving the router against slow and greedy clients: hyper's HTTP/1.1 server with a header
//! read timeout, a write-progress timeout, a global and a per-address connection cap (refusals
//! answered at once, never left in the backlog, and never more than the open-file limit allows),
//! TCP keepalive, and a minimum request-body rate after a grace period with a bound on any one
//! wait. The routes themselves are `http.rs`'s.

use crate::blobs::Blobs;
use crate::db::Db;
use crate::http::router_with;
use crate::polls::Polls;
use crate::service::App;
use crate::settings::Settings;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How the server holds up against slow and greedy clients: flags and `CONSTRUIR_SERVER_*`
/// variables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Connections served at once; one more is answered 503 and closed (default 4096; at most
    /// the open-file limit less 256, which the server raises to its hard limit at start).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections one peer address (an IPv6 /64) may hold at once; one more is answered 429
    /// and closed. Loopback peers (a reverse proxy on this host) count only against
    /// --max-connections (default 64).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// How long a client has to send a request's head, and how long an idle connection is kept
    /// (default 20s).
    #[arg(long, env = "CONSTRUIR_SERVER_HEADER_TIMEOUT", value_parser = crate::settings::parse_secs)]
    pub header_timeout: Option<u64>,
    /// How long a write to a client may make no progress (a client that does not read its
    /// answers) before its connection is closed (default 30s).
    #[arg(long, env = "CONSTRUIR_SERVER_WRITE_TIMEOUT", value_parser = crate::settings::parse_secs)]
    pub write_timeout: Option<u64>,
    /// The slowest a request body may arrive, in bytes a second, after --body-grace (default 8K),
    /// counted only while the server waits for the client: an upload of any size that keeps this
    /// pace is never cut.
    #[arg(long, env = "CONSTRUIR_SERVER_MIN_BODY_RATE", value_parser = construir_launcher::size::parse_size)]
    pub min_body_rate: Option<u64>,
    /// The head start a request body gets before --min-body-rate counts (default 30s, at
    /// least 1s).
    #[arg(long, env = "CONSTRUIR_SERVER_BODY_GRACE", value_parser = crate::settings::parse_secs)]
    pub body_grace: Option<u64>,
    /// The longest a request body may send nothing, whatever it sent before (default 60s, at
    /// least 1s); also the most waiting a fast start can bank against --min-body-rate.
    #[arg(long, env = "CONSTRUIR_SERVER_BODY_IDLE", value_parser = crate::settings::parse_secs)]
    pub body_idle: Option<u64>,
    /// Long polls (claims, followed logs) one token may hold open at once (default 64).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_POLLS_PER_TOKEN")]
    pub max_polls_per_token: Option<usize>,
}

/// [`ServeArgs`] in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Whether loopback peers count against `max_connections_per_ip` too (never from the
    /// command line: behind a reverse proxy on this host every client is a loopback peer).
    pub cap_loopback: bool,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
    pub min_body_rate: u64,
    pub body_grace: Duration,
    /// The longest a body may send nothing, and the most waiting it may bank ahead of its pace.
    pub body_idle: Duration,
    pub max_polls_per_token: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 4096,
            max_connections_per_ip: 64,
            cap_loopback: false,
            header_timeout: Duration::from_secs(20),
            write_timeout: Duration::from_secs(30),
            min_body_rate: 8 << 10,
            body_grace: Duration::from_secs(30),
            body_idle: Duration::from_secs(60),
            max_polls_per_token: crate::polls::DEFAULT_MAX_PER_TOKEN,
        }
    }
}

impl ServeArgs {
    pub fn resolve(&self) -> ServeLimits {
        let d = ServeLimits::default();
        ServeLimits {
            max_connections: self.max_connections.unwrap_or(d.max_connections).max(1),
            max_connections_per_ip: self
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip)
                .max(1),
            cap_loopback: d.cap_loopback,
            header_timeout: self
                .header_timeout
                .map_or(d.header_timeout, |s| Duration::from_secs(s.max(1))),
            write_timeout: self
                .write_timeout
                .map_or(d.write_timeout, |s| Duration::from_secs(s.max(1))),
            min_body_rate: self.min_body_rate.unwrap_or(d.min_body_rate).max(1),
            // A grace of 0 would fail every body not already buffered at its first wait.
            body_grace: self
                .body_grace
                .map_or(d.body_grace, |s| Duration::from_secs(s.max(1))),
            body_idle: self
                .body_idle
                .map_or(d.body_idle, |s| Duration::from_secs(s.max(1))),
            max_polls_per_token: self
                .max_polls_per_token
                .unwrap_or(d.max_polls_per_token)
                .max(1),
        }
    }
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(settings: Settings, limits: ServeLimits, db: Db) -> anyhow::Result<()> {
    let limits = within_open_files(limits);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", settings.listen))?;
    let local = listener.local_addr()?;
    let blobs = Blobs::open(settings.store.as_ref(), &settings.data)?;
    // The address on stdout (one line), for scripts that listen on port 0.
    println!("http://{local}");
    tracing::info!(
        "construir-server: serving on http://{local} (data {}; at most {} connections)",
        settings.data.display(),
        limits.max_connections
    );
    let app = App::new(settings, db, blobs)?;
    app.spawn_sweeper();
    let routes = router_with(app.clone(), Polls::new(limits.max_polls_per_token));
    serve_on(listener, routes, limits, async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("construir-server: stopping");
        // Parked long polls answer now (runners claim again from the next server, followers
        // ask again): the drain waits for real work only.
        app.begin_stopping();
    })
    .await;
    Ok(())
}

/// How long a stop waits for the requests in flight (long polls answer at once on a stop;
/// uploads get this long to finish). `construir-server.service`'s `TimeoutStopSec` must outlast
/// it, or systemd kills the server mid-drain (a test holds them together).
const DRAIN: Duration = Duration::from_secs(35);

/// Open files kept for everything but connections: the database (and its journal), blobs being
/// read or written, upload temp files, the listener, and the [`REFUSALS_AT_ONCE`] refused
/// connections being answered.
const FILES_RESERVED: u64 = 256;

/// `limits` with `max_connections` cut to what the open-file limit allows, once that limit is
/// raised as far as it goes ([`raise_open_files`]); a warning says so when it is cut. Past the
/// limit `accept` fails (`EMFILE`) rather than answering 503, and the database and blobs cannot
/// open their files.
fn within_open_files(limits: ServeLimits) -> ServeLimits {
    let Some(files) = raise_open_files() else {
        return limits;
    };
    let fit = connections_within(limits.max_connections, files);
    if fit < limits.max_connections {
        tracing::warn!(
            "construir-server: --max-connections {} is past what {files} open files allow \
             ({FILES_RESERVED} kept for the database, blobs and temp files): serving at most {fit} \
             at once (raise LimitNOFILE / ulimit -n)",
            limits.max_connections
        );
    }
    ServeLimits {
        max_connections: fit,
        ..limits
    }
}

/// How many connections `max_connections` comes to with `files` open files allowed: at most
/// `files` less [`FILES_RESERVED`] (half of `files` when that is more, for a tiny limit), and
/// at least 1.
fn connections_within(max_connections: usize, files: u64) -> usize {
    let room = files.saturating_sub(FILES_RESERVED).max(files / 2).max(1);
    max_connections.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its hard limit (the
/// soft one is often 1024, far under `--max-connections`); the soft limit now in force, or
/// `None` if it cannot be read. A raise the system refuses is logged and the old limit kept.
fn raise_open_files() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the `rlimit` it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            "construir-server: cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the `rlimit` it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            tracing::warn!(
                "construir-server: cannot raise the open-file limit from {} to {}: {}",
                limit.rlim_cur,
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    Some(limit.rlim_cur)
}

/// Serves `routes` on `listener` with hyper's HTTP/1.1 server until `shutdown`, then lets the
/// requests in flight end (for at most [`DRAIN`]). Against slow and greedy clients:
///
/// - every connection is accepted at once. Past `max_connections` at once the new one is
///   answered 503 (`Retry-After: 1`) and closed, and past `max_connections_per_ip` from one peer
///   address (an IPv6 /64; loopback peers only with `cap_loopback`) 429: a full server says so
///   promptly rather than leaving connections in the kernel's backlog, and `/healthz` on a
///   fresh connection is answered or refused, never left hanging ([`refuse`]);
/// - a request head must arrive within `header_timeout` (an idle kept-alive connection is closed
///   after as long), and a body must keep [`MinRate`]'s pace;
/// - a write to the client that makes no progress for `write_timeout` (a client that does not
///   read, a peer that is gone) closes the connection (tokio-io-timeout's write timeout: the
///   clock runs only while a write or flush is pending, so a long poll's silence and a slow
///   download that keeps moving are not cut);
/// - TCP keepalive probes notice a dead peer on an idle connection ([`keepalive`]).
///
/// Long polls are not affected: once a request is read, its handler takes the time it takes.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    routes: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let peers = Arc::new(Peers::new(
        limits.max_connections_per_ip,
        limits.cap_loopback,
    ));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let pace = Pace {
        grace: limits.body_grace,
        bytes_per_s: limits.min_body_rate,
        idle: limits.body_idle,
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, a connection reset before it was taken: wait, go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = Peers::take(&peers, peer.ip()) else {
            tracing::debug!("{peer}: past --max-connections-per-ip; refused");
            refuse(stream, TOO_MANY_FROM_YOU, &refusals);
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("{peer}: past --max-connections; refused");
            refuse(stream, FULL, &refusals);
            continue;
        };
        let _ = stream.set_nodelay(true);
        keepalive(&stream);
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(limits.write_timeout));
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |request: axum::http::Request<Incoming>| {
            let mut request = request.map(|body| Body::new(MinRate::new(body, pace)));
            // Who is on the other end (the website's sign-up limit counts by it).
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            routes.clone().oneshot(request)
        });
        let connection =
            graceful.watch(http1.serve_connection(TokioIo::new(Box::pin(io)), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection: {e}");
            }
            drop(permit);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("construir-server: requests still open after {DRAIN:?}; stopping anyway");
    }
}

/// TCP keepalive on an accepted connection: the first probe after a minute of silence, then
/// every 10 s, and the kernel gives up after 6 unanswered (so a peer that vanished from an idle
/// kept-alive or long-polling connection is noticed within about two minutes).
fn keepalive(stream: &tokio::net::TcpStream) {
    let probes = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!("keepalive: {e}");
    }
}

/// The answer to a connection past `--max-connections`.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Retry-After: 1\r\nConnection: close\r\nContent-Length: 39\r\n\r\n\
the server is full; try again in a bit\n";

/// The answer to a connection past `--max-connections-per-ip`.
const TOO_MANY_FROM_YOU: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n\
Retry-After: 1\r\nConnection: close\r\nContent-Length: 46\r\n\r\n\
too many connections from your address at once\n";

/// Refused connections being answered at once; past it one is closed without an answer.
const REFUSALS_AT_ONCE: usize = 64;

/// How long answering a refused connection may take, all told.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Answers a connection we will not serve with `answer` and closes it: the answer, our end
/// shut, then what the client sent read and dropped (at most 64 KiB, [`REFUSAL_TIME`] all told),
/// so that closing does not reset the connection before the client read the answer. At most
/// [`REFUSALS_AT_ONCE`] at a time; past it, closed at once.
fn refuse(
    stream: tokio::net::TcpStream,
    answer: &'static [u8],
    refusals: &Arc<tokio::sync::Semaphore>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    let mut stream = stream;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REFUSAL_TIME, async {
            stream.write_all(answer).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut left = 64usize << 10;
            while left > 0 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            std::io::Result::Ok(())
        })
        .await;
        drop(permit);
    });
}

/// Connections open per peer address, for `--max-connections-per-ip`.
struct Peers {
    cap: usize,
    cap_loopback: bool,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One connection's place in [`Peers`], given back when dropped.
struct PeerSlot {
    peers: Arc<Peers>,
    key: Option<std::net::IpAddr>,
}

impl Peers {
    fn new(cap: usize, cap_loopback: bool) -> Self {
        Peers {
            cap,
            cap_loopback,
            open: Default::default(),
        }
    }

    /// What a peer is counted under: its IPv4 address (IPv4-mapped ones too), its IPv6 /64 (one
    /// subscriber's share), or nothing for a loopback peer unless loopback is capped.
    fn key(&self, ip: std::net::IpAddr) -> Option<std::net::IpAddr> {
        use std::net::IpAddr;
        let ip = ip.to_canonical();
        if ip.is_loopback() && !self.cap_loopback {
            return None;
        }
        Some(match ip {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        })
    }

    /// A place for one more connection from `ip`, if it has fewer than the cap open.
    fn take(peers: &Arc<Peers>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let key = peers.key(ip);
        if let Some(key) = key {
            let mut open = peers.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(key).or_insert(0);
            if *n >= peers.cap {
                return None;
            }
            *n += 1;
        }
        Some(PeerSlot {
            peers: peers.clone(),
            key,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&key);
                }
            }
        }
    }
}

/// The slowest pace a request body may keep: `bytes_per_s` on average, after `grace`, and never
/// nothing for `idle`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub grace: Duration,
    pub bytes_per_s: u64,
    /// The longest one wait for the client's next byte may last, whatever it sent before; also
    /// the most waiting a body may bank by sending faster than `bytes_per_s`.
    pub idle: Duration,
}

/// A request body too slow for its [`Pace`].
#[derive(Debug, thiserror::Error)]
#[error("the request body arrives slower than {0} bytes a second")]
pub struct TooSlow(u64);

/// A request body that fails once it falls behind its [`Pace`]. It may be waited for `grace`
/// to begin with, and each byte it sends buys `1 / bytes_per_s` more, but what it has banked
/// never grows past `idle` (a leaky bucket: the rate is judged over about the last `idle` of
/// waiting, not the body's whole life), and no single wait for a byte lasts past `idle`, so a
/// client that sends most of a large body fast and then stops, or trickles, is cut within about
/// `idle` rather than after hours of credit. An upload of any size that keeps the pace is never
/// cut. Only time spent waiting for the client's bytes counts (from a read that found none until
/// the next read): time the handler spends between reads (a slow disk) and before its first
/// read is the server's, not the client's.
pub struct MinRate<B> {
    inner: B,
    pace: Pace,
    /// The waiting the body may still be given (its grace, then what its bytes bought, at most
    /// `idle` of that), not counting a wait still going on.
    left: Duration,
    /// The time waited since the body's last byte, not counting a wait still going on.
    since_byte: Duration,
    /// Since when a wait has been going on: the last read found no bytes.
    waiting_since: Option<tokio::time::Instant>,
    /// When the wait going on runs out (made at the first wait).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> MinRate<B> {
    pub fn new(inner: B, pace: Pace) -> Self {
        MinRate {
            inner,
            pace,
            left: pace.grace,
            since_byte: Duration::ZERO,
            waiting_since: None,
            deadline: None,
        }
    }

    /// `bytes` more arrived: they buy their waiting, up to `idle` banked (a grace longer than
    /// that is kept, not grown), and the idle clock starts again.
    fn received(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bought = Duration::from_secs_f64(bytes as f64 / self.pace.bytes_per_s.max(1) as f64);
        let bank = self.pace.idle.max(self.left);
        self.left = self.left.saturating_add(bought).min(bank);
        self.since_byte = Duration::ZERO;
    }

    /// How long the wait now starting may last.
    fn wait_allowed(&self) -> Duration {
        self.left
            .min(self.pace.idle.saturating_sub(self.since_byte))
    }
}

impl<B> HttpBody for MinRate<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let pace = this.pace;
        let now = tokio::time::Instant::now();
        if let Some(since) = this.waiting_since.take() {
            let waited = now.saturating_duration_since(since);
            this.left = this.left.saturating_sub(waited);
            this.since_byte = this.since_byte.saturating_add(waited);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received(data.len());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let too_slow = || {
                    Poll::Ready(Some(Err(
                        Box::new(TooSlow(pace.bytes_per_s)) as axum::BoxError
                    )))
                };
                let allowed = this.wait_allowed();
                if allowed.is_zero() {
                    return too_slow();
                }
                this.waiting_since = Some(now);
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(now + allowed)));
                deadline.as_mut().reset(now + allowed);
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => too_slow(),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (from reading a body with `axum::body::to_bytes` and a limit) is the body being
/// past that limit, rather than one cut short (too slow for [`MinRate`], the client gone).
pub fn past_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{test_app, token_of};
    use crate::service::Shared;
    use http_body_util::BodyExt;

    /// A server on 127.0.0.1 with `limits`; dropping the sender stops it.
    async fn live_server(
        limits: ServeLimits,
    ) -> (
        tempfile::TempDir,
        Shared,
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (d, app) = test_app().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let routes = router_with(app.clone(), Polls::new(limits.max_polls_per_token));
        tokio::spawn(serve_on(listener, routes, limits, async {
            let _ = stopped.await;
        }));
        (d, app, addr, stop)
    }

    /// Reads what the server sends until it closes the connection (at most `within`): the
    /// bytes, or `None` if it was still open then.
    async fn read_to_close(conn: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        read.ok().map(|()| got)
    }

    async fn send_raw(conn: &mut tokio::net::TcpStream, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        conn.write_all(bytes).await.unwrap();
        conn.flush().await.unwrap();
    }

    fn status_of(answer: &[u8]) -> u16 {
        let text = String::from_utf8_lossy(answer);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"))
    }

    #[tokio::test]
    async fn a_client_that_sends_half_a_head_is_dropped_within_the_header_timeout() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(400),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        for half in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "[..],
            b"G",
            b"",
        ] {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            send_raw(&mut conn, half).await;
            let t = std::time::Instant::now();
            let got = read_to_close(&mut conn, Duration::from_secs(5)).await;
            assert!(got.is_some(), "{half:?}: still open after 5 s");
            assert!(
                t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3),
                "{half:?}: closed after {:?}",
                t.elapsed()
            );
        }
        // A whole request on a fresh connection is answered as ever.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(
            &mut conn,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 200);
    }

    /// `GET /healthz` on a fresh connection: the answer, or `None` if none came within 5 s.
    async fn healthz_on_a_fresh_connection(addr: std::net::SocketAddr) -> Option<Vec<u8>> {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(
            &mut conn,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        read_to_close(&mut conn, Duration::from_secs(5)).await
    }

    /// A connection to `addr` whose receive buffer is as small as the kernel allows.
    async fn tiny_window(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        socket.connect(addr).await.unwrap()
    }

    const BIG: &[u8] = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn a_full_server_refuses_new_connections_at_once_and_serves_them_once_one_ends() {
        let limits = ServeLimits {
            max_connections: 1,
            header_timeout: Duration::from_millis(800),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The only connection allowed is held: answered 503 at once, not left in the backlog.
        let t = std::time::Instant::now();
        let got = healthz_on_a_fresh_connection(addr)
            .await
            .expect("a connection past the cap is answered");
        assert_eq!(status_of(&got), 503, "{}", String::from_utf8_lossy(&got));
        assert!(String::from_utf8_lossy(&got).contains("Retry-After: 1"));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Once the idle one is closed (the header timeout), its place is taken again.
        assert!(
            read_to_close(&mut idle, Duration::from_secs(2))
                .await
                .is_some()
        );
        let got = healthz_on_a_fresh_connection(addr).await.unwrap();
        assert_eq!(status_of(&got), 200);
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped_within_the_write_timeout() {
        let limits = ServeLimits {
            max_connections: 1,
            write_timeout: Duration::from_secs(1),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        // Pipelines large answers into a closed window and never reads one; the header timeout
        // never fires, since the next head is always there.
        let (_never_read, mut w) = tiny_window(addr).await.into_split();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let many = BIG.repeat(100);
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_secs(30) {
                if w.write_all(&many).await.is_err() {
                    return Some(t.elapsed());
                }
            }
            None
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = healthz_on_a_fresh_connection(addr)
            .await
            .expect("answered while the only place is held");
        assert_eq!(status_of(&got), 503);
        let t = std::time::Instant::now();
        let served = loop {
            let got = healthz_on_a_fresh_connection(addr)
                .await
                .expect("answered while the only place is held");
            if status_of(&got) == 200 {
                break t.elapsed();
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(served < Duration::from_secs(6), "served after {served:?}");
        let cut = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends")
            .unwrap();
        assert!(cut.is_some(), "the connection that never reads was closed");
    }

    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_not_cut() {
        use tokio::io::AsyncReadExt;
        let limits = ServeLimits {
            write_timeout: Duration::from_millis(500),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        let mut conn = tiny_window(addr).await;
        // About 90 KiB of answers, more than the server's send buffer takes at first.
        let mut requests = BIG.repeat(2);
        requests.extend_from_slice(
            b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        send_raw(&mut conn, &requests).await;
        // What the window holds every 20 ms: every write waits, none for 500 ms.
        let t = std::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 16 << 10];
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            match conn.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("cut after {:?}, {} bytes: {e}", t.elapsed(), got.len()),
            }
            assert!(t.elapsed() < Duration::from_secs(60), "{} bytes", got.len());
        }
        let answers = String::from_utf8_lossy(&got)
            .matches("HTTP/1.1 200")
            .count();
        assert_eq!(answers, 3, "{} bytes in {:?}", got.len(), t.elapsed());
        assert!(
            t.elapsed() > Duration::from_secs(1),
            "the server never waited for the reader: {:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share_of_connections() {
        let limits = ServeLimits {
            max_connections_per_ip: 2,
            cap_loopback: true,
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        let got = healthz_on_a_fresh_connection(addr)
            .await
            .expect("the third is answered at once");
        assert_eq!(status_of(&got), 429, "{}", String::from_utf8_lossy(&got));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let got = healthz_on_a_fresh_connection(addr).await.unwrap();
        assert_eq!(status_of(&got), 200, "a place given back is taken again");
        // Loopback peers (a reverse proxy on this host) are not capped by default.
        let (_d, _app, addr, _stop) = live_server(ServeLimits {
            max_connections_per_ip: 2,
            ..ServeLimits::default()
        })
        .await;
        let _held: Vec<_> =
            futures::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(addr))).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = healthz_on_a_fresh_connection(addr).await.unwrap();
        assert_eq!(status_of(&got), 200);
    }

    #[test]
    fn peers_are_counted_by_address_and_ipv6_by_its_64() {
        let peers = Arc::new(Peers::new(1, false));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let a = Peers::take(&peers, ip("192.0.2.1")).unwrap();
        assert!(Peers::take(&peers, ip("192.0.2.1")).is_none());
        assert!(
            Peers::take(&peers, ip("::ffff:192.0.2.1")).is_none(),
            "mapped"
        );
        let _b = Peers::take(&peers, ip("192.0.2.2")).unwrap();
        let _c = Peers::take(&peers, ip("2001:db8::1")).unwrap();
        assert!(
            Peers::take(&peers, ip("2001:db8::ffff:2")).is_none(),
            "same /64"
        );
        let _d = Peers::take(&peers, ip("2001:db8:0:1::1")).unwrap();
        let _loopback: Vec<_> = (0..5)
            .map(|_| Peers::take(&peers, ip("127.0.0.1")).unwrap())
            .collect();
        drop(a);
        assert!(Peers::take(&peers, ip("192.0.2.1")).is_some());
        assert_eq!(peers.open.lock().unwrap().len(), 3, "no loopback entry");
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_and_a_slow_one_that_keeps_its_pace_is_not() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(300),
            body_grace: Duration::from_millis(300),
            min_body_rate: 1000,
            ..ServeLimits::default()
        };
        let (_d, app, addr, _stop) = live_server(limits).await;
        let runner = token_of(&app, "volunteer", "runner").await;
        let head = |len: usize| {
            format!(
                "POST /api/v1/runner/register HTTP/1.1\r\nHost: x\r\nConstruir-Protocol: 1\r\n\
                 Authorization: Bearer {runner}\r\nContent-Type: application/json\r\n\
                 Content-Length: {len}\r\nConnection: close\r\n\r\n"
            )
        };
        // 10 bytes of 100, then nothing.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(&mut conn, head(100).as_bytes()).await;
        send_raw(&mut conn, br#"{"name": "#).await;
        let t = std::time::Instant::now();
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .expect("the stalled request was cut");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status_of(&got), 400, "{text}");
        assert!(
            text.contains("bad-request") && text.contains("slower"),
            "{text}"
        );
        // 3000 bytes at 3000 a second: well past the grace, never behind the pace; and the
        // header timeout does not cut a request whose head has come.
        let body = format!(r#"{{"name": "home"{}}}"#, " ".repeat(3000 - 16));
        assert_eq!(body.len(), 3000);
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(&mut conn, head(body.len()).as_bytes()).await;
        for piece in body.as_bytes().chunks(150) {
            send_raw(&mut conn, piece).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 200, "{}", String::from_utf8_lossy(&got));
        assert!(String::from_utf8_lossy(&got).contains("runner_id"));
    }

    #[tokio::test]
    async fn a_long_poll_outlasts_the_header_and_write_timeouts() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(300),
            body_grace: Duration::from_millis(300),
            ..ServeLimits::default()
        };
        let (_d, app, addr, _stop) = live_server(limits).await;
        let token = token_of(&app, "volunteer", "runner").await;
        let user = app.db.ensure_user("volunteer").await.unwrap();
        let runner = app.db.register_runner(user, "home").await.unwrap();
        let claim = serde_json::json!({"wait_s": 2, "capabilities": {
            "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
            "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
            "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
            "free_slots": 1, "free_memory_mib": 4096}})
        .to_string();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /api/v1/runner/claim HTTP/1.1\r\nHost: x\r\nConstruir-Protocol: 1\r\n\
             Authorization: Bearer {token}\r\nConstruir-Runner: {runner}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{claim}",
            claim.len()
        );
        send_raw(&mut conn, request.as_bytes()).await;
        let t = std::time::Instant::now();
        let got = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 204, "{}", String::from_utf8_lossy(&got));
        assert!(
            t.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn serve_settings_have_sane_defaults_and_floors() {
        let d = ServeArgs::default().resolve();
        assert_eq!(d, ServeLimits::default());
        assert!(
            d.max_connections > 1000,
            "1,000 idle long-polling runners fit"
        );
        let zero = ServeArgs {
            max_connections: Some(0),
            max_connections_per_ip: Some(0),
            header_timeout: Some(0),
            write_timeout: Some(0),
            min_body_rate: Some(0),
            body_grace: Some(0),
            body_idle: Some(0),
            max_polls_per_token: Some(0),
        }
        .resolve();
        assert_eq!(
            (
                zero.max_connections,
                zero.max_connections_per_ip,
                zero.header_timeout,
                zero.write_timeout,
                zero.min_body_rate,
                zero.max_polls_per_token
            ),
            (1, 1, Duration::from_secs(1), Duration::from_secs(1), 1, 1)
        );
        // A grace of 0 would fail every body not already buffered at its first wait.
        assert_eq!(zero.body_grace, Duration::from_secs(1));
        assert_eq!(zero.body_idle, Duration::from_secs(1));
        assert_eq!(d.body_idle, Duration::from_secs(60));
        assert!(!zero.cap_loopback);
    }

    /// A client that sends 10 bytes 20 ms after each time it is asked, and then no more.
    struct Prompt {
        left: usize,
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl HttpBody for Prompt {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
            std::task::ready!(wait.as_mut().poll(cx));
            self.wait = None;
            self.left -= 1;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"0123456789",
            )))))
        }
    }

    #[tokio::test]
    async fn min_rate_counts_only_the_time_spent_waiting_for_the_client() {
        let pace = Pace {
            grace: Duration::from_millis(100),
            bytes_per_s: 1000,
            idle: Duration::from_secs(60),
        };
        // The handler takes 150 ms over each piece (a slow disk): 750 ms in all, far past the
        // grace and the pieces' credit, yet the client kept every appointment within 20 ms.
        let mut body = MinRate::new(
            Prompt {
                left: 5,
                wait: None,
            },
            pace,
        );
        let mut pieces = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("the client is prompt");
            pieces += 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        assert_eq!(pieces, 5);
        // A client that stops sending is still cut once the grace is used up.
        let stalled = futures::stream::pending::<Result<http_body::Frame<Bytes>, axum::BoxError>>();
        let mut body = MinRate::new(http_body_util::StreamBody::new(stalled), pace);
        let t = std::time::Instant::now();
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(e.is::<TooSlow>(), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t.elapsed()
        );
    }

    /// A body that sends `first` at once, then what `then` yields.
    fn body_of(
        first: usize,
        then: impl futures::Stream<Item = Result<http_body::Frame<Bytes>, axum::BoxError>>
        + Send
        + 'static,
    ) -> impl HttpBody<Data = Bytes, Error = axum::BoxError> + Unpin {
        use futures::StreamExt as _;
        let first =
            futures::stream::iter([Ok(http_body::Frame::data(Bytes::from(vec![b'x'; first])))]);
        http_body_util::StreamBody::new(Box::pin(first.chain(then)))
    }

    /// A megabyte at once (1,000 s of credit at 1,000 bytes a second), then nothing.
    #[tokio::test]
    async fn a_body_that_sends_fast_then_stalls_is_cut_within_the_idle_time() {
        let pace = Pace {
            grace: Duration::from_millis(100),
            bytes_per_s: 1000,
            idle: Duration::from_millis(300),
        };
        let mut body = MinRate::new(body_of(1 << 20, futures::stream::pending()), pace);
        body.frame().await.unwrap().expect("the fast start");
        let t = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(3), body.frame())
            .await
            .expect("cut within the idle time, whatever the credit")
            .unwrap()
            .unwrap_err();
        assert!(e.is::<TooSlow>(), "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }

    /// A megabyte at once, then a byte every 100 ms: each wait is under the idle time, but the
    /// fast start banks at most the idle time's worth, so the trickle is cut soon.
    #[tokio::test]
    async fn a_fast_start_does_not_buy_a_trickle_hours_of_credit() {
        let pace = Pace {
            grace: Duration::from_millis(100),
            bytes_per_s: 1000,
            idle: Duration::from_millis(300),
        };
        let trickle = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok(http_body::Frame::data(Bytes::from_static(b"x"))), ()))
        });
        let mut body = MinRate::new(body_of(1 << 20, trickle), pace);
        let t = std::time::Instant::now();
        let mut pieces = 0;
        let e = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match body.frame().await.unwrap() {
                    Ok(_) => pieces += 1,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the trickle was cut");
        assert!(e.is::<TooSlow>(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(pieces >= 3, "{pieces}: the fast start bought some waiting");
        // A body that keeps the pace after a fast start is never cut: 10 bytes every 5 ms is
        // twice the rate.
        let paced = futures::stream::unfold(0, |n| async move {
            (n < 200).then_some(())?;
            tokio::time::sleep(Duration::from_millis(5)).await;
            Some((
                Ok(http_body::Frame::data(Bytes::from_static(b"0123456789"))),
                n + 1,
            ))
        });
        let mut body = MinRate::new(body_of(1 << 20, paced), pace);
        let mut pieces = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("the body keeps its pace");
            pieces += 1;
        }
        assert_eq!(pieces, 201);
    }

    #[tokio::test]
    async fn a_live_body_that_stalls_is_cut_after_body_idle_whatever_its_grace() {
        let limits = ServeLimits {
            body_grace: Duration::from_secs(20),
            body_idle: Duration::from_millis(300),
            ..ServeLimits::default()
        };
        let (_d, app, addr, _stop) = live_server(limits).await;
        let runner = token_of(&app, "volunteer", "runner").await;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /api/v1/runner/register HTTP/1.1\r\nHost: x\r\nConstruir-Protocol: 1\r\n\
             Authorization: Bearer {runner}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\nConnection: close\r\n\r\n"
        );
        send_raw(&mut conn, head.as_bytes()).await;
        send_raw(&mut conn, br#"{"name": "#).await;
        let t = std::time::Instant::now();
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .expect("the stalled request was cut");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status_of(&got), 400, "{text}");
        assert!(text.contains("slower"), "{text}");
    }

    #[test]
    fn connections_fit_in_the_open_file_limit() {
        // The usual soft limit: 256 kept for the database, blobs and temp files.
        assert_eq!(connections_within(4096, 1024), 768);
        assert_eq!(connections_within(4096, 65536), 4096);
        assert_eq!(connections_within(4096, u64::MAX), 4096, "unlimited");
        assert_eq!(connections_within(100, 1024), 100);
        // A tiny limit keeps half for connections, and one connection at the least.
        assert_eq!(connections_within(4096, 300), 150);
        assert_eq!(connections_within(4096, 0), 1);
        // Raising the limit never lowers what was in force, and the clamp uses the raised one.
        let mut before = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the `rlimit` it is given, which lives for the call.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) };
        assert_eq!(read, 0, "{}", std::io::Error::last_os_error());
        let now = raise_open_files().expect("the limit is read");
        assert!(now >= before.rlim_cur, "{now} < {}", before.rlim_cur);
        assert!(now <= before.rlim_max, "{now} > {}", before.rlim_max);
        let limited = within_open_files(ServeLimits {
            max_connections: usize::MAX,
            ..ServeLimits::default()
        });
        assert_eq!(limited.max_connections, connections_within(usize::MAX, now));
    }

    /// The unit's numbers against the code's: systemd must not kill a stop mid-drain, and the
    /// open-file limit must leave the default --max-connections whole.
    #[test]
    fn the_unit_outlasts_the_drain_and_has_files_for_every_connection() {
        let unit = include_str!("../construir-server.service");
        let setting = |key: &str| -> u64 {
            let lines: Vec<_> = unit
                .lines()
                .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .collect();
            assert_eq!(lines.len(), 1, "{key}= once in the unit");
            lines[0]
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{key}: {e}"))
        };
        let stop = Duration::from_secs(setting("TimeoutStopSec"));
        assert!(
            stop >= DRAIN + Duration::from_secs(5),
            "TimeoutStopSec {stop:?} does not outlast DRAIN {DRAIN:?}"
        );
        let files = setting("LimitNOFILE");
        let d = ServeLimits::default();
        assert_eq!(
            connections_within(d.max_connections, files),
            d.max_connections
        );
    }

    #[tokio::test]
    async fn a_body_past_its_limit_is_told_from_one_cut_short() {
        let e = axum::body::to_bytes(Body::from(vec![0u8; 20]), 10)
            .await
            .unwrap_err();
        assert!(past_limit(&e), "{e}");
        let stalled = futures::stream::pending::<Result<http_body::Frame<Bytes>, axum::BoxError>>();
        let pace = Pace {
            grace: Duration::from_millis(50),
            bytes_per_s: 1000,
            idle: Duration::from_secs(60),
        };
        let slow = Body::new(MinRate::new(http_body_util::StreamBody::new(stalled), pace));
        let e = axum::body::to_bytes(slow, 10).await.unwrap_err();
        assert!(!past_limit(&e), "{e}");
        assert!(e.to_string().contains("slower"), "{e}");
    }
}
