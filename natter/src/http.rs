//! The public listener: HTTP/1.1 connections with time-outs, under the one
//! connection cap the WebSocket gateway shares, and a shutdown bounded by
//! the drain time.
//!
//! Every accepted TCP connection takes a slot of `comet.max_connections`
//! first (over the cap it gets a `503 overloaded` and is closed at once); a
//! WebSocket upgrade carries that slot on into the gateway
//! ([`natter_comet::ConnectionSlot`]), so plain HTTP and WebSocket
//! connections count against one cap.
//!
//! The time-outs follow Go's `ReadHeaderTimeout`/`IdleTimeout` split, which
//! hyper's own `header_read_timeout` cannot give: it runs from the moment
//! hyper waits for a head, so it would close every idle keep-alive
//! connection after the header time-out. Here a small watchdog per
//! connection decides instead, from what the socket and the requests did:
//!
//! - a new connection must deliver its first head within
//!   `http.header_read_timeout_ms`;
//! - a keep-alive connection may wait `http.idle_timeout_ms` for its next
//!   request, whose head must then arrive within the header time-out of its
//!   first byte;
//! - a request must be answered within `http.request_timeout_ms`, and its
//!   body may not pause for longer than `http.body_timeout_ms`: either is
//!   answered with `408 request_timeout` and the connection closes.
//!
//! Only HTTP/1.1 is served: no h2c, whose many streams per connection would
//! multiply every per-connection bound here.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response};
use axum::response::IntoResponse as _;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use natter_comet::ConnectionSlot;
use natter_node::config::{CometConfig, HttpConfig};
use natter_node::telemetry::register;
use natter_node::Shutdown;
use natter_proto::api::ErrorBody;
use natter_proto::ErrorCode;
use natter_record::http::ApiError;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The time-outs and the drain time of the public listener.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub request: Duration,
    pub body: Duration,
    pub drain: Duration,
}

impl Limits {
    pub(crate) fn new(http: &HttpConfig, comet: &CometConfig) -> Limits {
        Limits {
            header_read: Duration::from_millis(http.header_read_timeout_ms),
            idle: Duration::from_millis(http.idle_timeout_ms),
            request: Duration::from_millis(http.request_timeout_ms),
            body: Duration::from_millis(http.body_timeout_ms),
            drain: Duration::from_millis(comet.drain_ms),
        }
    }
}

/// Why the server ended an HTTP connection (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    HeaderTimeout,
    IdleTimeout,
    BodyTimeout,
    RequestTimeout,
    Overloaded,
    Drain,
}

impl Closed {
    const ALL: [Closed; 6] = [
        Closed::HeaderTimeout,
        Closed::IdleTimeout,
        Closed::BodyTimeout,
        Closed::RequestTimeout,
        Closed::Overloaded,
        Closed::Drain,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::IdleTimeout => "idle_timeout",
            Closed::BodyTimeout => "body_timeout",
            Closed::RequestTimeout => "request_timeout",
            Closed::Overloaded => "overloaded",
            Closed::Drain => "drain",
        }
    }
}

/// HTTP connection metrics.
#[derive(Clone)]
pub(crate) struct Metrics {
    open: IntGauge,
    closed: Vec<(Closed, IntCounter)>,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> Metrics {
        let open = register(
            registry,
            IntGauge::new(
                "natter_http_connections",
                "Open HTTP connections (not yet upgraded to WebSocket).",
            )
            .expect("valid gauge"),
        );
        let closed = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "natter_http_closed_total",
                    "HTTP connections the server ended or refused, by reason.",
                ),
                &["reason"],
            )
            .expect("valid counter"),
        );
        Metrics {
            open,
            closed: Closed::ALL
                .iter()
                .map(|&c| (c, closed.with_label_values(&[c.as_str()])))
                .collect(),
        }
    }

    fn closed(&self, reason: Closed) {
        if let Some((_, counter)) = self.closed.iter().find(|(c, _)| *c == reason) {
            counter.inc();
        }
    }
}

