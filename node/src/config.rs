//! Typed, layered configuration: defaults, then a TOML file, then `NATTER_…`
//! environment variables, then command-line flags (applied by the binary).
//! Everything is validated before any port is bound.
//!
//! An environment variable names a key by its path in upper case with `__`
//! between sections: `NATTER_LISTEN`, `NATTER_COMET__HEARTBEAT_TIMEOUT_MS`.
//! Its value is read as a TOML value when it parses as one (`5000`, `true`),
//! as a string otherwise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The largest `limits.page_bytes`: a page must fit a role-to-role gRPC
/// message (4 MiB) with room to spare.
pub const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {var} does not name a config key")]
    BadEnv { var: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("secret file {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} refused: {reason}")]
    SecretRefused { path: PathBuf, reason: String },
}

/// Shortest secret accepted (after trimming white space), in bytes: an HMAC
/// key of 256 bits.
pub const MIN_SECRET_LEN: usize = 32;

/// A secret setting (a password, a shared key): never printed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Secret {
        Secret(value.to_string())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<set>"
        })
    }
}

/// The whole configuration of a natter process.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the one listener: WebSocket `/sub`, HTTP API, `/metrics`, health.
    pub listen: SocketAddr,
    /// Directory holding the SQLite database and the token secret.
    pub data_dir: PathBuf,
    pub auth: AuthConfig,
    pub comet: CometConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub groups: GroupsConfig,
    pub sessions: SessionsConfig,
    pub discovery: DiscoveryConfig,
    pub rpc: RpcConfig,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub conversations: ConversationsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 3102)),
            data_dir: PathBuf::from("./natter-data"),
            auth: AuthConfig::default(),
            comet: CometConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            groups: GroupsConfig::default(),
            sessions: SessionsConfig::default(),
            discovery: DiscoveryConfig::default(),
            rpc: RpcConfig::default(),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            conversations: ConversationsConfig::default(),
        }
    }
}

/// Conversations: read receipts, revoke and edit, typing.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConversationsConfig {
    /// How long after sending a message its sender may revoke it; 0 for no
    /// limit. Group owners and admins revoke any message of their group at
    /// any time: they moderate.
    pub revoke_window_secs: u64,
    /// How long after sending a text message its sender may edit it; 0 for
    /// no limit.
    pub edit_window_secs: u64,
    /// Groups up to this many members get per-member read detail and live
    /// `read` notifies to their members; larger groups get read counts only.
    pub receipt_detail_max_members: u32,
    /// Typing notices a user may send per second (sustained) ...
    pub typing_per_sec: f64,
    /// ... and in a burst.
    pub typing_burst: u32,
}

impl Default for ConversationsConfig {
    fn default() -> Self {
        ConversationsConfig {
            revoke_window_secs: 120,
            edit_window_secs: 900,
            receipt_detail_max_members: 200,
            typing_per_sec: 1.0,
            typing_burst: 5,
        }
    }
}

/// Token verification.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret. Empty: read `secret` in the data dir, creating it if absent.
    pub secret: String,
    /// Life of tokens minted by `natter token`, in seconds.
    pub token_ttl_secs: u64,
    /// The operator's account service, asked about each token with
    /// `GET` and `Authorization: Bearer <token>`. Empty: off.
    pub verify_url: String,
    /// Time allowed for one verification, waiting for a free call included.
    pub verify_timeout_ms: u64,
    /// Calls to the account service in flight at most.
    pub verify_max_concurrent: usize,
    /// How long an accepted token is taken without asking again (never past
    /// the `expires_at` the service gave).
    pub verify_cache_accepted_secs: u64,
    /// How long a refused token is refused without asking again.
    pub verify_cache_refused_secs: u64,
    /// Cached answers at most.
    pub verify_cache_entries: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: String::new(),
            token_ttl_secs: 7 * 24 * 3600,
            verify_url: String::new(),
            verify_timeout_ms: 2000,
            verify_max_concurrent: 64,
            verify_cache_accepted_secs: 60,
            verify_cache_refused_secs: 10,
            verify_cache_entries: 100_000,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    // The secret is never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "secret",
                &if self.secret.is_empty() {
                    "<data dir>"
                } else {
                    "<set>"
                },
            )
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("verify_url", &redact_url(&self.verify_url))
            .field("verify_timeout_ms", &self.verify_timeout_ms)
            .field("verify_max_concurrent", &self.verify_max_concurrent)
            .field(
                "verify_cache_accepted_secs",
                &self.verify_cache_accepted_secs,
            )
            .field("verify_cache_refused_secs", &self.verify_cache_refused_secs)
            .field("verify_cache_entries", &self.verify_cache_entries)
            .finish()
    }
}

/// `url` without what may hold a credential: the user and password before
/// the host, and the query.
fn redact_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "<not a URL>".into();
    };
    let user = !parsed.username().is_empty() || parsed.password().is_some();
    let query = parsed.query().is_some();
    // Both fail only for URLs without a host, which keep no credentials.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    parsed.set_query(None);
    parsed.set_fragment(None);
    let mut shown = parsed.to_string();
    if user {
        shown = shown.replacen("://", "://<user>@", 1);
    }
    if query {
        shown.push_str("?<query>");
    }
    shown
}

