//! The account-service auth provider (`auth.verify_url`): natter asks the
//! operator's account service whether a client's token is good, instead of
//! checking an HS256 signature itself.
//!
//! ```text
//! GET <auth.verify_url>
//! Authorization: Bearer <token>
//!
//! 200 {"uid": "alice", "expires_at": 1767225600}   accepted (expires_at optional, Unix seconds)
//! 401 or 403                                        refused
//! anything else, a bad answer, no answer in time    unavailable (the client may retry)
//! ```
//!
//! Answers are cached by the SHA-256 of the token (raw tokens are never
//! kept): accepted and refused ones each for their own time, unavailable ones
//! never, so an account service that comes back is asked again at once. An
//! accepted entry never outlives the `expires_at` it came with. Concurrent
//! verifications of one uncached token share one call, and calls are bounded
//! by a semaphore; the time-out of a verification covers waiting for it.
//!
//! This module only answers "which user is this token"; the caller checks the
//! uid as a user id and maps [`VerifyError`] to its refusal codes
//! ([`VerifyError::Unavailable`] is `auth_unavailable`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natter_node::config::AuthConfig;
use natter_node::telemetry::register;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

/// Longest token sent to the account service, in bytes. Longer ones are
/// refused without a call: no account service issues them, and a client
/// must not be able to make natter send megabytes of headers.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Largest answer body read, in bytes; a longer one is a bad answer.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Longest uid accepted from the account service, in bytes. The caller
/// checks the uid as a user id; this only keeps a misbehaving service from
/// filling the cache with huge strings.
pub const MAX_UID_LEN: usize = 256;

/// Idle connections kept to the account service at most.
const POOL_IDLE: usize = 16;

/// A token the account service accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The user, as the account service names it (not yet checked as a user id).
    pub uid: String,
    /// When the token stops being good (Unix seconds), if the service said.
    pub expires_at: Option<i64>,
}

/// Why a token was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The account service answered 401 or 403, or the token cannot be sent
    /// (empty, too long, or not a valid header value).
    #[error("the token was refused")]
    Refused,
    /// The account service accepted the token with an `expires_at` in the past.
    #[error("the token has expired")]
    Expired,
    /// No usable answer: a time-out, a connection error, another status or a
    /// bad body. Never cached; the client may retry.
    #[error("the account service is unavailable: {0}")]
    Unavailable(String),
}

/// What one verification came to; cached answers are `Ok`, `Refused` or `Expired`.
type Answer = Result<Verified, VerifyError>;

/// Settings of a [`VerifyUrl`], in the units it uses.
#[derive(Clone, Debug)]
pub struct VerifySettings {
    /// The account service's endpoint: an http:// or https:// URL.
    pub url: String,
    /// Time allowed for one verification, waiting for a permit included.
    pub timeout: Duration,
    /// Calls to the account service in flight at most.
    pub max_concurrent: usize,
    /// How long an accepted answer is reused.
    pub cache_accepted: Duration,
    /// How long a refused (or expired) answer is reused.
    pub cache_refused: Duration,
    /// Cached answers at most.
    pub cache_entries: usize,
}

impl VerifySettings {
    /// The settings `auth` asks for, or `None` when `auth.verify_url` is empty (off).
    pub fn from_config(auth: &AuthConfig) -> Option<VerifySettings> {
        if auth.verify_url.is_empty() {
            return None;
        }
        Some(VerifySettings {
            url: auth.verify_url.clone(),
            timeout: Duration::from_millis(auth.verify_timeout_ms),
            max_concurrent: auth.verify_max_concurrent,
            cache_accepted: Duration::from_secs(auth.verify_cache_accepted_secs),
            cache_refused: Duration::from_secs(auth.verify_cache_refused_secs),
            cache_entries: auth.verify_cache_entries,
        })
    }
}

