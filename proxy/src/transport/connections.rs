//! Protections of the proxy's listeners against clients that hold connections open or
//! flood them: time bounds on reading a request's head and body, an idle bound between
//! requests, a cap on open connections (with a clear refusal), and back-off with a
//! rate-limited log line when `accept` itself fails (e.g. out of file descriptors).
//!
//! The serving loop that uses these lives in `server::serve`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Default cap on open client connections per listener (lowered to fit the open-file limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// File descriptors kept free for everything that is not a client connection (listeners,
/// the runtime, policy files, child processes' pipes).
const FD_RESERVE: u64 = 32;
/// Most refusals written at once; beyond that, connections over the cap are closed at once.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 8;
/// First wait after a failed `accept`; doubled on each further failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Time and count bounds of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive whole within this time (HTTP/1.1; hyper starts the clock
    /// when it waits for a head, so it also bounds the wait for the next request on a
    /// keep-alive connection).
    pub header_read: Duration,
    /// A request body must arrive whole within this time of its head.
    pub body_read: Duration,
    /// A connection with no request in flight (no call waiting, no response or stream
    /// being sent) for this long is closed.
    pub idle: Duration,
    /// Most open client connections; more are refused (503) and closed.
    pub max_connections: usize,
}

/// The cap on connections: `requested` when given, else [`DEFAULT_MAX_CONNECTIONS`]
/// lowered so that two descriptors per connection (the client's and one upstream) plus a
/// reserve fit the soft open-file limit `nofile`. Returns the cap and, when the default was
/// lowered or the request exceeds what the limit allows, a note to log.
pub fn connection_cap(requested: Option<usize>, nofile: Option<u64>) -> (usize, Option<String>) {
    let fits = nofile.map(|n| usize::try_from(n.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX).max(1));
    match (requested, fits) {
        (Some(r), Some(f)) if r > f => (
            r.max(1),
            Some(format!(
                "--max-connections {r} exceeds what the open-file limit ({} descriptors) holds (about {f}); accept errors will be backed off and logged at most once a second",
                nofile.unwrap_or_default()
            )),
        ),
        (Some(r), _) => (r.max(1), None),
        (None, Some(f)) if f < DEFAULT_MAX_CONNECTIONS => (
            f,
            Some(format!(
                "at most {f} client connections per listener (the open-file limit is {} descriptors; raise it or set --max-connections)",
                nofile.unwrap_or_default()
            )),
        ),
        (None, _) => (DEFAULT_MAX_CONNECTIONS, None),
    }
}

/// The soft open-file limit of this process (Linux: `/proc/self/limits`), if known.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "Max open files            1024                 1048576              files"
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// At most one log line per interval; the others are counted and reported with the next.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None, suppressed: 0 }
    }

    /// `Some(n)`: log now, mentioning the `n` lines suppressed since the last one;
    /// `None`: stay quiet (counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// What to do after `accept` failed: wait (10 ms doubling to 1 s while failures go on) so a
/// persistent error (no file descriptors left) does not spin, and log at most once a second.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
    log: LogLimiter,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: MIN_BACKOFF, log: LogLimiter::new(Duration::from_secs(1)) }
    }
}

impl AcceptBackoff {
    /// A connection was accepted: the next failure waits the least again.
    pub fn success(&mut self) {
        self.next = MIN_BACKOFF;
    }

    /// An accept failed with `kind` at `now`: how long to wait before accepting again, and
    /// whether to log (with the count of failures not logged since the last line).
    pub fn failure(&mut self, kind: io::ErrorKind, now: Instant) -> (Duration, Option<u64>) {
        let log = self.log.allow(now);
        // A connection the peer reset before it was accepted says nothing about the listener.
        if matches!(kind, io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) {
            return (Duration::ZERO, log);
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        (wait, log)
    }
}

/// Counts a connection's requests in flight (from head to the end of the response body,
/// so a waiting call or an open SSE stream is in flight) for the idle bound.
///
/// Per request this is two atomic updates and a clock read — no wake-up and no timer: the
/// connection checks it on a coarse tick (a quarter of the idle bound), so an idle
/// connection is closed between `idle` and `idle × 1.25` after its last request ended.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    in_flight: AtomicUsize,
    /// When the last request ended, in milliseconds since [`Counts::epoch`].
    last_end_ms: AtomicU64,
    epoch: OnceEpoch,
}

/// The instant a connection's clock counts from (its first use).
#[derive(Debug)]
struct OnceEpoch(Instant);