/// The WebSocket gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CometConfig {
    /// Largest frame body accepted, in bytes.
    pub max_body: usize,
    /// Time allowed between connecting and a valid `Auth` frame.
    pub auth_timeout_ms: u64,
    /// Heartbeat interval the server tells clients to keep.
    pub heartbeat_interval_ms: u64,
    /// A connection with no frame for this long is closed.
    pub heartbeat_timeout_ms: u64,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub send_queue: usize,
    /// Pushes awaiting a push-ack on one connection before it counts as a slow consumer.
    pub max_inflight: usize,
    /// Resend an unacknowledged push after this long.
    pub push_rto_ms: u64,
    /// Resends of one push before the connection is closed (the client then syncs).
    pub push_retries: u32,
    /// Open connections on the public listener at most: plain HTTP and
    /// WebSocket connections take from this one cap, on every role.
    pub max_connections: usize,
    /// Shards of the connection map.
    pub buckets: usize,
    /// Malformed frames tolerated on one connection before it is closed.
    pub max_errors: u32,
    /// Time allowed for open connections (WebSocket and HTTP) to close on
    /// shutdown; HTTP connections still open then are dropped.
    pub drain_ms: u64,
    /// Bytes queued for one connection (written by the server, not yet
    /// taken by the socket) before it counts as a slow consumer; one frame
    /// larger than this is still sent when nothing else waits.
    pub send_queue_bytes: usize,
}

impl Default for CometConfig {
    fn default() -> Self {
        CometConfig {
            max_body: 64 * 1024,
            auth_timeout_ms: 10_000,
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 90_000,
            send_queue: 1024,
            max_inflight: 2048,
            push_rto_ms: 5_000,
            push_retries: 3,
            max_connections: 100_000,
            buckets: 32,
            max_errors: 16,
            drain_ms: 5_000,
            send_queue_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Message storage.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// fsync every commit (SQLite `synchronous=FULL`); off survives a process
    /// crash but not a power loss.
    pub synchronous: bool,
    /// Largest number of writes committed in one transaction.
    pub batch_max: usize,
    /// Writes waiting for the committer before senders are pushed back.
    pub queue: usize,
    /// Reader connections in the pool.
    pub readers: u32,
    /// Time a request waits for a pooled connection.
    pub acquire_timeout_ms: u64,
    /// Messages older than this many days are deleted; 0 keeps them forever.
    pub retention_days: u32,
    /// `mysql://user:pass@host:port/db` keeps messages and groups in
    /// MySQL/MariaDB (shared by any number of nodes); empty keeps them in
    /// SQLite files under the data dir.
    pub mysql_url: String,
    /// Pooled MySQL connections at most (per store).
    pub mysql_max_connections: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: true,
            batch_max: 512,
            queue: 8192,
            readers: 4,
            acquire_timeout_ms: 5_000,
            retention_days: 0,
            mysql_url: String::new(),
            mysql_max_connections: 16,
        }
    }
}

/// Per-user limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Messages a user may send per second, sustained, across all devices.
    pub messages_per_sec: f64,
    /// Messages a user may send at once before the rate applies.
    pub message_burst: u32,
    /// HTTP API requests a user may make per second, sustained (over it:
    /// 429 `rate_limited`).
    pub http_requests_per_sec: f64,
    /// HTTP API requests a user may make at once before the rate applies.
    pub http_request_burst: u32,
    /// Bytes of stored messages in one page of sync (WebSocket and HTTP) or
    /// history: a page stops before the message that would take it past
    /// this and says more follow; a page always holds at least one message.
    /// At most [`MAX_PAGE_BYTES`] and `comet.send_queue_bytes`.
    pub page_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            messages_per_sec: 50.0,
            message_burst: 100,
            http_requests_per_sec: 20.0,
            http_request_burst: 100,
            page_bytes: 1024 * 1024,
        }
    }
}

/// Group limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    /// Members of one group at most, owner included.
    pub max_members: u32,
    /// Admins of one group at most, owner not included.
    pub max_admins: u32,
    /// The longest timed mute, seconds (a mute "forever" is allowed besides).
    pub max_mute_secs: u64,
    /// The longest a busy group's push (see `natter_logic::fanout`) waits,
    /// in ms, to leave together with the next ones (one write per
    /// connection for all of them); any other push leaves at once. 0 sends
    /// each push at once.
    pub push_window_ms: u64,
    /// Groups one user may own at most.
    pub max_owned: u32,
    /// Groups one user may create per hour (a burst of this many, refilled
    /// evenly over the hour).
    pub creates_per_hour: u32,
    /// Users one user may add to groups per hour, by invitation or as the
    /// members of a group they create (refilled evenly over the hour).
    pub invites_per_hour: u32,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            max_members: 2000,
            max_admins: 10,
            max_mute_secs: 30 * 86_400,
            push_window_ms: 100,
            max_owned: 100,
            creates_per_hour: 20,
            invites_per_hour: 4000,
        }
    }
}

