//! The comet role: the WebSocket gateway at `/sub`.
//!
//! Each connection goes through named phases — upgrade → authenticate →
//! register → work → clean up — in [`conn`]. The connection map is sharded
//! into buckets so pushes for many connections do not contend on one lock.
//! Everything is bounded: connections (a semaphore), each connection's
//! outbound queue and un-acked pushes (overflow closes the connection as a
//! slow consumer), frame sizes, malformed frames per connection.
//!
//! Comet is the only crate that holds sockets. It knows frames (through
//! `proto`) but not storage: every decision about messages is logic's.

mod conn;
mod metrics;
mod wire;
pub mod ws;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioIo;
use natter_node::config::CometConfig;
use natter_node::Shutdown;
use natter_proto::ErrorCode;
use natter_roles::{Gateway, LogicService, PushBatch};
use prometheus::Registry;
use tokio::io::WriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use metrics::Metrics;

/// Routes served by [`Comet::router`].
pub const ROUTES: &[(&str, &str)] = &[("get", "/sub")];

/// An upgraded connection.
type Socket = TokioIo<hyper::upgrade::Upgraded>;
/// A connection's outgoing side.
type Wire = wire::Wire<WriteHalf<Socket>>;

/// A connection's place under `comet.max_connections`. The listener takes
/// one for every TCP connection it accepts and hands it to each request as
/// an extension; a WebSocket upgrade takes it along, so plain HTTP and
/// WebSocket connections count against one cap.
#[derive(Clone)]
pub struct ConnectionSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl ConnectionSlot {
    pub fn new(permit: OwnedSemaphorePermit) -> ConnectionSlot {
        ConnectionSlot(Arc::new(Mutex::new(Some(permit))))
    }

    /// The permit, for the one request that keeps the connection.
    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How other tasks reach one connection.
#[derive(Clone)]
struct ConnHandle {
    /// The connection's socket: pushes are written straight into it.
    wire: Arc<Wire>,
    /// Push numbering and the un-acked pushes, shared by whoever pushes,
    /// the connection task (acks) and the node's resend round.
    pushes: Arc<Mutex<conn::Pushes>>,
    kill: CancellationToken,
    /// Raised by the resend round when a push ran out of retries; the
    /// connection's task checks and closes.
    overdue: Arc<tokio::sync::Notify>,
    reason: Arc<Mutex<Option<(ErrorCode, String)>>>,
    /// Set once authenticated; the renewal loop reports it to logic.
    session: Arc<std::sync::OnceLock<natter_roles::Session>>,
}

impl ConnHandle {
    fn kick(&self, code: ErrorCode, reason: &str) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason.to_string()));
        }
        self.kill.cancel();
    }
}

type Bucket = RwLock<HashMap<u64, ConnHandle>>;

struct Inner {
    node: Arc<str>,
    config: CometConfig,
    logic: Arc<dyn LogicService>,
    buckets: Vec<Bucket>,
    next_conn: AtomicU64,
    slots: Arc<Semaphore>,
    metrics: Metrics,
    shutdown: Shutdown,
    tasks: TaskTracker,
}

/// The gateway. Clone it freely; all clones are the same node.
#[derive(Clone)]
pub struct Comet {
    inner: Arc<Inner>,
}