/// The HTTP client could not be built (its TLS backend failed to start).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the account-service client: {0}")]
pub struct SetupError(#[source] reqwest::Error);

/// The account-service auth provider. Share one per process (in an `Arc`):
/// its cache, permits and single-flight table are what bound the calls.
pub struct VerifyUrl {
    settings: VerifySettings,
    client: reqwest::Client,
    permits: Semaphore,
    state: Mutex<State>,
    metrics: Metrics,
}

impl std::fmt::Debug for VerifyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyUrl")
            .field("max_concurrent", &self.settings.max_concurrent)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of a token: the cache and single-flight key.
type Key = [u8; 32];

struct Entry {
    /// `Ok`, `Refused` or `Expired`.
    answer: Answer,
    /// The entry is not used from this instant on.
    until: Instant,
    /// When the call that produced it was sent: [`VerifyUrl::forget_user`]
    /// drops accepts asked for before its time.
    asked_at: SystemTime,
    /// Matches the entry's place in `State::order`.
    generation: u64,
}

/// A call in progress, shared by every verification of its token.
type Flight = Arc<OnceCell<Answer>>;

struct State {
    cache: HashMap<Key, Entry>,
    /// Keys in insertion order, for evicting the oldest: an item whose
    /// generation differs from its entry's is stale and skipped.
    order: VecDeque<(Key, u64)>,
    generation: u64,
    /// Last time the cache was swept for expired entries.
    swept: Instant,
    flights: HashMap<Key, Flight>,
}

struct Metrics {
    total: IntCounterVec,
    seconds: Histogram,
    in_flight: IntGauge,
}

/// Every value of `natter_auth_verify_total`'s `outcome` label.
const OUTCOMES: [&str; 9] = [
    "accepted",
    "refused",
    "expired",
    "unavailable",
    "timeout",
    "cache_accepted",
    "cache_refused",
    "shared",
    "malformed",
];

impl Metrics {
    fn new(registry: &Registry) -> Metrics {
        let total = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "natter_auth_verify_total",
                    "Token verifications by the account service (auth.verify_url), by outcome: \
                     accepted, refused, expired, unavailable, timeout (no answer in time, \
                     waiting for a permit included), cache_accepted, cache_refused, shared \
                     (answered by a concurrent call for the same token), malformed (a token \
                     that cannot be sent, refused without a call).",
                ),
                &["outcome"],
            )
            .expect("valid counter"),
        );
        for outcome in OUTCOMES {
            total.with_label_values(&[outcome]);
        }
        let seconds = register(
            registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "natter_auth_verify_seconds",
                    "Time the account service took to answer one call (abandoned calls included).",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid histogram"),
        );
        let in_flight = register(
            registry,
            IntGauge::new(
                "natter_auth_verify_in_flight",
                "Calls to the account service in progress.",
            )
            .expect("valid gauge"),
        );
        Metrics {
            total,
            seconds,
            in_flight,
        }
    }

    fn count(&self, outcome: &'static str) {
        self.total.with_label_values(&[outcome]).inc();
    }
}

impl VerifyUrl {
    /// The provider `auth` configures, or `None` when `auth.verify_url` is empty.
    pub fn from_config(
        auth: &AuthConfig,
        registry: &Registry,
    ) -> Result<Option<VerifyUrl>, SetupError> {
        VerifySettings::from_config(auth)
            .map(|settings| VerifyUrl::new(settings, registry))
            .transpose()
    }

    pub fn new(settings: VerifySettings, registry: &Registry) -> Result<VerifyUrl, SetupError> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A redirect could carry the token to another host; the account
            // service must answer itself (a 3xx is "unavailable").
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(POOL_IDLE.min(settings.max_concurrent))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("natter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SetupError)?;
        Ok(VerifyUrl {
            permits: Semaphore::new(settings.max_concurrent.max(1)),
            state: Mutex::new(State {
                cache: HashMap::new(),
                order: VecDeque::new(),
                generation: 0,
                swept: Instant::now(),
                flights: HashMap::new(),
            }),
            metrics: Metrics::new(registry),
            client,
            settings,
        })
    }