/// The sessions directory (which gateway node holds each online device).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// `redis://host:port/db` to keep sessions in Redis; empty keeps them in
    /// this process's memory (the embedded shape).
    pub redis_url: String,
    /// Lifetime of a session entry; gateways renew their sessions every
    /// third of it, so a crashed gateway's sessions expire after at most this.
    pub ttl_ms: u64,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Time a Redis command may take before it counts as failed.
    pub timeout_ms: u64,
    /// Redis ACL user (Redis 6+); empty: the URL's, or none.
    pub redis_username: String,
    /// Redis password (`requirepass` or the ACL user's); empty: the URL's,
    /// or none. Kept apart from the URL so that the URL can be logged.
    pub redis_password: Secret,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            redis_url: String::new(),
            ttl_ms: 120_000,
            key_prefix: "natter:".into(),
            timeout_ms: 1000,
            redis_username: String::new(),
            redis_password: Secret::default(),
        }
    }
}

/// Registration in etcd: where this node is, and its worker id.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// `http://host:port` of etcd; empty: no discovery, worker id 0.
    pub etcd_url: String,
    /// Prefix of every etcd key.
    pub prefix: String,
    /// This node's name; empty: a random one at each start.
    pub node: String,
    /// The address other nodes reach this one at; empty: the bound address.
    pub advertise: String,
    /// Lease time: a node that stops renewing disappears after this long.
    pub ttl_secs: u64,
    /// Time an etcd call may take before it counts as failed.
    pub timeout_ms: u64,
    /// etcd user (etcd auth enabled); empty: no authentication.
    pub username: String,
    /// That user's password.
    pub password: Secret,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            etcd_url: String::new(),
            prefix: "natter/".into(),
            node: String::new(),
            advertise: String::new(),
            ttl_secs: 10,
            timeout_ms: 2000,
            username: String::new(),
            password: Secret::default(),
        }
    }
}

/// Role-to-role gRPC (the distributed roles).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Address of the role's gRPC listener (`natter comet`, `natter logic`).
    pub listen: SocketAddr,
    /// Time a call to another node may take before it counts as failed
    /// (and, where safe, is tried on the next node).
    pub timeout_ms: u64,
    /// The cluster secret every comet and logic node shares: each call
    /// between them carries an HMAC made with it (at least 32 bytes;
    /// required by `natter comet` and `natter logic`).
    pub secret: Secret,
    /// How far a call's time stamp may be from this node's clock (both
    /// ways) before the call is refused as stale.
    pub max_clock_skew_ms: u64,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3202)),
            timeout_ms: 3000,
            secret: Secret::default(),
            max_clock_skew_ms: 30_000,
        }
    }
}

/// The public listener's HTTP/1.1 connections (every role). A connection
/// that overruns a time-out is closed (a request, with `408 request_timeout`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time a request's head may take to arrive: from the connection's
    /// accept for its first request, from the first byte for later ones.
    pub header_read_timeout_ms: u64,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout_ms: u64,
    /// Time a request may take from its head to the response, body included.
    pub request_timeout_ms: u64,
    /// Time a request body may go without a byte arriving.
    pub body_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 30_000,
            body_timeout_ms: 10_000,
        }
    }
}

/// The admin API: the operator's own servers mint tokens, send messages,
/// log users out and create groups through it (served by the roles that run
/// logic: `natter serve` and `natter logic`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener, apart from the public one so that a
    /// firewall can keep it for the operator's network.
    pub listen: SocketAddr,
    /// The key every admin request carries (`Authorization: Bearer <key>`;
    /// at least 32 bytes). Empty: read `admin.key` in the data dir, creating
    /// it if absent.
    pub key: Secret,
    /// The user id that system notices (`"from": null`) are sent as.
    pub system_sender: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 3104)),
            key: Secret::default(),
            system_sender: "system".into(),
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// `info`, or targets like `info,natter_comet=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            filter: "info".into(),
        }
    }
}