/// Serves `app` on `listener` until `stop`, then lets open connections
/// finish for the drain time and drops those still open.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    slots: Arc<Semaphore>,
    limits: Limits,
    stop: Shutdown,
    metrics: Metrics,
) {
    let app = TowerToHyperService::new(app);
    let connections = TaskTracker::new();
    let abort = CancellationToken::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e, &stop).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.closed(Closed::Overloaded);
            refuse(tcp);
            continue;
        };
        // Pushes are small writes that must leave at once: no Nagle delay
        // behind an unacknowledged earlier one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = Connection {
            slot: ConnectionSlot::new(permit),
            limits,
            stop: stop.clone(),
            abort: abort.clone(),
            metrics: metrics.clone(),
        };
        connections.spawn(connection.run(tcp, app.clone()));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain time-out; dropping the HTTP connections still open"
        );
        abort.cancel();
        connections.wait().await;
    }
}

/// Warns when the connection cap is above what the process may open:
/// descriptors would run out before the cap refuses anyone, and then
/// accepting fails for every client alike. (The soft limit is not raised
/// here; the service manager or `ulimit -n` sets it.)
pub(crate) fn check_open_file_limit(max_connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        // Room for the stores, the listeners and the role-to-role plane.
        if max_connections.saturating_add(256) > soft {
            tracing::warn!(
                max_connections,
                open_file_limit = soft,
                "comet.max_connections is above the open-file limit (less 256 for the rest); raise `ulimit -n` or lower the cap"
            );
        }
    }
}

/// An accept that failed: a connection that went away is nothing; anything
/// else (out of descriptors, say) is waited out briefly rather than retried
/// in a busy loop.
async fn accept_failed(e: io::Error, stop: &Shutdown) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        _ = stop.cancelled() => {}
    }
}

/// The answer to a connection over the cap, written at once, without
/// reading the request: the descriptor is given back right away.
fn overloaded_response() -> Vec<u8> {
    let code = ErrorCode::Overloaded;
    let body = serde_json::to_string(&ErrorBody::new(code, "connection limit reached"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {} Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{}",
        code.http_status(),
        body.len(),
        body
    )
    .into_bytes()
}

fn refuse(tcp: TcpStream) {
    let _ = tcp.try_write(&overloaded_response());
    // Whatever the client sent already is read and dropped, so that closing
    // sends a FIN after the answer rather than a reset that may discard it.
    let mut scratch = [0u8; 4096];
    let _ = tcp.try_read(&mut scratch);
}

/// One accepted connection.
struct Connection {
    slot: ConnectionSlot,
    limits: Limits,
    stop: Shutdown,
    abort: CancellationToken,
    metrics: Metrics,
}

impl Connection {
    async fn run(self, tcp: TcpStream, app: TowerToHyperService<Router>) {
        let Connection {
            slot,
            limits,
            stop,
            abort,
            metrics,
        } = self;
        metrics.open.inc();
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(Watched {
            io: tcp,
            activity: activity.clone(),
        });
        let service = {
            let (activity, metrics) = (activity.clone(), metrics.clone());
            hyper::service::service_fn(move |request| {
                respond(
                    request,
                    app.clone(),
                    slot.clone(),
                    limits,
                    activity.clone(),
                    metrics.clone(),
                )
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The watchdog below times heads: hyper's own time-out would also
        // cut idle keep-alive connections.
        builder.keep_alive(true).header_read_timeout(None);
        let connection = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(connection);
        let mut watchdog = Watchdog::new(&activity, limits);
        let timer = tokio::time::sleep_until(watchdog.next);
        tokio::pin!(timer);
        let mut graceful = false;
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "HTTP connection failed");
                    }
                    break;
                }
                _ = &mut timer => match watchdog.check(&activity, Instant::now()) {
                    Ok(next) => timer.as_mut().reset(next),
                    Err(reason) => {
                        tracing::debug!(reason = reason.as_str(), "HTTP connection closed");
                        metrics.closed(reason);
                        break;
                    }
                },
                _ = stop.cancelled(), if !graceful => {
                    // Idle connections close now; a request in progress
                    // finishes first, within the drain time.
                    connection.as_mut().graceful_shutdown();
                    graceful = true;
                }
                _ = abort.cancelled() => {
                    metrics.closed(Closed::Drain);
                    break;
                }
            }
        }
        metrics.open.dec();
        // Dropping the connection closes the socket, unless it became a
        // WebSocket, which took the slot along.
    }
}