    /// Asks the account service (or the cache) who `token` belongs to.
    pub async fn verify(&self, token: &str) -> Result<Verified, VerifyError> {
        let Some(header) = bearer(token) else {
            self.metrics.count("malformed");
            return Err(VerifyError::Refused);
        };
        let key: Key = Sha256::digest(token.as_bytes()).into();
        let flight = {
            let mut state = self.lock();
            if let Some(answer) = state.cached(&key, Instant::now()) {
                self.metrics.count(match answer {
                    Ok(_) => "cache_accepted",
                    Err(_) => "cache_refused",
                });
                return answer;
            }
            state.flights.entry(key).or_default().clone()
        };
        let leave = Leave {
            verify: self,
            key,
            flight,
        };
        let flight = &leave.flight;
        // Whether this verification made the call (rather than waiting for
        // one another verification made): if the caller that started a call
        // gives up, a waiting one starts it again.
        let called = AtomicBool::new(false);
        let work = flight.get_or_init(|| {
            called.store(true, Ordering::Relaxed);
            self.call(key, flight, header)
        });
        match tokio::time::timeout(self.settings.timeout, work).await {
            Ok(answer) => {
                if !called.load(Ordering::Relaxed) {
                    self.metrics.count("shared");
                }
                answer.clone()
            }
            Err(_) => {
                self.metrics.count("timeout");
                Err(VerifyError::Unavailable(format!(
                    "no answer within {} ms",
                    self.settings.timeout.as_millis()
                )))
            }
        }
    }

    /// Drops the cached accepts of `uid` whose call was sent before `before`
    /// (a logout of the user everywhere); returns how many. A call still in
    /// flight is not affected. Walks the whole cache: meant for rare
    /// administrative use, not per request.
    pub fn forget_user(&self, uid: &str, before: SystemTime) -> usize {
        let mut state = self.lock();
        let was = state.cache.len();
        state.cache.retain(
            |_, entry| !matches!(&entry.answer, Ok(v) if v.uid == uid && entry.asked_at < before),
        );
        was - state.cache.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One call to the account service, made by the first verification of
    /// an uncached token; its answer is cached here, before the waiting
    /// verifications see it.
    async fn call(&self, key: Key, flight: &Flight, header: HeaderValue) -> Answer {
        let Ok(_permit) = self.permits.acquire().await else {
            return Err(VerifyError::Unavailable("shutting down".into()));
        };
        self.metrics.in_flight.inc();
        let _in_flight = Decrement(&self.metrics.in_flight);
        // Observed on drop, so an abandoned call is timed too.
        let _timer = self.metrics.seconds.start_timer();
        let asked_at = SystemTime::now();
        let (answer, outcome) = self.ask(header).await;
        self.metrics.count(outcome);
        self.remember(key, flight, &answer, asked_at);
        answer
    }

    async fn ask(&self, header: HeaderValue) -> (Answer, &'static str) {
        let unavailable = |why: String| (Err(VerifyError::Unavailable(why)), "unavailable");
        let sent = self
            .client
            .get(&self.settings.url)
            .header(AUTHORIZATION, header)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // The URL may hold credentials: errors are reported without it.
            Err(e) if e.is_timeout() => {
                return (Err(VerifyError::Unavailable(describe(e))), "timeout")
            }
            Err(e) => return unavailable(describe(e)),
        };
        match response.status().as_u16() {
            200 => {}
            401 | 403 => return (Err(VerifyError::Refused), "refused"),
            status => return unavailable(format!("the account service answered {status}")),
        }
        let body = match read_body(response).await {
            Ok(body) => body,
            Err(why) => return unavailable(why),
        };
        match parse(&body, unix_ms()) {
            Ok(verified) => (Ok(verified), "accepted"),
            Err(VerifyError::Expired) => (Err(VerifyError::Expired), "expired"),
            Err(e) => (Err(e), "unavailable"),
        }
    }

    /// Ends `flight` and caches its answer unless it is "unavailable".
    fn remember(&self, key: Key, flight: &Flight, answer: &Answer, asked_at: SystemTime) {
        let now = Instant::now();
        let ttl = match answer {
            Ok(verified) => {
                let left = verified.expires_at.map(|at| {
                    let ms = at.saturating_mul(1000).saturating_sub(unix_ms());
                    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
                });
                Some(match left {
                    Some(left) => left.min(self.settings.cache_accepted),
                    None => self.settings.cache_accepted,
                })
            }
            Err(VerifyError::Refused | VerifyError::Expired) => Some(self.settings.cache_refused),
            Err(VerifyError::Unavailable(_)) => None,
        };
        let mut state = self.lock();
        if state
            .flights
            .get(&key)
            .is_some_and(|f| Arc::ptr_eq(f, flight))
        {
            state.flights.remove(&key);
        }
        if let Some(ttl) = ttl {
            let sweep_every = self
                .settings
                .cache_refused
                .min(self.settings.cache_accepted)
                .min(Duration::from_secs(1));
            state.insert(
                key,
                answer.clone(),
                now + ttl,
                asked_at,
                self.settings.cache_entries.max(1),
                now,
                sweep_every,
            );
        }
    }
}