impl Config {
    /// Defaults, then the file (if any), then `NATTER_…` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.into(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|source| ConfigError::Parse {
                    path: path.into(),
                    source,
                })?
            }
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(key) = var.strip_prefix("NATTER_") else {
                continue;
            };
            let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::BadEnv { var });
            }
            set_path(&mut table, &path, parse_env_value(&value))
                .map_err(|()| ConfigError::BadEnv { var })?;
        }
        let config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(config)
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.comet;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let conv = &self.conversations;
        if !(conv.typing_per_sec > 0.0 && conv.typing_per_sec <= 1000.0) || conv.typing_burst == 0 {
            return bad("conversations.typing_per_sec must be in (0, 1000] and conversations.typing_burst positive");
        }
        if conv.revoke_window_secs > 100 * 365 * 86_400
            || conv.edit_window_secs > 100 * 365 * 86_400
        {
            return bad("conversations.revoke_window_secs and edit_window_secs must be at most 100 years (0: no limit)");
        }
        if conv.receipt_detail_max_members > 100_000 {
            return bad("conversations.receipt_detail_max_members must be at most 100000");
        }
        if c.max_body == 0 || c.max_body > 16 * 1024 * 1024 {
            return bad("comet.max_body must be between 1 and 16777216");
        }
        if c.heartbeat_timeout_ms <= c.heartbeat_interval_ms {
            return bad("comet.heartbeat_timeout_ms must exceed comet.heartbeat_interval_ms");
        }
        if c.send_queue == 0 || c.max_inflight == 0 || c.buckets == 0 || c.max_connections == 0 {
            return bad(
                "comet.send_queue, max_inflight, buckets and max_connections must be positive",
            );
        }
        if c.send_queue_bytes < 64 * 1024 || c.send_queue_bytes > 1024 * 1024 * 1024 {
            return bad("comet.send_queue_bytes must be between 65536 and 1073741824");
        }
        if c.push_rto_ms == 0
            || c.auth_timeout_ms == 0
            || u32::try_from(c.heartbeat_interval_ms).is_err()
        {
            return bad("comet time-outs must be positive and fit in 32 bits");
        }
        if self.store.batch_max == 0 || self.store.queue == 0 || self.store.readers == 0 {
            return bad("store.batch_max, store.queue and store.readers must be positive");
        }
        let rate = self.limits.messages_per_sec;
        if !rate.is_finite() || rate <= 0.0 || self.limits.message_burst == 0 {
            return bad("limits.messages_per_sec and limits.message_burst must be positive");
        }
        let rate = self.limits.http_requests_per_sec;
        if !rate.is_finite() || rate <= 0.0 || self.limits.http_request_burst == 0 {
            return bad(
                "limits.http_requests_per_sec and limits.http_request_burst must be positive",
            );
        }
        // A sync page waits in a connection's send queue, and in the
        // distributed shape crosses the role-to-role gRPC, whose messages
        // are limited to 4 MiB.
        let pages = self.limits.page_bytes;
        if !(1024..=MAX_PAGE_BYTES).contains(&pages) || pages > self.comet.send_queue_bytes {
            return bad("limits.page_bytes must be between 1024 and 3145728, and at most comet.send_queue_bytes");
        }
        let g = &self.groups;
        if g.max_members < 2 || g.max_mute_secs == 0 || g.max_mute_secs > 100 * 365 * 86_400 {
            return bad("groups.max_members must be at least 2 and groups.max_mute_secs between 1 and 100 years");
        }
        if g.push_window_ms > 10_000 {
            return bad("groups.push_window_ms must be at most 10000 (10 s)");
        }
        if g.max_owned == 0 || g.creates_per_hour == 0 || g.invites_per_hour < g.max_members {
            return bad("groups.max_owned and groups.creates_per_hour must be positive, and groups.invites_per_hour at least groups.max_members (a full group must be creatable)");
        }
        let sessions = &self.sessions;
        if sessions.ttl_ms < 3000 || sessions.timeout_ms == 0 {
            return bad("sessions.ttl_ms must be at least 3000 and sessions.timeout_ms positive");
        }
        let url = &sessions.redis_url;
        if !(url.is_empty() || url.starts_with("redis://") || url.starts_with("rediss://")) {
            return bad("sessions.redis_url must be empty or a redis:// URL");
        }
        let store = &self.store;
        if !(store.mysql_url.is_empty()
            || store.mysql_url.starts_with("mysql://")
            || store.mysql_url.starts_with("mariadb://"))
            || store.mysql_max_connections == 0
        {
            return bad("store.mysql_url must be empty or a mysql:// URL, and store.mysql_max_connections positive");
        }
        let h = &self.http;
        let hour = 3_600_000;
        if [
            h.header_read_timeout_ms,
            h.idle_timeout_ms,
            h.request_timeout_ms,
            h.body_timeout_ms,
        ]
        .iter()
        .any(|&ms| ms == 0 || ms > hour)
        {
            return bad("http.header_read_timeout_ms, idle_timeout_ms, request_timeout_ms and body_timeout_ms must be between 1 and 3600000 (1 h)");
        }
        if c.drain_ms > hour {
            return bad("comet.drain_ms must be at most 3600000 (1 h)");
        }
        if self.rpc.timeout_ms == 0 {
            return bad("rpc.timeout_ms must be positive");
        }
        if !self.rpc.secret.is_empty() && self.rpc.secret.expose().trim().len() < MIN_SECRET_LEN {
            return bad(
                "rpc.secret must be at least 32 bytes (not counting white space around it)",
            );
        }
        if !self.rpc.secret.is_empty() && self.rpc.secret.expose().trim() == self.auth.secret.trim()
        {
            return bad("rpc.secret must differ from auth.secret: gateways hold rpc.secret, and must not be able to sign tokens or sessions");
        }
        if !(1000..=600_000).contains(&self.rpc.max_clock_skew_ms) {
            return bad("rpc.max_clock_skew_ms must be between 1000 and 600000");
        }
        let d = &self.discovery;
        if !(d.etcd_url.is_empty()
            || d.etcd_url.starts_with("http://")
            || d.etcd_url.starts_with("https://"))
        {
            return bad("discovery.etcd_url must be empty or an http:// URL");
        }
        if !(2..=3600).contains(&d.ttl_secs) || d.timeout_ms == 0 || d.prefix.is_empty() {
            return bad(
                "discovery.ttl_secs must be 2..=3600, timeout_ms positive and prefix non-empty",
            );
        }
        if d.username.is_empty() != d.password.is_empty() {
            return bad("discovery.username and discovery.password go together");
        }
        if !self.sessions.redis_password.is_empty() && self.sessions.redis_url.is_empty() {
            return bad("sessions.redis_password is set but sessions.redis_url is not");
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format must be text or json");
        }
        if !self.auth.secret.is_empty() && self.auth.secret.trim().len() < MIN_SECRET_LEN {
            return bad(
                "auth.secret must be at least 32 bytes (not counting white space around it)",
            );
        }
        let a = &self.auth;
        let url = &a.verify_url;
        if !(url.is_empty()
            || (url.starts_with("http://") || url.starts_with("https://"))
                && reqwest::Url::parse(url).is_ok_and(|u| u.has_host()))
        {
            return bad("auth.verify_url must be empty or an http:// or https:// URL");
        }
        if a.verify_timeout_ms == 0
            || a.verify_max_concurrent == 0
            || a.verify_cache_accepted_secs == 0
            || a.verify_cache_refused_secs == 0
            || a.verify_cache_entries == 0
        {
            return bad("auth.verify_timeout_ms, verify_max_concurrent, verify_cache_accepted_secs, verify_cache_refused_secs and verify_cache_entries must be positive");
        }
        let admin = &self.admin;
        let key = admin.key.expose().trim();
        if !admin.key.is_empty() && key.len() < MIN_SECRET_LEN {
            return bad("admin.key must be at least 32 bytes (not counting white space around it)");
        }
        if !admin.key.is_empty()
            && (key == self.auth.secret.trim() || key == self.rpc.secret.expose().trim())
        {
            return bad("admin.key must differ from auth.secret and rpc.secret: whoever holds those must not be able to act as the operator");
        }
        // Port 0 asks for any free port: it cannot collide.
        let same = |other: SocketAddr| admin.listen.port() != 0 && admin.listen == other;
        if same(self.listen) || same(self.rpc.listen) {
            return bad("admin.listen must differ from listen and rpc.listen: the admin API has a listener of its own");
        }
        if natter_proto::UserId::parse(&admin.system_sender).is_err() {
            return bad("admin.system_sender must be a user id: 1-64 bytes of A-Z a-z 0-9 _ - . @, not . or ..");
        }
        Ok(())
    }

    /// The HS256 secret: the configured one, or the data dir's `secret` file,
    /// created with a fresh random value when absent.
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        if !self.auth.secret.is_empty() {
            return Ok(self.auth.secret.as_bytes().to_vec());
        }
        load_or_create_secret(&self.data_dir)
    }

    /// The admin API's key: the configured one (trimmed), or the data dir's
    /// `admin.key` file, created with a fresh random value when absent.
    pub fn admin_key(&self) -> Result<Vec<u8>, ConfigError> {
        if !self.admin.key.is_empty() {
            return Ok(self.admin.key.expose().trim().as_bytes().to_vec());
        }
        load_or_create_secret_file(&self.data_dir, ADMIN_KEY_FILE)
    }
}