impl Comet {
    pub fn new(
        node: &str,
        config: CometConfig,
        logic: Arc<dyn LogicService>,
        registry: &Registry,
        shutdown: Shutdown,
    ) -> Comet {
        let buckets = (0..config.buckets)
            .map(|_| RwLock::new(HashMap::new()))
            .collect();
        Comet {
            inner: Arc::new(Inner {
                node: Arc::from(node),
                slots: Arc::new(Semaphore::new(config.max_connections)),
                config,
                logic,
                buckets,
                next_conn: AtomicU64::new(first_conn_id()),
                metrics: Metrics::new(registry),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// The connection slots (`comet.max_connections`), shared with the
    /// listener that takes one per accepted connection.
    pub fn slots(&self) -> Arc<Semaphore> {
        self.inner.slots.clone()
    }

    /// The node id this gateway registers sessions under.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The sessions of every authenticated connection of this node.
    pub fn sessions(&self) -> Vec<natter_roles::Session> {
        let mut out = Vec::new();
        for bucket in &self.inner.buckets {
            let bucket = bucket.read().unwrap_or_else(|e| e.into_inner());
            out.extend(bucket.values().filter_map(|h| h.session.get().cloned()));
        }
        out
    }

    /// Renews this node's sessions with logic every `every` until shutdown,
    /// so that they outlive their TTL exactly as long as this process does.
    pub async fn renew_sessions(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            let sessions = self.sessions();
            if !sessions.is_empty() {
                self.inner.logic.heartbeat(&sessions).await;
            }
        }
    }

    /// Resends overdue pushes on every connection of this node, a round
    /// every quarter of `push_rto_ms`, until shutdown. One timer for the
    /// node rather than one per connection: an idle connection costs no
    /// wake-ups.
    pub async fn resend_pushes(self) {
        let rto = Duration::from_millis(self.inner.config.push_rto_ms);
        let mut tick = tokio::time::interval((rto / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            self.resend_round().await;
        }
    }

    /// One resend round over every connection, a bucket at a time.
    async fn resend_round(&self) {
        let inner = &self.inner;
        let now = tokio::time::Instant::now();
        let mut handles = Vec::new();
        for bucket in &inner.buckets {
            handles.clear();
            handles.extend(
                bucket
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned(),
            );
            for handle in &handles {
                let resent = handle
                    .pushes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resend(&handle.wire, inner, now);
                match resent {
                    conn::Resend::Sent(0) => {}
                    conn::Resend::Sent(n) => inner
                        .metrics
                        .pushes
                        .with_label_values(&["resend"])
                        .inc_by(n),
                    conn::Resend::OutOfRetries => handle.overdue.notify_one(),
                }
            }
            // Thousands of connections: let other tasks run between buckets.
            tokio::task::yield_now().await;
        }
    }

    /// The `/sub` route.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/sub", get(upgrade))
            .with_state(self.clone())
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.inner
            .buckets
            .iter()
            .map(|b| b.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Waits for every connection to close (they close themselves once
    /// shutdown is signalled), up to the configured drain time.
    pub async fn drain(&self) {
        self.inner.tasks.close();
        let grace = Duration::from_millis(self.inner.config.drain_ms);
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.connections(),
                "drain time-out; connections left open"
            );
        }
    }

    fn bucket(&self, conn: u64) -> &Bucket {
        &self.inner.buckets[(conn as usize) % self.inner.buckets.len()]
    }

    fn handle(&self, conn: u64) -> Option<ConnHandle> {
        self.bucket(conn)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&conn)
            .cloned()
    }
}

impl Gateway for Comet {
    fn push(&self, batch: PushBatch) {
        let inner = &self.inner;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(inner.config.push_rto_ms);
        let mut delivered = 0;
        for target in &batch.targets {
            let Some(pushes) = batch.slice(target) else {
                continue;
            };
            let conn = target.conn;
            // Queued under the bucket's read lock: no handle is cloned per push.
            let bucket = self.bucket(conn).read().unwrap_or_else(|e| e.into_inner());
            let Some(handle) = bucket.get(&conn) else {
                drop(bucket);
                // Gone since the lookup; the device syncs when it reconnects.
                inner
                    .metrics
                    .pushes
                    .with_label_values(&["no_connection"])
                    .inc_by(pushes.len() as u64);
                continue;
            };
            // Numbered and written here, in the caller: no hand-off to the
            // connection's task.
            let pushed = handle
                .pushes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(pushes, &handle.wire, inner, deadline);
            match pushed {
                Ok(written) => delivered += written,
                Err((code, reason)) => handle.kick(code, reason),
            }
        }
        // Once per push, when every connection of this node has it.
        if delivered > 0 {
            for push in batch.pushes.iter() {
                inner
                    .metrics
                    .ack_to_push
                    .observe(push.acked_at.elapsed().as_secs_f64());
            }
        }
    }

    fn kick(&self, conn: u64, code: ErrorCode, reason: &str) {
        if let Some(handle) = self.handle(conn) {
            handle.kick(code, reason);
        }
    }
}

/// Why a request to `/sub` is not a WebSocket handshake we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    NotUpgrade,
    Version,
    NoKey,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotUpgrade => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket")],
                "this is a WebSocket endpoint: upgrade to websocket",
            )
                .into_response(),
            Refusal::Version => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::SEC_WEBSOCKET_VERSION, "13")],
                "only WebSocket version 13 is supported",
            )
                .into_response(),
            Refusal::NoKey => (
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            )
                .into_response(),
        }
    }
}