impl State {
    fn cached(&mut self, key: &Key, now: Instant) -> Option<Answer> {
        let entry = self.cache.get(key)?;
        if entry.until > now {
            return Some(entry.answer.clone());
        }
        // Its item in `order` goes stale and is skipped later.
        self.cache.remove(key);
        None
    }

    /// Caches `answer`, making room when the cache is full: expired entries
    /// first (at most one sweep per `sweep_every`, since a sweep walks every
    /// entry), then the oldest.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        key: Key,
        answer: Answer,
        until: Instant,
        asked_at: SystemTime,
        capacity: usize,
        now: Instant,
        sweep_every: Duration,
    ) {
        if !self.cache.contains_key(&key) && self.cache.len() >= capacity {
            if now.duration_since(self.swept) >= sweep_every {
                self.cache.retain(|_, entry| entry.until > now);
                self.swept = now;
            }
            while self.cache.len() >= capacity {
                let Some((oldest, generation)) = self.order.pop_front() else {
                    break;
                };
                if self
                    .cache
                    .get(&oldest)
                    .is_some_and(|e| e.generation == generation)
                {
                    self.cache.remove(&oldest);
                }
            }
        }
        self.generation += 1;
        let generation = self.generation;
        self.cache.insert(
            key,
            Entry {
                answer,
                until,
                asked_at,
                generation,
            },
        );
        self.order.push_back((key, generation));
        // Replaced and expired entries leave stale items behind; dropping
        // them when they outnumber the live ones keeps `order` bounded.
        if self.order.len() > 2 * capacity {
            let cache = &self.cache;
            self.order
                .retain(|(k, g)| cache.get(k).is_some_and(|e| e.generation == *g));
        }
    }
}

/// Removes a flight that nobody waits for any more: every verification of
/// it timed out or was dropped before it ended (a flight that ended removed
/// itself).
struct Leave<'a> {
    verify: &'a VerifyUrl,
    key: Key,
    flight: Flight,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut state = self.verify.lock();
        let ours = state
            .flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight));
        // Under the lock, nobody can pick the flight up: two references
        // are the table's and this one.
        if ours && Arc::strong_count(&self.flight) <= 2 {
            state.flights.remove(&self.key);
        }
    }
}