/// The admin key's file in the data dir, when `admin.key` is empty.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// Reads `DIR/secret`; an error if it does not exist or is refused (see
/// [`check_secret_file`]).
pub fn read_secret(data_dir: &Path) -> Result<Vec<u8>, ConfigError> {
    read_secret_file(data_dir, "secret")
}

/// Reads the secret file `DIR/name`; an error if it does not exist or is
/// refused (see [`check_secret_file`]).
pub fn read_secret_file(data_dir: &Path, name: &str) -> Result<Vec<u8>, ConfigError> {
    let path = data_dir.join(name);
    match check_secret_file(&path) {
        Ok(secret) => Ok(secret),
        Err(SecretFile::Io(source)) => Err(ConfigError::Secret { path, source }),
        Err(SecretFile::Refused(reason)) => Err(ConfigError::SecretRefused { path, reason }),
    }
}

/// Why a secret file was not used.
enum SecretFile {
    Io(std::io::Error),
    Refused(String),
}

/// Reads a secret file: a regular file (not a directory, device or pipe),
/// readable by its owner alone, holding at least [`MIN_SECRET_LEN`] bytes
/// once the white space around them is trimmed. Anything less would make
/// an HMAC key anyone can guess or read, so it is refused, not warned of.
fn check_secret_file(path: &Path) -> Result<Vec<u8>, SecretFile> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(SecretFile::Io)?;
    let meta = file.metadata().map_err(SecretFile::Io)?;
    if !meta.is_file() {
        return Err(SecretFile::Refused("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretFile::Refused(format!(
                "mode {mode:04o} lets other users read it; chmod 600 it"
            )));
        }
    }
    let mut text = String::new();
    // A secret is short; a huge file is a mistake, not a key.
    file.take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(SecretFile::Io)?;
    let secret = text.trim();
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretFile::Refused(format!(
            "it holds {} bytes after trimming; a secret must have at least {MIN_SECRET_LEN} \
             (delete the file to have a new random one made)",
            secret.len()
        )));
    }
    Ok(secret.as_bytes().to_vec())
}

/// Reads `DIR/secret`, creating it (and `DIR`) with 32 random bytes in hex if
/// absent. An existing file must pass [`check_secret_file`].
pub fn load_or_create_secret(data_dir: &Path) -> Result<Vec<u8>, ConfigError> {
    load_or_create_secret_file(data_dir, "secret")
}