impl Default for OnceEpoch {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Counts {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// One request in flight; dropped when its response ends (or the request is abandoned).
#[derive(Debug)]
pub struct InFlight(Arc<Counts>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_end_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    pub fn begin(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.0.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle` in a row.
    pub async fn idle_for(&self, idle: Duration) {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let c = &self.0;
            if c.in_flight.load(Ordering::Acquire) == 0
                && c.now_ms().saturating_sub(c.last_end_ms.load(Ordering::Relaxed)) >= idle_ms
            {
                return;
            }
        }
    }
}

/// A request body that must arrive whole within a deadline; past it, reading fails and
/// [`ReqBody::timed_out`] tells the handler to answer 408 and close the connection.
#[derive(Debug)]
pub struct ReqBody {
    inner: Incoming,
    /// When the whole body must have arrived (from the head).
    until: tokio::time::Instant,
    /// Armed only when the body is not all there at the first read: most bodies arrive with
    /// their head and never need a timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl ReqBody {
    pub fn new(inner: Incoming, limit: Duration) -> Self {
        Self { inner, until: tokio::time::Instant::now() + limit, deadline: None, timed_out: Arc::default() }
    }

    /// Set once reading this body ran past its deadline.
    pub fn timed_out(&self) -> Arc<AtomicBool> {
        self.timed_out.clone()
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::TimedOut, "request body read timed out"))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(io::Error::other(e)))),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let until = this.until;
                let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                let expired = deadline.as_mut().poll(cx).is_ready();
                if expired {
                    this.timed_out.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::TimedOut, "request body read timed out"))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request counted as in flight until it ends.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Self { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Refuses a connection over the cap: a 503 with a JSON-RPC error and `Connection: close`
/// when few refusals are being written, else an immediate close. Never blocks the caller.
pub fn refuse(stream: TcpStream, writers: &Arc<Semaphore>, max: usize) {
    let Ok(permit) = writers.clone().try_acquire_owned() else {
        drop(stream);
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let body = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32000,
            "message": format!("too many connections: this proxy serves at most {max} at once (--max-connections); retry later")}})
        .to_string();
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let mut stream = stream;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent (its request) so closing does not reset the
            // connection before the client has read the refusal.
            let mut sink = [0u8; 4096];
            let mut total = 0usize;
            while total < 64 * 1024 {
                match stream.read(&mut sink).await? {
                    0 => break,
                    n => total += n,
                }
            }
            Ok::<_, io::Error>(())
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let now = Instant::now();
        let waits: Vec<Duration> = (0..10).map(|_| b.failure(io::ErrorKind::Other, now).0).collect();
        assert_eq!(waits[0], Duration::from_millis(10));
        assert_eq!(waits[1], Duration::from_millis(20));
        assert_eq!(waits[6], Duration::from_millis(640));
        assert_eq!(waits[7], MAX_BACKOFF);
        assert_eq!(waits[9], MAX_BACKOFF);
        b.success();
        assert_eq!(b.failure(io::ErrorKind::Other, now).0, MIN_BACKOFF);
        // A reset before accept is the peer's doing, not the listener's.
        assert_eq!(b.failure(io::ErrorKind::ConnectionAborted, now).0, Duration::ZERO);
    }

    #[test]
    fn log_limiter_says_once_per_interval_and_counts_the_rest() {
        let mut l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        let logged: Vec<_> = (1..1000).filter_map(|i| l.allow(t0 + Duration::from_micros(i))).collect();
        assert!(logged.is_empty(), "{logged:?}");
        assert_eq!(l.allow(t0 + Duration::from_secs(1)), Some(999));
        assert_eq!(l.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(3)), Some(1));
    }

    #[test]
    fn connection_cap_fits_the_open_file_limit() {
        assert_eq!(connection_cap(None, None), (DEFAULT_MAX_CONNECTIONS, None));
        assert_eq!(connection_cap(None, Some(1_048_576)).0, DEFAULT_MAX_CONNECTIONS);
        let (cap, note) = connection_cap(None, Some(64));
        assert_eq!(cap, 16);
        assert!(note.is_some_and(|n| n.contains("64")));
        assert_eq!(connection_cap(None, Some(1024)).0, 496);
        assert_eq!(connection_cap(None, Some(10)).0, 1);
        // An explicit value is kept, with a warning when it cannot fit.
        assert_eq!(connection_cap(Some(100), Some(1024)), (100, None));
        let (cap, note) = connection_cap(Some(1000), Some(64));
        assert_eq!(cap, 1000);
        assert!(note.is_some_and(|n| n.contains("exceeds")));
        assert_eq!(connection_cap(Some(0), None).0, 1);
    }

    #[test]
    fn open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max processes             63336                63336                processes\n\
                    Max open files            256                  524288               files\n";
        assert_eq!(parse_open_file_limit(text), Some(256));
        assert_eq!(parse_open_file_limit("Max open files            unlimited   unlimited   files\n"), None);
        assert_eq!(parse_open_file_limit(""), None);
    }

    #[tokio::test]
    async fn idle_waits_for_no_request_in_flight() {
        let a = Activity::default();
        let req = a.begin();
        let idle = a.clone();
        let waiter = tokio::spawn(async move { idle.idle_for(Duration::from_millis(100)).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a request in flight is not idle");
        drop(req);
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("idle once no request is in flight")
            .expect("the waiter ran");
    }
}