struct Decrement<'a>(&'a IntGauge);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `e` with its causes (a refused connection, a certificate the TLS
/// handshake rejected), for the log; without the URL, which may hold
/// credentials.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The `Authorization` value for `token`, or `None` if it cannot be sent.
fn bearer(token: &str) -> Option<HeaderValue> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let too_long = || format!("the answer is longer than {MAX_ANSWER_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Deserialize)]
struct Body {
    uid: String,
    #[serde(default)]
    expires_at: Option<i64>,
}

/// Reads a 200 answer at `now_ms` (Unix milliseconds).
fn parse(body: &[u8], now_ms: i64) -> Answer {
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| VerifyError::Unavailable(format!("bad answer: {e}")))?;
    if body.uid.is_empty() || body.uid.len() > MAX_UID_LEN {
        return Err(VerifyError::Unavailable(format!(
            "bad answer: the uid must be 1 to {MAX_UID_LEN} bytes"
        )));
    }
    if body
        .expires_at
        .is_some_and(|at| at.saturating_mul(1000) <= now_ms)
    {
        return Err(VerifyError::Expired);
    }
    Ok(Verified {
        uid: body.uid,
        expires_at: body.expires_at,
    })
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::State as Shared;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::Json;
    use serde_json::json;

    /// A stand-in account service: answers by token, counts calls per token.
    #[derive(Default)]
    struct Accounts {
        calls: Mutex<HashMap<String, u32>>,
        /// Requests without `Authorization: Bearer <token>`.
        bad_headers: Mutex<u32>,
        /// The `expires_at` of the token `soon`.
        soon: i64,
        /// Requests being answered now, and the most there were at once.
        active: Mutex<(u32, u32)>,
    }

    /// Counts a request as being answered until dropped.
    struct Active<'a>(&'a Accounts);

    impl<'a> Active<'a> {
        fn new(accounts: &'a Accounts) -> Active<'a> {
            let mut active = accounts.active.lock().expect("lock");
            active.0 += 1;
            active.1 = active.1.max(active.0);
            Active(accounts)
        }
    }

    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.active.lock().expect("lock").0 -= 1;
        }
    }

    impl Accounts {
        fn calls(&self, token: &str) -> u32 {
            let calls = self.calls.lock().expect("lock");
            calls.get(token).copied().unwrap_or(0)
        }

        fn most_at_once(&self) -> u32 {
            self.active.lock().expect("lock").1
        }

        fn all_calls(&self) -> u32 {
            self.calls.lock().expect("lock").values().sum()
        }
    }

    async fn answer(Shared(accounts): Shared<Arc<Accounts>>, headers: HeaderMap) -> Response {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = token else {
            *accounts.bad_headers.lock().expect("lock") += 1;
            return StatusCode::BAD_REQUEST.into_response();
        };
        *accounts
            .calls
            .lock()
            .expect("lock")
            .entry(token.to_string())
            .or_default() += 1;
        let _active = Active::new(&accounts);
        let now = unix_ms() / 1000;
        let user = |uid: &str| Json(json!({ "uid": uid })).into_response();
        match token {
            "alice" | "alice-phone" => user("alice"),
            "bob" => user("bob"),
            "carol" => user("carol"),
            "dated" => Json(json!({ "uid": "dave", "expires_at": now + 3600 })).into_response(),
            "past" => Json(json!({ "uid": "erin", "expires_at": now - 10 })).into_response(),
            "soon" => Json(json!({ "uid": "frank", "expires_at": accounts.soon })).into_response(),
            "denied" => StatusCode::UNAUTHORIZED.into_response(),
            "forbidden" => StatusCode::FORBIDDEN.into_response(),
            "broken" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            "moved" => (
                StatusCode::FOUND,
                [(axum::http::header::LOCATION, "http://127.0.0.1:1/")],
            )
                .into_response(),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                user("slow")
            }
            "slowish" | "slowish-too" => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                user("grace")
            }
            "garbage" => (StatusCode::OK, "{\"uid\": \"hal").into_response(),
            "number" => Json(json!({ "uid": 42 })).into_response(),
            "empty" => user(""),
            _ => StatusCode::UNAUTHORIZED.into_response(),
        }
    }

    /// Starts an account service on port 0; returns its verify URL.
    async fn account_service() -> (String, Arc<Accounts>) {
        let accounts = Arc::new(Accounts {
            soon: unix_ms() / 1000 + 2,
            ..Accounts::default()
        });
        let router = axum::Router::new()
            .route("/verify", axum::routing::get(answer))
            .with_state(accounts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (format!("http://{addr}/verify"), accounts)
    }

    fn settings(url: &str) -> VerifySettings {
        VerifySettings {
            url: url.into(),
            timeout: Duration::from_secs(2),
            max_concurrent: 8,
            cache_accepted: Duration::from_secs(60),
            cache_refused: Duration::from_secs(60),
            cache_entries: 100,
        }
    }

    fn provider(settings: VerifySettings) -> (VerifyUrl, Registry) {
        let registry = Registry::new();
        let verify = VerifyUrl::new(settings, &registry).expect("client");
        (verify, registry)
    }

    /// `natter_auth_verify_total{outcome}` as the registry exports it.
    fn outcome(registry: &Registry, outcome: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "natter_auth_verify_total")
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == outcome))
            .map_or(0, |m| m.get_counter().get_value() as u64)
    }

    fn unavailable(answer: Answer) -> String {
        match answer {
            Err(VerifyError::Unavailable(why)) => why,
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn verify_each_answer_of_the_account_service_has_its_outcome() {
        let (url, accounts) = account_service().await;
        let (verify, _registry) = provider(settings(&url));
        let alice = verify.verify("alice").await.expect("alice");
        assert_eq!(
            alice,
            Verified {
                uid: "alice".into(),
                expires_at: None
            }
        );
        let dated = verify.verify("dated").await.expect("dated");
        assert_eq!(dated.uid, "dave");
        let at = dated.expires_at.expect("expires_at");
        assert!((at - unix_ms() / 1000 - 3600).abs() <= 2, "{at}");
        assert_eq!(verify.verify("denied").await, Err(VerifyError::Refused));
        assert_eq!(verify.verify("forbidden").await, Err(VerifyError::Refused));
        assert_eq!(verify.verify("past").await, Err(VerifyError::Expired));
        assert!(unavailable(verify.verify("broken").await).contains("500"));
        assert!(unavailable(verify.verify("moved").await).contains("302"));
        assert!(unavailable(verify.verify("garbage").await).contains("bad answer"));
        assert!(unavailable(verify.verify("number").await).contains("bad answer"));
        assert!(unavailable(verify.verify("empty").await).contains("uid"));
        for token in [
            "alice",
            "dated",
            "denied",
            "forbidden",
            "past",
            "broken",
            "moved",
            "garbage",
            "number",
            "empty",
        ] {
            assert_eq!(accounts.calls(token), 1, "{token}");
        }
        assert_eq!(*accounts.bad_headers.lock().expect("lock"), 0);
    }

    #[tokio::test]
    async fn verify_tokens_that_cannot_be_sent_are_refused_without_a_call() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(settings(&url));
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        for token in ["", "two\nlines", "nul\0", long.as_str()] {
            assert_eq!(verify.verify(token).await, Err(VerifyError::Refused));
        }
        assert_eq!(accounts.all_calls(), 0);
        assert_eq!(outcome(&registry, "malformed"), 4);
        // The longest token allowed is still sent.
        let longest = "a".repeat(MAX_TOKEN_LEN);
        assert_eq!(verify.verify(&longest).await, Err(VerifyError::Refused));
        assert_eq!(accounts.calls(&longest), 1);
    }

    #[tokio::test]
    async fn verify_a_slow_account_service_times_out_as_unavailable_and_is_not_cached() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(VerifySettings {
            timeout: Duration::from_millis(200),
            ..settings(&url)
        });
        for round in 1..=2 {
            let started = Instant::now();
            unavailable(verify.verify("slow").await);
            assert!(started.elapsed() < Duration::from_millis(1500));
            assert_eq!(accounts.calls("slow"), round);
        }
        assert_eq!(outcome(&registry, "timeout"), 2);
        assert_eq!(verify.metrics.in_flight.get(), 0);
        assert!(
            verify.lock().flights.is_empty(),
            "abandoned flights are removed"
        );
    }

    #[tokio::test]
    async fn verify_an_unreachable_account_service_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let (verify, registry) = provider(settings(&format!("http://{addr}/verify")));
        unavailable(verify.verify("alice").await);
        unavailable(verify.verify("alice").await);
        assert_eq!(outcome(&registry, "unavailable"), 2, "not cached");
    }

    #[tokio::test]
    async fn verify_https_urls_are_supported() {
        // A TLS handshake with a plain HTTP server fails as a connection
        // error; without TLS support the URL itself would be refused.
        let (url, _accounts) = account_service().await;
        let (verify, _registry) = provider(settings(&url.replacen("http:", "https:", 1)));
        let why = unavailable(verify.verify("alice").await);
        assert!(why.contains("corrupt message"), "the TLS layer ran: {why}");
    }

    #[tokio::test]
    async fn verify_server_errors_and_bad_answers_are_not_cached() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(settings(&url));
        for token in ["broken", "garbage", "number", "broken", "garbage", "number"] {
            unavailable(verify.verify(token).await);
        }
        for token in ["broken", "garbage", "number"] {
            assert_eq!(accounts.calls(token), 2, "{token}");
        }
        assert_eq!(outcome(&registry, "unavailable"), 6);
        assert!(verify.lock().cache.is_empty());
    }

    #[tokio::test]
    async fn verify_accepted_answers_are_cached_for_their_ttl() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(VerifySettings {
            cache_accepted: Duration::from_millis(500),
            ..settings(&url)
        });
        verify.verify("alice").await.expect("alice");
        assert_eq!(verify.verify("alice").await.expect("cached").uid, "alice");
        assert_eq!(accounts.calls("alice"), 1, "answered from the cache");
        assert_eq!(outcome(&registry, "cache_accepted"), 1);
        tokio::time::sleep(Duration::from_millis(600)).await;
        verify.verify("alice").await.expect("alice");
        assert_eq!(accounts.calls("alice"), 2, "asked again after the TTL");
        // The cache keeps digests, never tokens.
        let state = verify.lock();
        let key: Key = Sha256::digest(b"alice").into();
        assert!(state.cache.contains_key(&key));
    }

    #[tokio::test]
    async fn verify_refused_answers_are_cached_with_their_own_ttl() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(VerifySettings {
            cache_accepted: Duration::from_secs(60),
            cache_refused: Duration::from_millis(500),
            ..settings(&url)
        });
        verify.verify("alice").await.expect("alice");
        for _ in 0..2 {
            assert_eq!(verify.verify("denied").await, Err(VerifyError::Refused));
            assert_eq!(verify.verify("past").await, Err(VerifyError::Expired));
        }
        assert_eq!((accounts.calls("denied"), accounts.calls("past")), (1, 1));
        assert_eq!(outcome(&registry, "cache_refused"), 2);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(verify.verify("denied").await, Err(VerifyError::Refused));
        assert_eq!(verify.verify("past").await, Err(VerifyError::Expired));
        assert_eq!((accounts.calls("denied"), accounts.calls("past")), (2, 2));
        verify.verify("alice").await.expect("alice");
        assert_eq!(accounts.calls("alice"), 1, "accepts keep their own TTL");
    }

    #[tokio::test]
    async fn verify_expires_at_cuts_a_cached_accept_short() {
        let (url, accounts) = account_service().await;
        let (verify, _registry) = provider(settings(&url));
        let soon = verify.verify("soon").await.expect("not expired yet");
        let at = soon.expires_at.expect("expires_at");
        verify.verify("soon").await.expect("cached");
        assert_eq!(accounts.calls("soon"), 1);
        let left = at * 1000 - unix_ms();
        tokio::time::sleep(Duration::from_millis(
            u64::try_from(left).unwrap_or(0) + 100,
        ))
        .await;
        // The cache TTL is a minute; the entry ended with the token.
        assert_eq!(verify.verify("soon").await, Err(VerifyError::Expired));
        assert_eq!(accounts.calls("soon"), 2);
    }

    #[tokio::test]
    async fn verify_the_concurrency_bound_holds_callers_back_until_they_time_out() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(VerifySettings {
            max_concurrent: 1,
            timeout: Duration::from_millis(1500),
            ..settings(&url)
        });
        // Two tokens at once: the second call waits for the first.
        let (a, b) = tokio::join!(verify.verify("slowish"), verify.verify("slowish-too"));
        assert_eq!(a.expect("accepted").uid, "grace");
        assert_eq!(b.expect("accepted").uid, "grace");
        assert_eq!(accounts.most_at_once(), 1);
        // A caller that finds no free permit within its time-out is told
        // "unavailable" without a call: the time-out covers the wait.
        let held = verify.permits.acquire().await.expect("permit");
        let started = Instant::now();
        unavailable(verify.verify("alice").await);
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(accounts.calls("alice"), 0, "alice waited for the permit");
        assert_eq!(outcome(&registry, "timeout"), 1);
        drop(held);
        verify.verify("alice").await.expect("alice");
    }

    #[tokio::test]
    async fn verify_concurrent_verifications_of_one_token_share_one_call() {
        let (url, accounts) = account_service().await;
        let (verify, registry) = provider(settings(&url));
        let (a, b, c, d) = tokio::join!(
            verify.verify("slowish"),
            verify.verify("slowish"),
            verify.verify("slowish"),
            verify.verify("slowish"),
        );
        for answer in [a, b, c, d] {
            assert_eq!(answer.expect("accepted").uid, "grace");
        }
        assert_eq!(accounts.calls("slowish"), 1);
        assert_eq!(outcome(&registry, "accepted"), 1);
        assert_eq!(outcome(&registry, "shared"), 3);
        assert!(verify.lock().flights.is_empty());
    }

    #[tokio::test]
    async fn verify_a_shared_call_outlives_the_caller_that_started_it() {
        let (url, accounts) = account_service().await;
        let (verify, _registry) = provider(settings(&url));
        // The first caller gives up after 100 ms; the second, still waiting,
        // makes the call again and gets the answer.
        let (first, second) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(100), verify.verify("slowish")),
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                verify.verify("slowish").await
            }
        );
        assert!(first.is_err(), "the first caller gave up");
        assert_eq!(second.expect("accepted").uid, "grace");
        assert_eq!(accounts.calls("slowish"), 2);
        assert!(verify.lock().flights.is_empty());
        // A flight every caller gave up on is removed, not left behind.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), verify.verify("slowish-too")).await;
        assert!(gave_up.is_err());
        assert!(verify.lock().flights.is_empty());
    }

    #[tokio::test]
    async fn verify_forget_user_drops_older_accepts_of_that_user() {
        let (url, accounts) = account_service().await;
        let (verify, _registry) = provider(settings(&url));
        let before_any = SystemTime::now();
        for token in ["alice", "alice-phone", "bob", "denied"] {
            let _ = verify.verify(token).await;
        }
        assert_eq!(verify.forget_user("alice", before_any), 0, "asked later");
        assert_eq!(verify.forget_user("alice", SystemTime::now()), 2);
        assert_eq!(verify.forget_user("alice", SystemTime::now()), 0);
        for token in ["alice", "alice-phone", "bob", "denied"] {
            let _ = verify.verify(token).await;
        }
        assert_eq!(accounts.calls("alice"), 2);
        assert_eq!(accounts.calls("alice-phone"), 2);
        assert_eq!(accounts.calls("bob"), 1, "other users stay cached");
        assert_eq!(accounts.calls("denied"), 1, "refusals stay cached");
    }

    #[tokio::test]
    async fn verify_the_cache_is_bounded_dropping_expired_entries_then_the_oldest() {
        let (url, accounts) = account_service().await;
        let (verify, _registry) = provider(VerifySettings {
            cache_entries: 2,
            cache_refused: Duration::from_millis(100),
            ..settings(&url)
        });
        // alice is the oldest entry, but the expired refusal goes first.
        verify.verify("alice").await.expect("alice");
        let _ = verify.verify("denied").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        verify.verify("bob").await.expect("bob");
        assert_eq!(verify.lock().cache.len(), 2);
        verify.verify("alice").await.expect("alice");
        assert_eq!(accounts.calls("alice"), 1, "alice was kept");
        // With nothing expired, the oldest (alice) makes room for carol.
        verify.verify("carol").await.expect("carol");
        assert_eq!(verify.lock().cache.len(), 2);
        verify.verify("bob").await.expect("bob");
        assert_eq!(accounts.calls("bob"), 1, "bob was kept");
        verify.verify("alice").await.expect("alice");
        assert_eq!(accounts.calls("alice"), 2, "alice was dropped");
        for i in 0..50 {
            let _ = verify.verify(&format!("stranger-{i}")).await;
        }
        let state = verify.lock();
        assert_eq!(state.cache.len(), 2);
        assert!(state.order.len() <= 4, "stale order items are dropped");
    }

    #[tokio::test]
    async fn verify_metrics_count_each_outcome() {
        let (url, _accounts) = account_service().await;
        let (verify, registry) = provider(settings(&url));
        for token in [
            "alice", "alice", "dated", "denied", "denied", "past", "broken", "garbage", "",
        ] {
            let _ = verify.verify(token).await;
        }
        let expected = [
            ("accepted", 2),
            ("refused", 1),
            ("expired", 1),
            ("unavailable", 2),
            ("timeout", 0),
            ("cache_accepted", 1),
            ("cache_refused", 1),
            ("shared", 0),
            ("malformed", 1),
        ];
        for (name, count) in expected {
            assert_eq!(outcome(&registry, name), count, "{name}");
        }
        let families = registry.gather();
        let family = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .unwrap_or_else(|| panic!("{name} registered"))
        };
        let seconds = family("natter_auth_verify_seconds").get_metric()[0].get_histogram();
        assert_eq!(seconds.get_sample_count(), 6, "one sample per call");
        let in_flight = family("natter_auth_verify_in_flight").get_metric()[0].get_gauge();
        assert_eq!(in_flight.get_value(), 0.0);
    }
}