/// Reads the secret file `DIR/name`, creating it (and `DIR`) with 32 random
/// bytes in hex if absent. An existing file must pass [`check_secret_file`].
pub fn load_or_create_secret_file(data_dir: &Path, name: &str) -> Result<Vec<u8>, ConfigError> {
    let path = data_dir.join(name);
    let err = |source| ConfigError::Secret {
        path: path.clone(),
        source,
    };
    match read_secret_file(data_dir, name) {
        Err(ConfigError::Secret { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    crate::private::create_private_dir(data_dir).map_err(err)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = data_dir.join(format!("{name}.tmp"));
    write_private(&tmp, hex.as_bytes()).map_err(err)?;
    // Two processes racing to create it: the first rename wins for both.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let _ = std::fs::remove_file(&tmp);
    read_secret_file(data_dir, name)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn parse_env_value(value: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), ()> {
    match path {
        [] => Err(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(inner) => set_path(inner, rest, value),
                _ => Err(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None, vec![]).expect("defaults");
        config.validate().expect("valid");
        assert_eq!(config.listen.port(), 3102);
    }

    #[test]
    fn file_then_env_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("natter.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\n[comet]\npush_rto_ms = 100\nmax_body = 10\n",
        )
        .expect("write");
        let config = Config::load(
            Some(&file),
            env(&[
                ("NATTER_COMET__MAX_BODY", "2048"),
                ("NATTER_LOG__FORMAT", "json"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.comet.push_rto_ms, 100);
        assert_eq!(config.comet.max_body, 2048);
        assert_eq!(config.log.format, "json");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(Config::load(None, env(&[("NATTER_NOPE", "1")])).is_err());
        assert!(Config::load(None, env(&[("NATTER_COMET__MAX_BODY", "lots")])).is_err());
        assert!(Config::load(None, env(&[("NATTER_LISTEN__X", "1")])).is_err());
        let mut config = Config::default();
        config.comet.heartbeat_timeout_ms = 1;
        assert!(config.validate().is_err());
        config = Config::default();
        config.groups.push_window_ms = 10_001;
        assert!(config.validate().is_err());
        config = Config::default();
        config.http.header_read_timeout_ms = 0;
        assert!(config.validate().is_err());
        config = Config::default();
        config.http.body_timeout_ms = 3_600_001;
        assert!(config.validate().is_err());
        assert!(
            Config::load(None, env(&[("NATTER_HTTP__IDLE_TIMEOUT_MS", "0")]))
                .expect("loads")
                .validate()
                .is_err()
        );
        config = Config::default();
        config.comet.send_queue_bytes = 1000;
        assert!(config.validate().is_err());
        config = Config::default();
        config.limits.page_bytes = 2 * 1024 * 1024;
        config.comet.send_queue_bytes = 1024 * 1024;
        assert!(
            config.validate().is_err(),
            "a page larger than the send queue"
        );
        config = Config::default();
        config.limits.page_bytes = MAX_PAGE_BYTES + 1;
        config.comet.send_queue_bytes = 64 * 1024 * 1024;
        assert!(
            config.validate().is_err(),
            "a page larger than a gRPC message"
        );
        config = Config::default();
        config.auth.secret = "short".into();
        assert!(config.validate().is_err());
        assert!(
            !format!("{config:?}").contains("short"),
            "secret must not be printed"
        );
    }

    #[test]
    fn the_account_service_settings_load_from_the_environment_and_are_checked() {
        let config = Config::load(
            None,
            env(&[
                ("NATTER_AUTH__VERIFY_URL", "https://accounts.example/verify"),
                ("NATTER_AUTH__VERIFY_TIMEOUT_MS", "500"),
                ("NATTER_AUTH__VERIFY_MAX_CONCURRENT", "8"),
                ("NATTER_AUTH__VERIFY_CACHE_ACCEPTED_SECS", "30"),
                ("NATTER_AUTH__VERIFY_CACHE_REFUSED_SECS", "5"),
                ("NATTER_AUTH__VERIFY_CACHE_ENTRIES", "1000"),
            ]),
        )
        .expect("loads");
        config.validate().expect("valid");
        let a = &config.auth;
        assert_eq!(a.verify_url, "https://accounts.example/verify");
        assert_eq!(
            (
                a.verify_timeout_ms,
                a.verify_max_concurrent,
                a.verify_cache_accepted_secs,
                a.verify_cache_refused_secs,
                a.verify_cache_entries
            ),
            (500, 8, 30, 5, 1000)
        );
        let defaults = Config::default().auth;
        assert_eq!(defaults.verify_url, "", "off by default");
        assert_eq!(
            (
                defaults.verify_timeout_ms,
                defaults.verify_max_concurrent,
                defaults.verify_cache_accepted_secs,
                defaults.verify_cache_refused_secs,
                defaults.verify_cache_entries
            ),
            (2000, 64, 60, 10, 100_000)
        );
        for url in [
            "accounts.example/verify",
            "ftp://accounts.example/verify",
            "redis://accounts.example",
            "http://",
            "https:// spaced.example/",
        ] {
            let mut config = Config::default();
            config.auth.verify_url = url.into();
            let refused = config.validate().expect_err(url).to_string();
            assert!(refused.contains("auth.verify_url"), "{url}: {refused}");
        }
        for url in ["http://127.0.0.1:8080/verify", "https://accounts.example"] {
            let mut config = Config::default();
            config.auth.verify_url = url.into();
            config.validate().unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        for (name, set) in [
            (
                "verify_timeout_ms",
                (|a: &mut AuthConfig| a.verify_timeout_ms = 0) as fn(&mut AuthConfig),
            ),
            ("verify_max_concurrent", |a| a.verify_max_concurrent = 0),
            ("verify_cache_accepted_secs", |a| {
                a.verify_cache_accepted_secs = 0
            }),
            ("verify_cache_refused_secs", |a| {
                a.verify_cache_refused_secs = 0
            }),
            ("verify_cache_entries", |a| a.verify_cache_entries = 0),
        ] {
            let mut config = Config::default();
            set(&mut config.auth);
            let refused = config.validate().expect_err(name).to_string();
            assert!(refused.contains(name), "{name}: {refused}");
        }
    }

    #[test]
    fn credentials_in_the_verify_url_are_never_printed() {
        let mut config = Config::default();
        config.auth.verify_url = "https://natter:hunter2@accounts.example:8443/v?key=s3cret".into();
        config.validate().expect("valid");
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("https://<user>@accounts.example:8443/v?<query>"),
            "{printed}"
        );
        config.auth.verify_url = "http://accounts.example/verify".into();
        assert!(format!("{config:?}").contains("\"http://accounts.example/verify\""));
    }

    #[test]
    fn secrets_shorter_than_32_bytes_are_refused_and_never_printed() {
        let long = "x".repeat(32);
        let padded_short = format!("  {}\n\t ", "y".repeat(31));
        for (name, set) in [
            (
                "auth.secret",
                (|c: &mut Config, v: &str| c.auth.secret = v.into()) as fn(&mut Config, &str),
            ),
            ("rpc.secret", |c, v| c.rpc.secret = v.into()),
        ] {
            let mut config = Config::default();
            set(&mut config, &"y".repeat(31));
            let refused = config.validate().expect_err(name).to_string();
            assert!(refused.contains(name), "{refused}");
            set(&mut config, &padded_short);
            assert!(
                config.validate().is_err(),
                "{name}: white space does not count"
            );
            set(&mut config, &long);
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!format!("{config:?}").contains(&long), "{name} printed");
        }
        let mut config = Config::default();
        config.discovery.username = "natter".into();
        assert!(config.validate().is_err(), "a user without a password");
        config.discovery.password = "pw".into();
        config.validate().expect("etcd credentials");
        assert!(!format!("{config:?}").contains("pw"));
        config.sessions.redis_password = "hunter2".into();
        assert!(config.validate().is_err(), "a Redis password without Redis");
        config.sessions.redis_url = "redis://127.0.0.1:6379/0".into();
        config.validate().expect("Redis credentials");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_short_empty_or_blank_secret_file_refuses_to_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        let short = "z".repeat(31);
        for content in ["", "   \n", "\t\n\n", short.as_str()] {
            write_private(&path, content.as_bytes()).expect("write");
            let refused = read_secret(dir.path()).expect_err(content);
            assert!(
                matches!(refused, ConfigError::SecretRefused { .. }),
                "{content:?}: {refused}"
            );
            // Never replaced by a new one either: the operator must look.
            assert!(load_or_create_secret(dir.path()).is_err(), "{content:?}");
            let config = Config {
                data_dir: dir.path().into(),
                ..Config::default()
            };
            assert!(config.secret().is_err(), "{content:?}");
        }
        write_private(&path, format!(" {} \n", "z".repeat(32)).as_bytes()).expect("write");
        assert_eq!(
            read_secret(dir.path()).expect("32 bytes"),
            "z".repeat(32).into_bytes()
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_can_read_or_that_is_not_a_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        write_private(&path, "s".repeat(40).as_bytes()).expect("write");
        read_secret(dir.path()).expect("0600 is fine");
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let refused = read_secret(dir.path()).expect_err("readable by others");
            assert!(refused.to_string().contains("chmod 600"), "{refused}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        read_secret(dir.path()).expect("0400 is fine");
        let other = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(other.path().join("secret")).expect("a directory named secret");
        let refused = load_or_create_secret(other.path()).expect_err("a directory");
        assert!(refused.to_string().contains("regular file"), "{refused}");
    }

    #[test]
    fn the_example_config_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/natter.toml");
        let example = Config::load(Some(&path), vec![]).expect("example parses");
        assert_eq!(format!("{example:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn the_role_configs_and_the_compose_file_are_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        for name in ["logic.toml", "comet.toml", "record.toml"] {
            let config = Config::load(Some(&deploy.join(name)), vec![])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!config.discovery.etcd_url.is_empty(), "{name} uses etcd");
        }
        // Every NATTER_… setting of docker-compose.yml names a key and
        // validates once the environment's values are filled in, and every
        // secret comes from the environment, never from the file.
        let compose = std::fs::read_to_string(deploy.join("docker-compose.yml")).expect("compose");
        let mut env = Vec::new();
        for line in compose.lines() {
            let line = line.trim();
            let Some((key, value)) = line.split_once(": ") else {
                continue;
            };
            if !key.starts_with("NATTER_") {
                continue;
            }
            // `&name value` defines a YAML anchor; `*name` repeats one.
            let value = value.trim();
            if value.starts_with('*') {
                continue;
            }
            let value = match value.strip_prefix('&') {
                Some(anchored) => anchored.split_once(' ').map(|(_, v)| v).unwrap_or(""),
                None => value,
            };
            let secret = ["SECRET", "PASSWORD"].iter().any(|s| key.contains(s));
            let filled = fill_compose_variables(value);
            if secret {
                assert!(
                    value.starts_with("${") && value.contains(":?"),
                    "{key} must come from the environment, required: {value}"
                );
            }
            if key == "NATTER_STORE__MYSQL_URL" {
                assert!(value.contains(":${NATTER_DB_PASSWORD:?"), "{value}");
            }
            env.push((key.to_string(), filled));
        }
        assert!(env.len() >= 8, "{env:?}");
        let config = Config::load(None, env).expect("compose settings are config keys");
        config.validate().expect("compose settings validate");
        assert!(!config.rpc.secret.is_empty() && !config.discovery.password.is_empty());
        assert!(!config.sessions.redis_password.is_empty());
        let dockerfile = std::fs::read_to_string(deploy.join("Dockerfile")).expect("Dockerfile");
        assert!(
            !dockerfile.contains("3202") && !dockerfile.contains("3210"),
            "the gRPC plane is not exposed"
        );
        assert!(
            dockerfile.contains("\nUSER natter") && dockerfile.contains("-m 0700 /data"),
            "the image runs as a user of its own with a private data dir"
        );
        assert!(
            !compose.contains(":3202\"]") && !compose.contains(":3210\"]"),
            "the gRPC plane is not published"
        );
    }

    /// Compose's `${VAR:?message}` with a value of 40 bytes naming VAR.
    fn fill_compose_variables(value: &str) -> String {
        let mut out = String::new();
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').expect("closed") + start;
            let var = rest[start + 2..end].split(':').next().unwrap_or("");
            out.push_str(&format!("{var:-<40}"));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn the_admin_settings_load_from_the_environment_and_are_checked() {
        let defaults = Config::default().admin;
        assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 3104)));
        assert!(defaults.key.is_empty(), "the data dir's key by default");
        assert_eq!(defaults.system_sender, "system");
        let key = "k".repeat(40);
        let config = Config::load(
            None,
            env(&[
                ("NATTER_ADMIN__LISTEN", "10.0.0.5:4000"),
                ("NATTER_ADMIN__KEY", &key),
                ("NATTER_ADMIN__SYSTEM_SENDER", "notices@app"),
            ]),
        )
        .expect("loads");
        config.validate().expect("valid");
        assert_eq!(config.admin.listen, "10.0.0.5:4000".parse().expect("addr"));
        assert_eq!(config.admin.system_sender, "notices@app");
        assert_eq!(config.admin_key().expect("configured"), key.as_bytes());
        assert!(!format!("{config:?}").contains(&key), "the key is printed");
        for (what, set) in [
            (
                "a short key",
                (|c: &mut Config| c.admin.key = "k".repeat(31).into()) as fn(&mut Config),
            ),
            ("the token secret as key", |c| {
                c.auth.secret = "s".repeat(32);
                c.admin.key = "s".repeat(32).into();
            }),
            ("the cluster secret as key", |c| {
                c.rpc.secret = "r".repeat(32).into();
                c.admin.key = "r".repeat(32).into();
            }),
            ("the public listener", |c| c.admin.listen = c.listen),
            ("the gRPC listener", |c| c.admin.listen = c.rpc.listen),
            ("an empty system sender", |c| {
                c.admin.system_sender = "".into()
            }),
            ("a system sender with a space", |c| {
                c.admin.system_sender = "the system".into()
            }),
            ("a system sender of 65 bytes", |c| {
                c.admin.system_sender = "s".repeat(65)
            }),
        ] {
            let mut config = Config::default();
            set(&mut config);
            let refused = config.validate().expect_err(what).to_string();
            assert!(refused.contains("admin."), "{what}: {refused}");
        }
        let mut config = Config::default();
        config.admin.listen = "127.0.0.1:0".parse().expect("addr");
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config
            .validate()
            .expect("port 0 on both: two different free ports");
        assert!(Config::load(None, env(&[("NATTER_ADMIN__LISTEN", "nowhere")])).is_err());
    }

    #[test]
    fn the_admin_key_is_created_in_the_data_dir_once_apart_from_the_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let key = config.admin_key().expect("create");
        assert_eq!(key.len(), 64);
        assert_eq!(config.admin_key().expect("read"), key, "reused");
        assert_ne!(config.secret().expect("secret"), key, "a key of its own");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(config.data_dir.join(ADMIN_KEY_FILE))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A key file anyone could read, or too short, refuses to start.
        write_private(&config.data_dir.join(ADMIN_KEY_FILE), b"short").expect("write");
        assert!(config.admin_key().is_err(), "a short key file");
    }

    #[test]
    fn secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = load_or_create_secret(&data).expect("create");
        assert_eq!(first.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.join("secret"))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(load_or_create_secret(&data).expect("read"), first);
    }
}