/// The client's `Sec-WebSocket-Key`, once the request is checked to be a
/// WebSocket upgrade (RFC 6455, section 4.2.1).
fn handshake_key(headers: &HeaderMap) -> Result<HeaderValue, Refusal> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(Refusal::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(Refusal::Version);
    }
    // RFC 6455 4.1: the key is 16 random bytes in base64 (24 characters).
    use base64::Engine as _;
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key)
            if key.len() == 24
                && base64::engine::general_purpose::STANDARD
                    .decode(key.as_bytes())
                    .is_ok_and(|raw| raw.len() == 16) =>
        {
            Ok(key.clone())
        }
        _ => Err(Refusal::NoKey),
    }
}

async fn upgrade(State(comet): State<Comet>, mut request: Request) -> Response {
    let key = match handshake_key(request.headers()) {
        Ok(key) => key,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        )
            .into_response();
    };
    if comet.inner.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    // The connection's slot, taken when it was accepted; without one (a
    // listener that does not take them), a slot of its own.
    let permit = match request
        .extensions_mut()
        .remove::<ConnectionSlot>()
        .and_then(|slot| slot.take())
    {
        Some(permit) => Ok(permit),
        None => comet.inner.slots.clone().try_acquire_owned(),
    };
    let Ok(permit) = permit else {
        comet
            .inner
            .metrics
            .disconnects
            .with_label_values(&[ErrorCode::Overloaded.as_str()])
            .inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "connection limit reached").into_response();
    };
    // Bodies up to a few times the limit are read and answered with
    // `frame_too_large`; beyond that the connection closes with 1009.
    let max_message =
        comet.inner.config.max_body.saturating_mul(4).max(64 * 1024) + natter_proto::HEADER_LEN;
    let tasks = comet.inner.tasks.clone();
    tokio::spawn(tasks.track_future(async move {
        match on_upgrade.await {
            Ok(upgraded) => conn::run(comet, TokioIo::new(upgraded), max_message).await,
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
        drop(permit);
    }));
    let accept = ws::accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Where this process's connection ids start: at random below 2^52. The
/// sessions directory outlives a crashed gateway (Redis entries until their
/// TTL), and a restarted node may keep its name: were ids to start at 1
/// again, a push for a stale entry of one user would reach whichever user
/// now holds that id on the node.
fn first_conn_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: the time still differs between incarnations.
        return ((natter_node::ids::now_ms() as u64 % (1 << 40)) << 12) | 1;
    }
    (u64::from_le_bytes(bytes) % (1 << 52)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_do_not_repeat_across_incarnations() {
        let firsts: std::collections::HashSet<u64> = (0..64).map(|_| first_conn_id()).collect();
        assert_eq!(firsts.len(), 64, "each process starts its ids elsewhere");
        assert!(
            firsts.iter().all(|id| (1..(1 << 52)).contains(id)),
            "ids fit a JSON number"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_handshake_needs_upgrade_version_13_and_a_key() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        assert_eq!(
            handshake_key(&headers(&good)),
            Ok(HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="))
        );
        let without =
            |name: &str| -> Vec<_> { good.iter().filter(|(n, _)| *n != name).copied().collect() };
        assert_eq!(
            handshake_key(&headers(&without("connection"))),
            Err(Refusal::NotUpgrade)
        );
        assert_eq!(
            handshake_key(&headers(&without("upgrade"))),
            Err(Refusal::NotUpgrade)
        );
        assert_eq!(
            handshake_key(&headers(&without("sec-websocket-version"))),
            Err(Refusal::Version)
        );
        assert_eq!(
            handshake_key(&headers(&without("sec-websocket-key"))),
            Err(Refusal::NoKey)
        );
        for bad in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25jZSE=",
        ] {
            let mut odd = without("sec-websocket-key");
            odd.push(("sec-websocket-key", bad));
            assert_eq!(
                handshake_key(&headers(&odd)),
                Err(Refusal::NoKey),
                "{bad:?}"
            );
        }
        let mut old = without("sec-websocket-version");
        old.push(("sec-websocket-version", "8"));
        assert_eq!(handshake_key(&headers(&old)), Err(Refusal::Version));
    }
}