/// Runs one request through `app` under the request and body time-outs.
async fn respond(
    request: Request<Incoming>,
    app: TowerToHyperService<Router>,
    slot: ConnectionSlot,
    limits: Limits,
    activity: Arc<Activity>,
    metrics: Metrics,
) -> Result<Response<Body>, Infallible> {
    activity.begin();
    let stalled = Arc::new(AtomicBool::new(false));
    let mut request = request.map(|body| {
        Body::new(TimeoutBody {
            inner: body,
            limit: limits.body,
            sleep: None,
            stalled: stalled.clone(),
        })
    });
    request.extensions_mut().insert(slot);
    let answered =
        tokio::time::timeout(limits.request, hyper::service::Service::call(&app, request)).await;
    let response = match answered {
        Ok(Ok(response)) if !stalled.load(Ordering::Relaxed) => response,
        Ok(Ok(_)) => {
            metrics.closed(Closed::BodyTimeout);
            timed_out(format!(
                "the request body stalled for {} ms",
                limits.body.as_millis()
            ))
        }
        Ok(Err(never)) => match never {},
        Err(_) => {
            metrics.closed(Closed::RequestTimeout);
            timed_out(format!(
                "the request was not answered within {} ms",
                limits.request.as_millis()
            ))
        }
    };
    activity.end();
    Ok(response)
}

/// `408 request_timeout`, after which the connection closes: what is left
/// of the request on it cannot be told from the next one.
fn timed_out(message: String) -> Response<Body> {
    let mut response = ApiError::new(ErrorCode::RequestTimeout, message).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// What a connection's socket and requests did, for its watchdog. Times
/// are milliseconds since `epoch`, plus one (0: not set).
struct Activity {
    epoch: Instant,
    /// Requests being answered.
    busy: AtomicU32,
    /// Whether any request was read: the next one is a keep-alive one.
    served: AtomicBool,
    /// When the last answer was handed to hyper.
    idle_since: AtomicU64,
    /// When the first byte arrived since the last answer (0: none yet).
    head_started: AtomicU64,
    /// Bytes written; progress writing an answer is not idleness.
    written: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_millis(stamp.saturating_sub(1))
    }

    /// A head was read: the request is being answered.
    fn begin(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
    }

    /// The answer went to hyper: the connection waits for the next request.
    fn end(&self) {
        self.head_started.store(0, Ordering::Relaxed);
        self.idle_since.store(self.now(), Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Relaxed);
    }

    fn read(&self) {
        // One clock read per request, on its first byte.
        if self.head_started.load(Ordering::Relaxed) == 0 {
            let _ = self.head_started.compare_exchange(
                0,
                self.now(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}

/// The connection's deadline, recomputed when its timer fires.
struct Watchdog {
    limits: Limits,
    next: Instant,
    /// The last moment the connection was seen making progress while idle.
    quiet_since: Instant,
    written: u64,
}

impl Watchdog {
    fn new(activity: &Activity, limits: Limits) -> Watchdog {
        Watchdog {
            limits,
            next: activity.epoch + limits.header_read,
            quiet_since: activity.epoch,
            written: 0,
        }
    }

    /// The next time to look, or why the connection must close now.
    fn check(&mut self, activity: &Activity, now: Instant) -> Result<Instant, Closed> {
        let limits = self.limits;
        if activity.busy.load(Ordering::Relaxed) > 0 {
            // The request and body time-outs watch a request; look again
            // once it may be over.
            return Ok(now + limits.header_read.min(limits.idle));
        }
        let head = activity.head_started.load(Ordering::Relaxed);
        if head != 0 {
            let deadline = activity.at(head) + limits.header_read;
            return if now >= deadline {
                Err(Closed::HeaderTimeout)
            } else {
                Ok(deadline)
            };
        }
        let written = activity.written.load(Ordering::Relaxed);
        if written != self.written {
            // Still writing out an answer: not idle.
            self.written = written;
            self.quiet_since = now;
        }
        self.quiet_since = self
            .quiet_since
            .max(activity.at(activity.idle_since.load(Ordering::Relaxed)));
        let (limit, reason) = if activity.served.load(Ordering::Relaxed) {
            (limits.idle, Closed::IdleTimeout)
        } else {
            (limits.header_read, Closed::HeaderTimeout)
        };
        let deadline = self.quiet_since + limit;
        if now >= deadline {
            Err(reason)
        } else {
            Ok(deadline)
        }
    }
}

/// The TCP stream, reporting reads and writes to the watchdog.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read();
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.activity.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.activity.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request body that fails once no byte has arrived for `limit`.
struct TimeoutBody {
    inner: Incoming,
    limit: Duration,
    /// Armed while the body waits for bytes.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set when the body stalled, so that the answer is a time-out whatever
    /// the handler made of the failed read.
    stalled: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body stalled")]
struct BodyStalled;

impl hyper::body::Body for TimeoutBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let limit = this.limit;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.stalled.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyStalled))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        hyper::body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        hyper::body::Body::size_hint(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read: Duration::from_millis(100),
            idle: Duration::from_millis(1000),
            request: Duration::from_millis(5000),
            body: Duration::from_millis(500),
            drain: Duration::from_millis(100),
        }
    }

    #[test]
    fn a_new_connection_gets_the_header_time_out_and_a_served_one_the_idle_time_out() {
        let activity = Activity::new();
        let mut dog = Watchdog::new(&activity, limits());
        let t0 = activity.epoch;
        let ms = Duration::from_millis;
        assert_eq!(dog.check(&activity, t0 + ms(50)), Ok(t0 + ms(100)));
        assert_eq!(
            dog.check(&activity, t0 + ms(100)),
            Err(Closed::HeaderTimeout)
        );
        // A request was answered: idle from then on.
        activity.begin();
        assert!(dog.check(&activity, t0 + ms(100)).is_ok());
        activity.end();
        let idle_since = activity.at(activity.idle_since.load(Ordering::Relaxed));
        assert_eq!(
            dog.check(&activity, idle_since + ms(500)),
            Ok(idle_since + ms(1000))
        );
        assert_eq!(
            dog.check(&activity, idle_since + ms(1000)),
            Err(Closed::IdleTimeout)
        );
    }

    #[test]
    fn a_started_head_must_finish_within_the_header_time_out() {
        let activity = Activity::new();
        let mut dog = Watchdog::new(&activity, limits());
        activity.begin();
        activity.end();
        activity.read();
        let started = activity.at(activity.head_started.load(Ordering::Relaxed));
        // More bytes do not move the start.
        activity.read();
        assert_eq!(
            activity.at(activity.head_started.load(Ordering::Relaxed)),
            started
        );
        let ms = Duration::from_millis;
        assert_eq!(
            dog.check(&activity, started + ms(10)),
            Ok(started + ms(100))
        );
        assert_eq!(
            dog.check(&activity, started + ms(100)),
            Err(Closed::HeaderTimeout)
        );
    }

    #[test]
    fn writing_out_an_answer_is_not_idleness() {
        let activity = Activity::new();
        let mut dog = Watchdog::new(&activity, limits());
        activity.begin();
        activity.end();
        let t = activity.at(activity.idle_since.load(Ordering::Relaxed));
        let ms = Duration::from_millis;
        activity.written.store(10, Ordering::Relaxed);
        assert_eq!(dog.check(&activity, t + ms(900)), Ok(t + ms(1900)));
        assert_eq!(dog.check(&activity, t + ms(1900)), Err(Closed::IdleTimeout));
    }

    #[test]
    fn the_refusal_is_a_complete_503() {
        let text = String::from_utf8(overloaded_response()).expect("text");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let body: ErrorBody = serde_json::from_str(body).expect("JSON");
        assert_eq!(body.error_code(), Some(ErrorCode::Overloaded));
    }
}
