//! The SQLite implementation of [`MessageStore`], for the embedded shape.
//!
//! WAL mode; `synchronous=FULL` when commits must survive a power loss,
//! `NORMAL` otherwise (a process crash loses nothing either way). Writes are
//! serialized by one lock and come in batches from the committer, so the
//! per-conversation and per-user sequence counters are cached in memory
//! while the process is the only writer of the file.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::Mutex;

use crate::batch::{
    cursor_key, expiry_mid_bound, touched, walk, CursorKey, DedupeKey, DeviceCursor, Effect, Key,
    ReadKey, Walk,
};
use crate::store::*;
use natter_proto::UserId;

/// The store's migrations, in order: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "messages",
        include_str!("../migrations/sqlite/0001_messages.sql"),
    ),
    (
        2,
        "groups",
        include_str!("../migrations/sqlite/0002_groups.sql"),
    ),
    (
        3,
        "health",
        include_str!("../migrations/sqlite/0003_health.sql"),
    ),
    (
        4,
        "string user ids",
        include_str!("../migrations/sqlite/0004_string_user_ids.sql"),
    ),
    (
        5,
        "user logout",
        include_str!("../migrations/sqlite/0005_user_logout.sql"),
    ),
    (
        6,
        "conversations",
        include_str!("../migrations/sqlite/0006_conversations.sql"),
    ),
    (
        7,
        "search",
        include_str!("../migrations/sqlite/0007_search.sql"),
    ),
];

fn migrator() -> Migrator {
    crate::migrations::migrator(MIGRATIONS, false)
}

/// Options for [`SqliteStore::open`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub synchronous: bool,
    pub readers: u32,
    pub acquire_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: true,
            readers: 4,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Entries each cache of the writer holds before it is emptied (its values
/// reload from the tables on demand).
const CACHE_LIMIT: usize = 200_000;

/// Device cursors changed since they were last written out. Cursor rows
/// are written at most this often (and on close): a push-ack per delivery
/// would otherwise be a row write per delivery. A crash loses at most this
/// much cursor progress, which costs only re-delivery of messages the
/// device already has (clients drop duplicates by mid).
const CURSOR_FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Changed cursors held before they are written out regardless of time.
const DIRTY_LIMIT: usize = 50_000;

/// State cached by the single writer.
struct Counters {
    /// Each user's internal id (`users.id`), as committed: a batch that
    /// fails resets the whole cache, so no id of a rolled-back insert stays.
    ids: HashMap<UserId, i64>,
    conv: HashMap<String, u64>,
    user: HashMap<UserId, u64>,
    devices: HashMap<CursorKey, DeviceCursor>,
    /// Cursors changed in memory and not yet written.
    dirty: HashSet<CursorKey>,
    flushed_at: std::time::Instant,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            ids: HashMap::new(),
            conv: HashMap::new(),
            user: HashMap::new(),
            devices: HashMap::new(),
            dirty: HashSet::new(),
            flushed_at: std::time::Instant::now(),
        }
    }
}

impl Counters {
    /// Keeps memory bounded on a long-lived server with many users.
    fn trim(&mut self) {
        if self.ids.len() > CACHE_LIMIT {
            self.ids.clear();
        }
        if self.conv.len() > CACHE_LIMIT {
            self.conv.clear();
        }
        if self.user.len() > CACHE_LIMIT {
            self.user.clear();
        }
        // Changed cursors are written out before their cache can go.
        if self.devices.len() > CACHE_LIMIT && self.dirty.is_empty() {
            self.devices.clear();
        }
    }

    /// The internal id of a user resolved by [`resolve_ids`] in this batch.
    fn id(&self, uid: &UserId) -> Result<i64, sqlx::Error> {
        self.ids.get(uid).copied().ok_or_else(|| {
            sqlx::Error::Protocol(format!("user {uid} was not resolved to its internal id"))
        })
    }

    fn flush_due(&self) -> bool {
        !self.dirty.is_empty()
            && (self.flushed_at.elapsed() >= CURSOR_FLUSH_EVERY
                || self.dirty.len() >= DIRTY_LIMIT
                || self.devices.len() > CACHE_LIMIT)
    }
}

pub struct SqliteStore {
    pool: SqlitePool,
    /// Shared with the search indexer, which writes under it too.
    writer: Arc<Mutex<Counters>>,
    /// The search indexer ([`crate::search::sqlite`]), stopped on close.
    indexer: tokio::task::JoinHandle<()>,
    /// Committed cursor values not yet in the tables, for [`MessageStore::cursor`].
    unflushed: std::sync::Mutex<HashMap<CursorKey, u64>>,
    /// Whether writes fail (see [`MessageStore::ping`]).
    health: WriteHealth,
}

/// How long after a failed write `ping` reports the store down without
/// trying; after that, `ping` tries a write of its own, so that an idle
/// store becomes ready again once it can write (a disk that has room again).
const PROBE_AFTER: Duration = Duration::from_secs(2);

/// Whether a SQLite database can write, for readiness: down from a failed
/// write until a write succeeds (a batch, or a probe of the caller's).
#[derive(Default)]
pub struct WriteHealth {
    /// When the last write failed, while no write has succeeded since.
    failing_since: std::sync::Mutex<Option<std::time::Instant>>,
}

/// What a readiness check should do, by [`WriteHealth::check`].
#[derive(Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// Writes work: a read will do.
    Read,
    /// A write failed moments ago: report down without trying.
    Down,
    /// A write failed a while ago: try a small write to learn whether it
    /// works again, and report its outcome with [`WriteHealth::wrote`].
    Probe,
}

impl WriteHealth {
    /// Records a write's outcome.
    pub fn wrote(&self, ok: bool) {
        let mut failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match (ok, *failing) {
            (true, _) => *failing = None,
            (false, None) => *failing = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }

    pub fn check(&self) -> HealthCheck {
        let failing = *self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match failing {
            None => HealthCheck::Read,
            Some(since) if since.elapsed() < PROBE_AFTER => HealthCheck::Down,
            Some(_) => HealthCheck::Probe,
        }
    }
}

/// The probe of [`HealthCheck::Probe`]: rewrites the one row of a `health`
/// table (`id` 1, `at`) in a write transaction of its own.
pub async fn probe_write(pool: &SqlitePool) -> Result<(), sqlx::Error> {
    let mut tx = WriteTx::begin(pool).await?;
    sqlx::query(
        "INSERT INTO health (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
    )
    .bind(natter_node::ids::now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(path: &Path, options: &SqliteOptions) -> Result<SqliteStore, StoreError> {
        // Messages are private to the server's user: the file (and so its
        // -wal and -shm) is 0600.
        natter_node::private::prepare_private_file(path).map_err(sqlx::Error::Io)?;
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.synchronous {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(false)
            // The default page cache (2 MiB) makes every batch re-read index
            // pages through the kernel once the database outgrows it.
            .pragma("cache_size", "-65536")
            .pragma("mmap_size", "268435456")
            .pragma("temp_store", "memory")
            // The commit that finds the WAL past this many pages checkpoints it
            // (which is what bounds the WAL). The background loop below copies
            // most frames before then, and a larger WAL holds each hot index
            // page once per checkpoint rather than once per thousand pages.
            .pragma("wal_autocheckpoint", "8192");
        let pool = SqlitePoolOptions::new()
            .max_connections(options.readers + 1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        SqliteStore::with_pool(pool).await
    }

    /// Migrates the database behind `pool` and starts its checkpoints.
    async fn with_pool(pool: SqlitePool) -> Result<SqliteStore, StoreError> {
        migrator().run(&pool).await?;
        tokio::spawn(checkpoint_loop(pool.clone()));
        let writer = Arc::new(Mutex::new(Counters::default()));
        let indexer = crate::search::sqlite::spawn_indexer(pool.clone(), writer.clone());
        Ok(SqliteStore {
            pool,
            writer,
            indexer,
            unflushed: std::sync::Mutex::new(HashMap::new()),
            health: WriteHealth::default(),
        })
    }

    /// An in-memory database, for tests.
    pub async fn memory() -> Result<SqliteStore, StoreError> {
        let connect = SqliteConnectOptions::from_str("sqlite::memory:")?;
        // One connection: every connection to :memory: is a database of its own.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await?;
        SqliteStore::with_pool(pool).await
    }

    fn closed(&self) -> Result<(), StoreError> {
        if self.pool.is_closed() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // A store dropped without `close` stops its indexer all the same
        // (what it had not indexed stays queued).
        self.indexer.abort();
    }
}

/// Copies committed WAL frames into the database file in the background, so
/// that the checkpoint SQLite runs inside a commit when the WAL passes its
/// threshold (which is what keeps the WAL from growing) finds little left to
/// copy and does not stall that commit's acks. Ends when the pool is closed.
async fn checkpoint_loop(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// A write transaction (`BEGIN IMMEDIATE`) on a pooled connection of its
/// own. A connection whose transaction did not commit is closed, never
/// handed back to the pool: on errors such as `SQLITE_FULL` SQLite may roll
/// the transaction back by itself, the `ROLLBACK` sqlx then issues fails,
/// and sqlx's `Transaction` would return a connection that believes it is
/// still inside a transaction, failing every later `BEGIN` on it until a
/// restart. Closing it costs one reconnect on a path that already failed.
pub struct WriteTx {
    conn: sqlx::pool::PoolConnection<sqlx::Sqlite>,
    open: bool,
}

impl WriteTx {
    pub async fn begin(pool: &SqlitePool) -> Result<WriteTx, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
            conn.close_on_drop();
            return Err(e);
        }
        Ok(WriteTx { conn, open: true })
    }

    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }

    /// Ends the transaction without writing (the connection is closed if
    /// even that fails).
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// How often the background checkpoint runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// A message's columns with its users' ids as strings (tables `m`, and
/// `su`/`ru` of [`USER_JOINS`]).
pub(crate) const MESSAGE_COLUMNS: &str = "m.mid, m.conv_id, m.conv_seq, su.uid AS sender, m.sender_device, m.client_seq, ru.uid AS receiver, m.msg_type, m.content, m.created_at, m.edited_at, m.revoked_at";
/// Turns a message's sender and receiver ids (`m`) back into strings; a
/// group message's receiver (0) joins no user.
pub(crate) const USER_JOINS: &str =
    "JOIN users su ON su.id = m.sender LEFT JOIN users ru ON ru.id = m.receiver";

pub(crate) fn message_from_row(row: &SqliteRow) -> Result<StoredMessage, sqlx::Error> {
    let conversation: String = row.try_get("conv_id")?;
    let receiver: Option<String> = row.try_get("receiver")?;
    Ok(StoredMessage {
        mid: row.try_get::<i64, _>("mid")? as u64,
        conv_seq: row.try_get::<i64, _>("conv_seq")? as u64,
        sender: user_id(row.try_get("sender")?)?,
        sender_device: row.try_get("sender_device")?,
        client_seq: row.try_get::<i64, _>("client_seq")? as u64,
        to: peer(&conversation, receiver.unwrap_or_default())?,
        msg_type: row.try_get::<i64, _>("msg_type")? as u32,
        content: row.try_get("content")?,
        time_ms: row.try_get("created_at")?,
        edited_ms: row.try_get("edited_at")?,
        revoked_ms: row.try_get("revoked_at")?,
        conversation,
    })
}

// Every batch statement takes its rows as one JSON array parameter, read
// with `json_each`. The SQL text never changes with the batch size, so each
// statement is prepared once per connection and cached; and the joins below
// let SQLite search an index once per row instead of scanning a table (see
// the plan test at the end of this file). Users are their internal ids
// (`users.id`) in every statement of the writer.

const KNOWN_IDS_SQL: &str =
    "SELECT u.id, u.uid FROM json_each(?1) AS k JOIN users u ON u.uid = k.value";
const NEW_IDS_SQL: &str =
    "INSERT INTO users (uid) SELECT k.value FROM json_each(?1) AS k WHERE true RETURNING id, uid";
const DEDUPE_SQL: &str = "SELECT m.mid, m.conv_id, m.conv_seq, su.uid AS sender, m.sender_device, m.client_seq, ru.uid AS receiver, m.msg_type, m.content, m.created_at, m.edited_at, m.revoked_at, \
     m.sender AS sender_id, m.receiver AS receiver_id \
     FROM json_each(?1) AS k JOIN message m \
     ON m.sender = k.value->>0 AND m.sender_device = k.value->>1 AND m.client_seq = k.value->>2 \
     JOIN users su ON su.id = m.sender LEFT JOIN users ru ON ru.id = m.receiver";
const RELATION_SEQS_SQL: &str = "SELECT owner, user_seq FROM relation \
     WHERE (owner = ?1 AND other = ?2 AND mid = ?3) OR (owner = ?2 AND other = ?1 AND mid = ?3)";
const CONVERSATIONS_SQL: &str =
    "SELECT c.conv_id, c.last_seq FROM json_each(?1) AS k JOIN conversation c ON c.conv_id = k.value";
const USERS_SQL: &str =
    "SELECT u.owner, u.last_seq FROM json_each(?1) AS k JOIN user_sequence u ON u.owner = k.value";
const CURSORS_SQL: &str =
    "SELECT d.owner, d.device, 0, d.cursor FROM json_each(?1) AS k JOIN device d \
     ON d.owner = k.value->>0 AND d.device = k.value->>1";
const GROUP_CURSORS_SQL: &str =
    "SELECT d.owner, d.device, d.gid, d.cursor FROM json_each(?1) AS k JOIN group_cursor d \
     ON d.owner = k.value->>0 AND d.device = k.value->>1 AND d.gid = k.value->>2";
/// One user's (by its string) cursors of the groups in ?3, on one device.
const READ_GROUP_CURSORS_SQL: &str =
    "SELECT d.gid, d.cursor FROM json_each(?3) AS k JOIN group_cursor d \
     ON d.owner = (SELECT id FROM users WHERE uid = ?1) AND d.device = ?2 AND d.gid = k.value";
const INSERT_MESSAGES_SQL: &str = "INSERT INTO message (mid, conv_id, conv_seq, sender, sender_device, client_seq, receiver, msg_type, content, created_at) \
     SELECT k.value->>0, k.value->>1, k.value->>2, k.value->>3, k.value->>4, k.value->>5, k.value->>6, k.value->>7, unhex(k.value->>8), k.value->>9 \
     FROM json_each(?1) AS k";
const INSERT_RELATIONS_SQL: &str = "INSERT INTO relation (owner, user_seq, mid, other, direction, received, created_at) \
     SELECT k.value->>0, k.value->>1, k.value->>2, k.value->>3, k.value->>4, 0, k.value->>5 FROM json_each(?1) AS k";
const MARK_RECEIVED_SQL: &str = "UPDATE relation SET received = 1 FROM json_each(?1) AS k \
     WHERE relation.owner = k.value->>0 AND relation.user_seq = k.value->>1";
const UPSERT_CURSORS_SQL: &str = "INSERT INTO device (owner, device, cursor, updated_at) \
     SELECT k.value->>0, k.value->>1, k.value->>2, ?2 FROM json_each(?1) AS k WHERE true \
     ON CONFLICT (owner, device) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at";
const UPSERT_GROUP_CURSORS_SQL: &str = "INSERT INTO group_cursor (owner, device, gid, cursor, updated_at) \
     SELECT k.value->>0, k.value->>1, k.value->>2, k.value->>3, ?2 FROM json_each(?1) AS k WHERE true \
     ON CONFLICT (owner, device, gid) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at";
const UPSERT_CONVERSATIONS_SQL: &str = "INSERT INTO conversation (conv_id, last_seq, last_mid) \
     SELECT k.value->>0, k.value->>1, k.value->>2 FROM json_each(?1) AS k WHERE true \
     ON CONFLICT (conv_id) DO UPDATE SET last_seq = excluded.last_seq, last_mid = excluded.last_mid";
/// A user's row moves only when its read cursor does: a receiver's row,
/// once there, is not written again by a message.
const UPSERT_CHATS_SQL: &str = "INSERT INTO chat (owner, conv_id, peer, read_seq) \
     SELECT k.value->>0, k.value->>1, k.value->>2, k.value->>3 FROM json_each(?1) AS k WHERE true \
     ON CONFLICT (owner, conv_id) DO UPDATE SET read_seq = excluded.read_seq \
     WHERE excluded.read_seq > chat.read_seq";
const READ_CURSORS_SQL: &str = "SELECT c.owner, c.conv_id, c.read_seq FROM json_each(?1) AS k \
     JOIN chat c ON c.owner = k.value->>0 AND c.conv_id = k.value->>1";
const INSERT_MARKERS_SQL: &str = "INSERT OR IGNORE INTO conv_marker (conv_id, conv_seq, target) \
     SELECT k.value->>0, k.value->>1, k.value->>2 FROM json_each(?1) AS k";
/// Markers after a read cursor, up to the conversation's newest position.
const MARKERS_AFTER_SQL: &str =
    "SELECT count(*) FROM conv_marker WHERE conv_id = ?1 AND conv_seq > ?2 AND conv_seq <= ?3";
const REVOKE_SQL: &str = "UPDATE message SET content = x'', revoked_at = ?1 \
     WHERE mid = ?2 AND conv_id = ?3 AND revoked_at = 0";
/// The edits of a revoked message lose their text too.
const REVOKE_EDITS_SQL: &str = "UPDATE message SET content = ?1 \
     WHERE msg_type = 13 AND (conv_id, conv_seq) IN \
     (SELECT conv_id, conv_seq FROM conv_marker WHERE target = ?2 AND conv_id = ?3)";
const EDIT_SQL: &str = "UPDATE message SET content = ?1, edited_at = ?2 \
     WHERE mid = ?3 AND conv_id = ?4 AND revoked_at = 0 AND msg_type = 1";
const FORGET_SQL: &str = "DELETE FROM chat WHERE owner = ?1 AND conv_id = ?2";
/// A page of a user's one-to-one conversations after a key, in list order,
/// with the conversation's newest position, the markers after the user's
/// cursor, and the other user's cursor.
const LIST_P2P_SQL: &str = "SELECT h.conv_id, pu.uid AS peer_uid, h.read_seq, h.pinned, h.push, \
     coalesce(c.last_mid, 0) AS last_mid, \
     coalesce(c.last_seq, 0) AS last_seq, \
     (SELECT count(*) FROM conv_marker k WHERE k.conv_id = h.conv_id AND k.conv_seq > h.read_seq) AS markers, \
     coalesce((SELECT o.read_seq FROM chat o WHERE o.owner = h.peer AND o.conv_id = h.conv_id), 0) AS peer_read \
     FROM chat h JOIN users pu ON pu.id = h.peer LEFT JOIN conversation c ON c.conv_id = h.conv_id \
     WHERE h.owner = (SELECT id FROM users WHERE uid = ?1) AND h.peer != 0 \
       AND (h.pinned, coalesce(c.last_mid, 0), h.conv_id) < (?2, ?3, ?4) \
     ORDER BY h.pinned DESC, coalesce(c.last_mid, 0) DESC, h.conv_id DESC LIMIT ?5";
/// The user's groups ([conversation, floor] pairs in ?2): each one's newest
/// position and mid, the user's row, and the markers after the cursor.
const LIST_GROUPS_SQL: &str = "SELECT k.value->>0 AS conv_id, k.value->>1 AS floor, \
     coalesce(c.last_seq, 0) AS last_seq, coalesce(c.last_mid, 0) AS last_mid, \
     coalesce(h.read_seq, 0) AS read_seq, coalesce(h.pinned, 0) AS pinned, coalesce(h.push, 0) AS push, \
     (SELECT count(*) FROM conv_marker mk WHERE mk.conv_id = k.value->>0 \
        AND mk.conv_seq > max(coalesce(h.read_seq, 0), k.value->>1)) AS markers \
     FROM json_each(?2) AS k LEFT JOIN conversation c ON c.conv_id = k.value->>0 \
     LEFT JOIN chat h ON h.owner = (SELECT id FROM users WHERE uid = ?1) AND h.conv_id = k.value->>0";
const READ_STATE_SQL: &str = "SELECT coalesce((SELECT last_seq FROM conversation WHERE conv_id = ?1), 0), \
     coalesce((SELECT read_seq FROM chat WHERE conv_id = ?1 AND owner = (SELECT id FROM users WHERE uid = ?2)), 0)";
/// Creates the user's row if needed and changes the settings given (NULL
/// keeps one); returns them.
const SET_SETTINGS_SQL: &str = "INSERT INTO chat (owner, conv_id, peer, pinned, push) \
     VALUES ((SELECT id FROM users WHERE uid = ?1), ?2, coalesce((SELECT id FROM users WHERE uid = ?3), 0), \
             coalesce(?4, 0), coalesce(?5, 0)) \
     ON CONFLICT (owner, conv_id) DO UPDATE SET pinned = coalesce(?4, pinned), push = coalesce(?5, push) \
     RETURNING pinned, push";
const UPSERT_USERS_SQL: &str = "INSERT INTO user_sequence (owner, last_seq) \
     SELECT k.value->>0, k.value->>1 FROM json_each(?1) AS k WHERE true \
     ON CONFLICT (owner) DO UPDATE SET last_seq = excluded.last_seq";

pub(crate) fn json(rows: impl serde::Serialize) -> String {
    serde_json::to_string(&rows)
        .unwrap_or_else(|_| unreachable!("numbers and strings always serialize"))
}

/// Runs one of the batch statements above with its rows.
async fn write_rows(
    conn: &mut SqliteConnection,
    sql: &'static str,
    rows: impl serde::Serialize,
) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .bind(json(rows))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// Caches the internal ids of `uids` not cached yet: one look-up for all of
/// them, then one insert for those seen for the first time. Runs in the
/// caller's transaction; if that does not commit, the caller resets the
/// cache, so no id it never committed stays cached.
async fn resolve_ids<'a>(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    uids: impl Iterator<Item = &'a UserId>,
) -> Result<(), sqlx::Error> {
    let mut missing: Vec<&UserId> = uids.filter(|u| !counters.ids.contains_key(*u)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    missing.dedup();
    let mut wanted: HashMap<&str, &UserId> = missing.iter().map(|u| (u.as_str(), *u)).collect();
    let known: Vec<(i64, String)> = sqlx::query_as(KNOWN_IDS_SQL)
        .bind(json(&missing))
        .fetch_all(&mut *conn)
        .await?;
    for (id, uid) in known {
        if let Some(user) = wanted.remove(uid.as_str()) {
            counters.ids.insert(user.clone(), id);
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let new: Vec<&str> = wanted.keys().copied().collect();
    let inserted: Vec<(i64, String)> = sqlx::query_as(NEW_IDS_SQL)
        .bind(json(&new))
        .fetch_all(&mut *conn)
        .await?;
    for (id, uid) in inserted {
        if let Some(user) = wanted.remove(uid.as_str()) {
            counters.ids.insert(user.clone(), id);
        }
    }
    Ok(())
}

/// Messages already stored under any of `keys`, with both parties' stream
/// positions. Every sender's id is resolved.
async fn find_existing(
    conn: &mut SqliteConnection,
    counters: &Counters,
    keys: &[Key<'_>],
) -> Result<HashMap<DedupeKey, Stored>, sqlx::Error> {
    let mut by_id = Vec::with_capacity(keys.len());
    for (sender, device, seq) in keys {
        by_id.push((counters.id(sender)?, *device, *seq));
    }
    let rows = sqlx::query(DEDUPE_SQL)
        .bind(json(&by_id))
        .fetch_all(&mut *conn)
        .await?;
    let mut found = HashMap::new();
    for row in &rows {
        let message = message_from_row(row)?;
        let sender_id: i64 = row.try_get("sender_id")?;
        let receiver_id: i64 = row.try_get("receiver_id")?;
        // Group messages have no relation rows: their position is conv_seq.
        let seqs: Vec<(i64, i64)> = match message.to.user() {
            None => Vec::new(),
            Some(_) => {
                sqlx::query_as(RELATION_SEQS_SQL)
                    .bind(sender_id)
                    .bind(receiver_id)
                    .bind(message.mid as i64)
                    .fetch_all(&mut *conn)
                    .await?
            }
        };
        let seq_of = |owner: Option<i64>| {
            seqs.iter()
                .find(|(o, _)| Some(*o) == owner)
                .map(|(_, s)| *s as u64)
                .unwrap_or(0)
        };
        let receiver = message.to.user().map(|_| receiver_id);
        let (sender_seq, receiver_seq) = (seq_of(Some(sender_id)), seq_of(receiver));
        found.insert(
            (
                message.sender.clone(),
                message.sender_device.clone(),
                message.client_seq,
            ),
            Stored {
                message,
                sender_seq,
                receiver_seq,
                repeat: true,
            },
        );
    }
    Ok(found)
}

/// Loads the last sequence numbers of conversations and users not cached
/// yet. Every user's id is resolved.
async fn load_counters(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    convs: &[String],
    users: &[UserId],
) -> Result<(), sqlx::Error> {
    let convs: Vec<&String> = convs
        .iter()
        .filter(|c| !counters.conv.contains_key(*c))
        .collect();
    if !convs.is_empty() {
        let rows: Vec<(String, i64)> = sqlx::query_as(CONVERSATIONS_SQL)
            .bind(json(&convs))
            .fetch_all(&mut *conn)
            .await?;
        let mut known: HashMap<String, u64> =
            rows.into_iter().map(|(c, s)| (c, s as u64)).collect();
        for conv in convs {
            counters
                .conv
                .insert(conv.clone(), known.remove(conv).unwrap_or(0));
        }
    }
    let mut users_by_id: Vec<(i64, &UserId)> = Vec::new();
    for owner in users.iter().filter(|u| !counters.user.contains_key(*u)) {
        users_by_id.push((counters.id(owner)?, owner));
    }
    if !users_by_id.is_empty() {
        let ids: Vec<i64> = users_by_id.iter().map(|(id, _)| *id).collect();
        let rows: Vec<(i64, i64)> = sqlx::query_as(USERS_SQL)
            .bind(json(&ids))
            .fetch_all(&mut *conn)
            .await?;
        let known: HashMap<i64, u64> = rows.into_iter().map(|(o, s)| (o, s as u64)).collect();
        for (id, owner) in users_by_id {
            let last = known.get(&id).copied().unwrap_or(0);
            counters.user.insert(owner.clone(), last);
        }
    }
    Ok(())
}

/// Loads the stored cursors of devices not cached yet (absent: 0). Every
/// owner's id is resolved.
async fn load_cursors(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    devices: &[CursorKey],
) -> Result<(), sqlx::Error> {
    let missing: Vec<&CursorKey> = devices
        .iter()
        .filter(|d| !counters.devices.contains_key(*d))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut owners: HashMap<i64, &UserId> = HashMap::new();
    let mut streams = Vec::new();
    let mut groups = Vec::new();
    for key in &missing {
        let id = counters.id(&key.0)?;
        owners.insert(id, &key.0);
        if key.2 == 0 {
            streams.push((id, key.1.as_str()));
        } else {
            groups.push((id, key.1.as_str(), key.2));
        }
    }
    let mut rows: Vec<(i64, String, i64, i64)> = Vec::new();
    if !streams.is_empty() {
        rows.extend(
            sqlx::query_as(CURSORS_SQL)
                .bind(json(&streams))
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    if !groups.is_empty() {
        rows.extend(
            sqlx::query_as(GROUP_CURSORS_SQL)
                .bind(json(&groups))
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    let mut stored: HashMap<CursorKey, u64> = HashMap::with_capacity(rows.len());
    for (owner, device, group, cursor) in rows {
        if let Some(owner) = owners.get(&owner) {
            stored.insert(((*owner).clone(), device, group as u64), cursor as u64);
        }
    }
    for key in missing {
        let contiguous = stored.remove(key).unwrap_or(0);
        counters.devices.insert(
            key.clone(),
            DeviceCursor {
                contiguous,
                above: BTreeSet::new(),
            },
        );
    }
    Ok(())
}

/// Applies a batch with a handful of multi-row statements, whatever its size:
/// one round of look-ups (user ids, duplicates, counters, cursors), then one
/// insert per table. Statement count, not rows, is what a batch costs.
async fn apply(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    writes: &[Write],
) -> Result<Vec<Outcome>, sqlx::Error> {
    // Look-ups for everything the batch touches.
    let touched = touched(writes);
    counters.trim();
    // Every user the batch names: senders (in the dedupe keys), receivers,
    // and cursor owners.
    resolve_ids(
        conn,
        counters,
        touched
            .users
            .iter()
            .chain(touched.keys.iter().map(|k| &k.0))
            .chain(touched.devices.iter().map(|d| &d.0))
            .chain(writes.iter().filter_map(|w| match w {
                Write::Read { owner, .. } | Write::Forget { owner, .. } => Some(owner),
                _ => None,
            })),
    )
    .await?;
    let keys: Vec<Key<'_>> = touched
        .keys
        .iter()
        .map(|(sender, device, seq)| (sender, device.as_str(), *seq))
        .collect();
    let existing = if keys.is_empty() {
        HashMap::new()
    } else {
        find_existing(conn, counters, &keys).await?
    };
    load_counters(conn, counters, &touched.convs, &touched.users).await?;
    load_cursors(conn, counters, &touched.devices).await?;
    let read_cursors = load_read_cursors(conn, counters, writes).await?;
    // Walk the batch in order, in memory.
    let Walk {
        mut outcomes,
        messages,
        relations,
        received,
        touched_convs,
        touched_users,
        chats,
        last_mids,
        markers,
        effects,
        forget,
        reads,
    } = walk(
        writes,
        &existing,
        &mut counters.conv,
        &mut counters.user,
        &mut counters.devices,
        &read_cursors,
    );
    // Write it out: one statement per table.
    if !messages.is_empty() {
        let mut rows = Vec::with_capacity(messages.len());
        for m in &messages {
            rows.push((
                m.mid,
                &m.conversation,
                m.conv_seq,
                counters.id(&m.sender)?,
                &m.sender_device,
                m.client_seq,
                match m.to.user() {
                    Some(receiver) => counters.id(receiver)?,
                    None => 0,
                },
                m.msg_type,
                hex(&m.content),
                m.time_ms,
            ));
        }
        write_rows(conn, INSERT_MESSAGES_SQL, rows).await?;
        crate::search::sqlite::queue(conn, &messages).await?;
    }
    if !relations.is_empty() {
        let mut rows = Vec::with_capacity(relations.len());
        for r in &relations {
            rows.push((
                counters.id(&r.owner)?,
                r.user_seq,
                r.mid,
                counters.id(&r.other)?,
                r.direction,
                r.time_ms,
            ));
        }
        write_rows(conn, INSERT_RELATIONS_SQL, rows).await?;
    }
    if !received.is_empty() {
        let mut rows = Vec::with_capacity(received.len());
        for (owner, seq) in &received {
            rows.push((counters.id(owner)?, *seq));
        }
        write_rows(conn, MARK_RECEIVED_SQL, rows).await?;
    }
    counters.dirty.extend(touched.devices);
    // A device that set its cursor (it may have moved back) is written at
    // once: the stored value must never be ahead of what the device holds.
    let set = writes.iter().any(|w| matches!(w, Write::SetCursor { .. }));
    if set || counters.flush_due() {
        flush_cursors(conn, counters).await?;
    }
    if !touched_convs.is_empty() {
        let last_mid: HashMap<&str, u64> =
            last_mids.iter().map(|(c, m)| (c.as_str(), *m)).collect();
        let rows: Vec<_> = touched_convs
            .iter()
            .map(|c| {
                (
                    c,
                    counters.conv.get(c).copied().unwrap_or(0),
                    last_mid.get(c.as_str()).copied().unwrap_or(0),
                )
            })
            .collect();
        write_rows(conn, UPSERT_CONVERSATIONS_SQL, rows).await?;
    }
    if !chats.is_empty() {
        let mut rows = Vec::with_capacity(chats.len());
        for c in &chats {
            let peer = match &c.peer {
                Some(peer) => counters.id(peer)?,
                None => 0,
            };
            rows.push((counters.id(&c.owner)?, &c.conversation, peer, c.read_seq));
        }
        write_rows(conn, UPSERT_CHATS_SQL, rows).await?;
    }
    if !markers.is_empty() {
        write_rows(conn, INSERT_MARKERS_SQL, &markers).await?;
    }
    for effect in &effects {
        apply_effect(conn, effect).await?;
    }
    for (owner, conversation) in &forget {
        sqlx::query(FORGET_SQL)
            .bind(counters.id(owner)?)
            .bind(conversation)
            .execute(&mut *conn)
            .await?;
    }
    for (index, (_, conversation), _) in &reads {
        if let Some(Outcome::Read(state)) = outcomes.get_mut(*index) {
            let markers: i64 = sqlx::query_scalar(MARKERS_AFTER_SQL)
                .bind(conversation)
                .bind(state.read_seq as i64)
                .bind(state.last_seq as i64)
                .fetch_one(&mut *conn)
                .await?;
            state.unread = unread(state.last_seq, state.read_seq, markers);
        }
    }
    if !touched_users.is_empty() {
        let mut rows = Vec::with_capacity(touched_users.len());
        for u in &touched_users {
            rows.push((counters.id(u)?, counters.user.get(u).copied().unwrap_or(0)));
        }
        write_rows(conn, UPSERT_USERS_SQL, rows).await?;
    }
    Ok(outcomes)
}

/// Messages from others after a read cursor: the positions after it that
/// are not markers.
fn unread(last_seq: u64, read_seq: u64, markers: i64) -> u64 {
    last_seq
        .saturating_sub(read_seq)
        .saturating_sub(markers.max(0) as u64)
}

/// The stored read cursors of the batch's reads (absent: none yet).
async fn load_read_cursors(
    conn: &mut SqliteConnection,
    counters: &Counters,
    writes: &[Write],
) -> Result<HashMap<ReadKey, u64>, sqlx::Error> {
    let mut keys = Vec::new();
    let mut owners: HashMap<i64, &UserId> = HashMap::new();
    for w in writes {
        if let Write::Read {
            owner,
            conversation,
            ..
        } = w
        {
            let id = counters.id(owner)?;
            owners.insert(id, owner);
            keys.push((id, conversation));
        }
    }
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(READ_CURSORS_SQL)
        .bind(json(&keys))
        .fetch_all(&mut *conn)
        .await?;
    let mut cursors = HashMap::new();
    for (owner, conversation, read_seq) in rows {
        if let Some(uid) = owners.get(&owner) {
            cursors.insert(((*uid).clone(), conversation), read_seq as u64);
        }
    }
    Ok(cursors)
}

/// Applies a revoke or an edit to its target message.
async fn apply_effect(conn: &mut SqliteConnection, effect: &Effect) -> Result<(), sqlx::Error> {
    match effect {
        Effect::Revoke {
            conversation,
            target,
            at,
        } => {
            sqlx::query(REVOKE_SQL)
                .bind(at)
                .bind(*target as i64)
                .bind(conversation)
                .execute(&mut *conn)
                .await?;
            sqlx::query(REVOKE_EDITS_SQL)
                .bind(crate::batch::revoked_edit(*target))
                .bind(*target as i64)
                .bind(conversation)
                .execute(&mut *conn)
                .await?;
            crate::search::sqlite::revoked(conn, conversation, *target).await?;
        }
        Effect::Edit {
            conversation,
            target,
            content,
            at,
        } => {
            let edit = sqlx::query(EDIT_SQL)
                .bind(content)
                .bind(at)
                .bind(*target as i64)
                .bind(conversation)
                .execute(&mut *conn)
                .await?;
            if edit.rows_affected() > 0 {
                crate::search::sqlite::edited(conn, conversation, *target, content).await?;
            }
        }
    }
    Ok(())
}

/// Writes every changed cursor (in the caller's transaction) and marks them
/// clean. Changed cursors may be older than the id cache, so their owners'
/// ids are resolved again.
async fn flush_cursors(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
) -> Result<(), sqlx::Error> {
    let owners: Vec<UserId> = counters.dirty.iter().map(|key| key.0.clone()).collect();
    resolve_ids(conn, counters, owners.iter()).await?;
    let mut cursor_rows = Vec::new();
    let mut group_cursor_rows = Vec::new();
    for key in &counters.dirty {
        if let Some(c) = counters.devices.get(key) {
            let owner = counters.id(&key.0)?;
            if key.2 == 0 {
                cursor_rows.push((owner, &key.1, c.contiguous));
            } else {
                group_cursor_rows.push((owner, &key.1, key.2, c.contiguous));
            }
        }
    }
    let now = natter_node::ids::now_ms();
    if !cursor_rows.is_empty() {
        sqlx::query(UPSERT_CURSORS_SQL)
            .bind(json(cursor_rows))
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    if !group_cursor_rows.is_empty() {
        sqlx::query(UPSERT_GROUP_CURSORS_SQL)
            .bind(json(group_cursor_rows))
            .bind(now)
            .execute(&mut *conn)
            .await?;
    }
    counters.dirty.clear();
    counters.flushed_at = std::time::Instant::now();
    Ok(())
}

/// `writes` as group push-acks, or none if any of them is something else.
fn group_acks(writes: &[Write]) -> Vec<(&UserId, &str, GroupAck)> {
    let mut acks = Vec::with_capacity(writes.len());
    for write in writes {
        match write {
            Write::Received {
                owner,
                device,
                group,
                seq,
                floor,
            } if *group != 0 => acks.push((
                owner,
                device.as_str(),
                GroupAck {
                    group: *group,
                    seq: *seq,
                    floor: *floor,
                },
            )),
            _ => return Vec::new(),
        }
    }
    acks
}

impl SqliteStore {
    /// Applies group push-acks (owner, device, ack) without the database
    /// when it can: every cursor is cached and no write-out is due. (Most
    /// batches under fan-out are only acks.) `false` when they need a
    /// transaction; then nothing was applied.
    fn in_memory(&self, counters: &mut Counters, acks: &[(&UserId, &str, GroupAck)]) -> bool {
        if acks.is_empty() || counters.flush_due() {
            return false;
        }
        // Acks come in runs for one cursor (a PushAck covers several pushes
        // of a group): each run is checked and applied with one look-up.
        let mut runs: Vec<(CursorKey, std::ops::Range<usize>)> = Vec::new();
        for (i, (owner, device, ack)) in acks.iter().enumerate() {
            if ack.group == 0 {
                return false;
            }
            if let Some((key, range)) = runs.last_mut() {
                if key.0 == **owner && key.2 == ack.group && key.1 == *device {
                    range.end = i + 1;
                    continue;
                }
            }
            let key = ((*owner).clone(), device.to_string(), ack.group);
            if !counters.devices.contains_key(&key) {
                return false;
            }
            runs.push((key, i..i + 1));
        }
        let mut unflushed = self.unflushed();
        for (key, range) in runs {
            let Some(cursor) = counters.devices.get_mut(&key) else {
                continue;
            };
            for (_, _, ack) in &acks[range] {
                cursor.raise_to(ack.floor);
                cursor.mark(ack.seq);
            }
            let contiguous = cursor.contiguous;
            match unflushed.get_mut(&key) {
                Some(held) => *held = contiguous,
                None => {
                    unflushed.insert(key.clone(), contiguous);
                }
            }
            if !counters.dirty.contains(&key) {
                counters.dirty.insert(key);
            }
        }
        true
    }

    fn unflushed(&self) -> std::sync::MutexGuard<'_, HashMap<CursorKey, u64>> {
        self.unflushed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SqliteStore {
    async fn try_write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
        self.closed()?;
        let mut counters = self.writer.lock().await;
        if self.in_memory(&mut counters, &group_acks(writes)) {
            return Ok(vec![Outcome::Done; writes.len()]);
        }
        // IMMEDIATE takes the write lock up front, through the busy handler: a
        // deferred transaction that meets a checkpoint restart fails at once.
        let mut tx = WriteTx::begin(&self.pool).await?;
        match apply(&mut tx, &mut counters, writes).await {
            Ok(outcomes) => match tx.commit().await {
                Ok(()) => {
                    let mut unflushed = self.unflushed();
                    if counters.dirty.is_empty() {
                        unflushed.clear();
                    } else {
                        for key in writes.iter().filter_map(cursor_key) {
                            if let Some(c) = counters.devices.get(&key) {
                                unflushed.insert(key, c.contiguous);
                            }
                        }
                    }
                    Ok(outcomes)
                }
                Err(e) => {
                    // The cached counters may be ahead of what was committed.
                    *counters = Counters::default();
                    self.unflushed().clear();
                    Err(e.into())
                }
            },
            Err(e) => {
                *counters = Counters::default();
                self.unflushed().clear();
                let _ = tx.rollback().await;
                Err(e.into())
            }
        }
    }

    /// A small write of its own, to learn whether the store can write.
    async fn probe_write(&self) -> Result<(), StoreError> {
        let _writer = self.writer.lock().await;
        probe_write(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl MessageStore for SqliteStore {
    fn received_now(&self, owner: &UserId, device: &str, acks: &[GroupAck]) -> bool {
        if self.closed().is_err() {
            return false;
        }
        // The committer holds the lock through its transactions: then the
        // acks wait their turn in the queue instead.
        let Ok(mut counters) = self.writer.try_lock() else {
            return false;
        };
        let acks: Vec<(&UserId, &str, GroupAck)> =
            acks.iter().map(|ack| (owner, device, *ack)).collect();
        self.in_memory(&mut counters, &acks)
    }

    async fn write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
        let result = self.try_write_batch(writes).await;
        self.health.wrote(result.is_ok());
        result
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        let mut sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid {USER_JOINS}
             WHERE r.owner = (SELECT id FROM users WHERE uid = ?)
               AND r.other = (SELECT id FROM users WHERE uid = ?) AND r.mid < ?"
        );
        if !q.types.is_empty() {
            let marks = vec!["?"; q.types.len()].join(", ");
            sql.push_str(&format!(" AND m.msg_type IN ({marks})"));
        }
        sql.push_str(" ORDER BY r.mid DESC LIMIT ?");
        let mut query = sqlx::query(&sql)
            .bind(q.owner.as_str())
            .bind(q.other.as_str())
            .bind(
                q.before
                    .map(|b| b.min(i64::MAX as u64) as i64)
                    .unwrap_or(i64::MAX),
            );
        for t in &q.types {
            query = query.bind(i64::from(*t));
        }
        let rows = query.bind(i64::from(q.limit.count)).fetch(&self.pool);
        Ok(Page::collect(rows, q.limit, message_from_row, StoredMessage::page_bytes).await?)
    }

    async fn sync(
        &self,
        owner: &UserId,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<SyncItem>, StoreError> {
        self.closed()?;
        let sql = format!(
            "SELECT r.user_seq, {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid {USER_JOINS}
             WHERE r.owner = (SELECT id FROM users WHERE uid = ?) AND r.user_seq > ?
             ORDER BY r.user_seq LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(owner.as_str())
            .bind(after.min(i64::MAX as u64) as i64)
            .bind(i64::from(limit.count))
            .fetch(&self.pool);
        let item = |row: &SqliteRow| {
            Ok(SyncItem {
                user_seq: row.try_get::<i64, _>("user_seq")? as u64,
                message: message_from_row(row)?,
            })
        };
        Ok(Page::collect(rows, limit, item, |i: &SyncItem| i.message.page_bytes()).await?)
    }

    async fn group_history(
        &self,
        q: &GroupHistoryQuery,
    ) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        // Pages walk the (conv_id, conv_seq) index; `before` is a mid, so
        // its conv_seq bounds the page.
        let mut sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM message m {USER_JOINS}
             WHERE m.conv_id = ? AND m.conv_seq >= ?
               AND m.conv_seq < COALESCE((SELECT b.conv_seq FROM message b WHERE b.mid = ? AND b.conv_id = ?), ?)"
        );
        if !q.types.is_empty() {
            let marks = vec!["?"; q.types.len()].join(", ");
            sql.push_str(&format!(" AND m.msg_type IN ({marks})"));
        }
        sql.push_str(" ORDER BY m.conv_seq DESC LIMIT ?");
        // A `before` that is not a message of this group gives an empty page.
        let before = q.before.map(|b| b.min(i64::MAX as u64) as i64);
        let conv = group_conversation(q.group);
        let mut query = sqlx::query(&sql)
            .bind(&conv)
            .bind(q.from_seq.min(i64::MAX as u64) as i64)
            .bind(before.unwrap_or(-1))
            .bind(&conv)
            .bind(if before.is_some() { 0 } else { i64::MAX });
        for t in &q.types {
            query = query.bind(i64::from(*t));
        }
        let rows = query.bind(i64::from(q.limit.count)).fetch(&self.pool);
        Ok(Page::collect(rows, q.limit, message_from_row, StoredMessage::page_bytes).await?)
    }

    async fn group_sync(
        &self,
        group: u64,
        after: u64,
        limit: PageLimit,
    ) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM message m {USER_JOINS}
             WHERE m.conv_id = ? AND m.conv_seq > ? ORDER BY m.conv_seq LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(group_conversation(group))
            .bind(after.min(i64::MAX as u64) as i64)
            .bind(i64::from(limit.count))
            .fetch(&self.pool);
        Ok(Page::collect(rows, limit, message_from_row, StoredMessage::page_bytes).await?)
    }

    async fn group_seqs(&self, groups: &[u64]) -> Result<Vec<u64>, StoreError> {
        self.closed()?;
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let convs: Vec<String> = groups.iter().map(|g| group_conversation(*g)).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(CONVERSATIONS_SQL)
            .bind(json(&convs))
            .fetch_all(&self.pool)
            .await?;
        let known: HashMap<String, u64> = rows.into_iter().map(|(c, s)| (c, s as u64)).collect();
        Ok(convs
            .iter()
            .map(|c| known.get(c).copied().unwrap_or(0))
            .collect())
    }

    async fn cursor(&self, owner: &UserId, device: &str, group: u64) -> Result<u64, StoreError> {
        self.closed()?;
        if let Some(cursor) = self
            .unflushed()
            .get(&(owner.clone(), device.to_string(), group))
            .copied()
        {
            return Ok(cursor);
        }
        let cursor = if group == 0 {
            sqlx::query_scalar::<_, i64>(
                "SELECT cursor FROM device WHERE owner = (SELECT id FROM users WHERE uid = ?) AND device = ?",
            )
                .bind(owner.as_str())
                .bind(device)
                .fetch_optional(&self.pool)
                .await?
        } else {
            sqlx::query_scalar::<_, i64>(
                "SELECT cursor FROM group_cursor \
                 WHERE owner = (SELECT id FROM users WHERE uid = ?) AND device = ? AND gid = ?",
            )
            .bind(owner.as_str())
            .bind(device)
            .bind(group.min(i64::MAX as u64) as i64)
            .fetch_optional(&self.pool)
            .await?
        };
        Ok(cursor.unwrap_or(0) as u64)
    }

    async fn group_cursors(
        &self,
        owner: &UserId,
        device: &str,
        groups: &[u64],
    ) -> Result<Vec<u64>, StoreError> {
        self.closed()?;
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, i64)> = sqlx::query_as(READ_GROUP_CURSORS_SQL)
            .bind(owner.as_str())
            .bind(device)
            .bind(json(groups))
            .fetch_all(&self.pool)
            .await?;
        let stored: HashMap<u64, u64> = rows
            .into_iter()
            .map(|(gid, cursor)| (gid as u64, cursor as u64))
            .collect();
        let unflushed = self.unflushed();
        Ok(groups
            .iter()
            .map(|g| {
                unflushed
                    .get(&(owner.clone(), device.to_string(), *g))
                    .or_else(|| stored.get(g))
                    .copied()
                    .unwrap_or(0)
            })
            .collect())
    }

    async fn expire(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.closed()?;
        // Through the writer lock: expiry is a write like any other. Each
        // row is deleted through its key or index, so a batch costs the same
        // however large the tables are.
        let _writer = self.writer.lock().await;
        let mut tx = WriteTx::begin(&self.pool).await?;
        // Group messages' receiver is 0: their relation deletes find nothing.
        let rows: Vec<(i64, i64, i64)> =
            sqlx::query_as("SELECT mid, sender, receiver FROM message WHERE mid < ? AND created_at < ? ORDER BY mid LIMIT ?")
                .bind(expiry_mid_bound(before_ms))
                .bind(before_ms)
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
        for (mid, sender, receiver) in &rows {
            for (owner, other) in [(sender, receiver), (receiver, sender)] {
                sqlx::query("DELETE FROM relation WHERE owner = ? AND other = ? AND mid = ?")
                    .bind(owner)
                    .bind(other)
                    .bind(mid)
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query("DELETE FROM message WHERE mid = ?")
                .bind(mid)
                .execute(&mut *tx)
                .await?;
            crate::search::sqlite::expired(&mut tx, *mid).await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    async fn log_out(&self, uid: &UserId, at_ms: i64) -> Result<(), StoreError> {
        self.closed()?;
        // Through the writer lock: SQLite has one writer.
        let _writer = self.writer.lock().await;
        let mut tx = WriteTx::begin(&self.pool).await?;
        // The user may be new to the store. Its id is not cached: the writer's
        // cache reads it back from `users` when a batch first needs it.
        sqlx::query("INSERT INTO users (uid) VALUES (?) ON CONFLICT (uid) DO NOTHING")
            .bind(uid.as_str())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO user_logout (owner, at) SELECT id, ? FROM users WHERE uid = ? \
             ON CONFLICT (owner) DO UPDATE SET at = MAX(at, excluded.at)",
        )
        .bind(at_ms)
        .bind(uid.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn logged_out_at(&self, uid: &UserId) -> Result<Option<i64>, StoreError> {
        self.closed()?;
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT at FROM user_logout WHERE owner = (SELECT id FROM users WHERE uid = ?)",
        )
        .bind(uid.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Down while writes fail: a failed commit (a full disk, say) makes the
    /// store not ready at once; after [`PROBE_AFTER`] each ping tries a write
    /// of its own, and the first write that succeeds (a batch or a probe)
    /// makes it ready again.
    async fn message(&self, mid: u64) -> Result<Option<StoredMessage>, StoreError> {
        self.closed()?;
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM message m {USER_JOINS} WHERE m.mid = ?");
        let row = sqlx::query(&sql)
            .bind(mid.min(MAX_ID) as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(message_from_row).transpose()?)
    }

    async fn conversations(
        &self,
        q: &ConversationQuery,
    ) -> Result<Page<ConversationEntry>, StoreError> {
        self.closed()?;
        let limit = q.limit as usize;
        // One-to-one rows: the user's rows (the primary key's prefix) with their conversations, ordered, after the key.
        // (pinned 2 is past every row: no key means from the top.)
        let (pinned, last_mid, conv) = match &q.after {
            Some(k) => (
                i64::from(k.pinned),
                k.last_mid.min(MAX_ID) as i64,
                k.conversation.as_str(),
            ),
            None => (2, 0, ""),
        };
        let rows = sqlx::query(LIST_P2P_SQL)
            .bind(q.owner.as_str())
            .bind(pinned)
            .bind(last_mid)
            .bind(conv)
            .bind(limit as i64 + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut mids = Vec::new();
        for row in &rows {
            let conversation: String = row.try_get("conv_id")?;
            let last_seq = row.try_get::<i64, _>("last_seq")? as u64;
            let read_seq = row.try_get::<i64, _>("read_seq")? as u64;
            let mid = row.try_get::<i64, _>("last_mid")? as u64;
            mids.push(mid);
            entries.push((
                mid,
                ConversationEntry {
                    peer: Peer::User(user_id(row.try_get("peer_uid")?)?),
                    conversation,
                    last: None,
                    last_seq,
                    read_seq,
                    unread: unread(last_seq, read_seq, row.try_get("markers")?),
                    peer_read_seq: row.try_get::<i64, _>("peer_read")? as u64,
                    settings: Settings {
                        pinned: row.try_get::<i64, _>("pinned")? != 0,
                        push: push_mode_from(row.try_get("push")?),
                    },
                },
            ));
        }
        // Groups: the caller's, each with its conversation and the user's row.
        if !q.groups.is_empty() {
            let groups: Vec<(String, u64)> = q
                .groups
                .iter()
                .map(|(g, join)| (group_conversation(*g), join.saturating_sub(1)))
                .collect();
            let rows = sqlx::query(LIST_GROUPS_SQL)
                .bind(q.owner.as_str())
                .bind(json(&groups))
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                let conversation: String = row.try_get("conv_id")?;
                let Some(group) = parse_group_conversation(&conversation) else {
                    continue;
                };
                let floor = row.try_get::<i64, _>("floor")? as u64;
                let last_seq = row.try_get::<i64, _>("last_seq")? as u64;
                let read_seq = (row.try_get::<i64, _>("read_seq")? as u64).max(floor);
                // Nothing from before the user joined shows.
                let mid = if last_seq > floor {
                    row.try_get::<i64, _>("last_mid")? as u64
                } else {
                    0
                };
                let entry = ConversationEntry {
                    peer: Peer::Group(group),
                    conversation,
                    last: None,
                    last_seq,
                    read_seq,
                    unread: unread(last_seq, read_seq, row.try_get("markers")?),
                    peer_read_seq: 0,
                    settings: Settings {
                        pinned: row.try_get::<i64, _>("pinned")? != 0,
                        push: push_mode_from(row.try_get("push")?),
                    },
                };
                let key = ListKey {
                    pinned: entry.settings.pinned,
                    last_mid: mid,
                    conversation: entry.conversation.clone(),
                };
                if q.after.as_ref().is_none_or(|after| key < *after) {
                    mids.push(mid);
                    entries.push((mid, entry));
                }
            }
        }
        // List order: pinned, newest activity, conversation id, descending.
        entries.sort_by(|(ma, a), (mb, b)| {
            (b.settings.pinned, *mb, &b.conversation).cmp(&(
                a.settings.pinned,
                *ma,
                &a.conversation,
            ))
        });
        let more = entries.len() > limit;
        entries.truncate(limit);
        mids.retain(|m| *m != 0);
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM json_each(?1) AS k JOIN message m ON m.mid = k.value {USER_JOINS}"
        );
        let rows = sqlx::query(&sql)
            .bind(json(&mids))
            .fetch_all(&self.pool)
            .await?;
        let mut last: HashMap<u64, StoredMessage> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let m = message_from_row(row)?;
            last.insert(m.mid, m);
        }
        Ok(Page {
            items: entries
                .into_iter()
                .map(|(mid, mut e)| {
                    e.last = last.get(&mid).cloned();
                    e
                })
                .collect(),
            more,
        })
    }

    async fn read_state(
        &self,
        owner: &UserId,
        conversation: &str,
        floor: u64,
    ) -> Result<ReadState, StoreError> {
        self.closed()?;
        let (last_seq, read_seq): (i64, i64) = sqlx::query_as(READ_STATE_SQL)
            .bind(conversation)
            .bind(owner.as_str())
            .fetch_one(&self.pool)
            .await?;
        let last_seq = last_seq as u64;
        let read_seq = (read_seq as u64).max(floor).min(last_seq.max(floor));
        let markers: i64 = sqlx::query_scalar(MARKERS_AFTER_SQL)
            .bind(conversation)
            .bind(read_seq as i64)
            .bind(last_seq as i64)
            .fetch_one(&self.pool)
            .await?;
        Ok(ReadState {
            last_seq,
            read_seq,
            unread: unread(last_seq, read_seq, markers),
            moved: false,
        })
    }

    async fn set_settings(
        &self,
        owner: &UserId,
        conversation: &str,
        change: SettingsChange,
    ) -> Result<Settings, StoreError> {
        self.closed()?;
        let peer =
            parse_p2p_conversation(conversation).map(|(a, b)| if a == *owner { b } else { a });
        // Through the writer lock: SQLite has one writer.
        let _writer = self.writer.lock().await;
        let mut tx = WriteTx::begin(&self.pool).await?;
        // The users may be new to the store (see `log_out`).
        for uid in std::iter::once(owner).chain(peer.as_ref()) {
            sqlx::query("INSERT INTO users (uid) VALUES (?) ON CONFLICT (uid) DO NOTHING")
                .bind(uid.as_str())
                .execute(&mut *tx)
                .await?;
        }
        let (pinned, push): (i64, i64) = sqlx::query_as(SET_SETTINGS_SQL)
            .bind(owner.as_str())
            .bind(conversation)
            .bind(peer.as_ref().map(|p| p.as_str()))
            .bind(change.pinned.map(i64::from))
            .bind(change.push.map(push_mode_code))
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Settings {
            pinned: pinned != 0,
            push: push_mode_from(push),
        })
    }

    async fn readers(
        &self,
        conversation: &str,
        seq: u64,
        limit: u32,
    ) -> Result<Vec<Reader>, StoreError> {
        self.closed()?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT u.uid, h.read_seq FROM chat h JOIN users u ON u.id = h.owner \
             WHERE h.conv_id = ? AND h.peer = 0 AND h.read_seq >= ? ORDER BY u.uid LIMIT ?",
        )
        .bind(conversation)
        .bind(seq.min(MAX_ID) as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut readers = Vec::with_capacity(rows.len());
        for (uid, read_seq) in rows {
            readers.push(Reader {
                uid: user_id(uid)?,
                read_seq: read_seq as u64,
            });
        }
        Ok(readers)
    }

    async fn read_count(&self, conversation: &str, seq: u64) -> Result<u64, StoreError> {
        self.closed()?;
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM chat WHERE conv_id = ? AND peer = 0 AND read_seq >= ?",
        )
        .bind(conversation)
        .bind(seq.min(MAX_ID) as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(count as u64)
    }

    async fn search(&self, q: &SearchQuery) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        Ok(crate::search::sqlite::search(&self.pool, q).await?)
    }

    async fn flush_search(&self) -> Result<(), StoreError> {
        self.closed()?;
        Ok(crate::search::sqlite::index_all(&self.pool, &self.writer).await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.closed()?;
        match self.health.check() {
            HealthCheck::Read => {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
            HealthCheck::Down => Err(StoreError::Unwritable),
            HealthCheck::Probe => {
                let probed = self.probe_write().await;
                self.health.wrote(probed.is_ok());
                probed.map_err(|e| {
                    tracing::warn!(error = %e, "the store still cannot write");
                    StoreError::Unwritable
                })
            }
        }
    }

    async fn close(&self) {
        // Wait for an in-flight batch, write out changed cursors, then close
        // every connection (which checkpoints the WAL when the last one goes).
        let mut counters = self.writer.lock().await;
        // The indexer waits for the lock between its transactions: stopped
        // here, it leaves the queue for the next start.
        self.indexer.abort();
        if !counters.dirty.is_empty() && !self.pool.is_closed() {
            let flushed = async {
                let mut tx = WriteTx::begin(&self.pool).await?;
                flush_cursors(&mut tx, &mut counters).await?;
                tx.commit().await
            };
            match flushed.await {
                Ok(()) => self.unflushed().clear(),
                Err(e) => tracing::warn!(error = %e, "device cursors not written at close"),
            }
        }
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::u;

    /// A pool of one connection to a fresh database file.
    async fn one_connection(dir: &tempfile::TempDir) -> SqlitePool {
        let connect = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_with(connect)
            .await
            .expect("pool")
    }

    /// A database written with integer user ids (protocol version 1) is
    /// migrated in place: ids become their decimal strings, one-to-one
    /// conversation ids take the new byte-wise order, group messages lose
    /// their numeric receiver, and the store reads and extends all of it.
    #[tokio::test]
    async fn integer_user_ids_of_version_1_become_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v1.db");
        {
            let connect = SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePool::connect_with(connect).await.expect("pool");
            crate::migrations::migrator(&MIGRATIONS[..3], false)
                .run(&pool)
                .await
                .expect("version 1 schema");
            for sql in [
                // 2 -> 10 (p:2:10 numerically; p:10:2 byte-wise), and a group message.
                "INSERT INTO message VALUES (100, 'p:2:10', 1, 2, 'phone', 1, 10, 1, x'0a040a026869', 1700000000000)",
                "INSERT INTO message VALUES (101, 'g:7', 1, 2, 'phone', 2, 7, 1, x'0a040a026869', 1700000000001)",
                "INSERT INTO relation VALUES (2, 1, 100, 10, 1, 0, 1700000000000)",
                "INSERT INTO relation VALUES (10, 1, 100, 2, 2, 1, 1700000000000)",
                "INSERT INTO conversation VALUES ('p:2:10', 1), ('g:7', 1)",
                "INSERT INTO user_sequence VALUES (2, 1), (10, 1)",
                "INSERT INTO device VALUES (10, 'phone', 1, 0)",
                "INSERT INTO group_cursor VALUES (2, 'phone', 7, 1, 0)",
            ] {
                sqlx::query(sql).execute(&pool).await.expect(sql);
            }
            pool.close().await;
        }
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("migrated");
        let (two, ten) = (u_id("2"), u_id("10"));
        let synced = store.sync(&ten, 0, 10.into()).await.expect("sync").items;
        assert_eq!(synced.len(), 1);
        assert_eq!(synced[0].message.conversation, "p:10:2");
        assert_eq!(synced[0].message.sender, two);
        assert_eq!(synced[0].message.to, Peer::User(ten.clone()));
        assert_eq!(store.cursor(&ten, "phone", 0).await.expect("cursor"), 1);
        assert_eq!(store.cursor(&two, "phone", 7).await.expect("cursor"), 1);
        let group = store.group_sync(7, 0, 10.into()).await.expect("group");
        assert_eq!(group.items[0].to, Peer::Group(7));
        assert_eq!(group.items[0].sender, two);
        // "hi" from `sender`'s phone with client seq 1, stored as `mid`.
        let hi = |mid: u64, sender: &UserId, to: &UserId| {
            Write::Message(NewMessage {
                mid,
                time_ms: 1_700_000_000_000 + mid as i64,
                sender: sender.clone(),
                sender_device: "phone".into(),
                client_seq: 1,
                to: Peer::User(to.clone()),
                msg_type: 1,
                content: vec![0x0a, 0x04, 0x0a, 0x02, b'h', b'i'],
            })
        };
        // The conversation goes on where it was, in both streams.
        let next = store
            .write_batch(&[hi(200, &ten, &two)])
            .await
            .expect("write");
        let Outcome::Stored(next) = &next[0] else {
            panic!("stored")
        };
        assert!(!next.repeat, "(10, phone, 1) is a new key: 2 sent seq 1");
        assert_eq!(next.message.conversation, "p:10:2");
        assert_eq!(next.message.conv_seq, 2);
        assert_eq!((next.sender_seq, next.receiver_seq), (2, 2));
        let seqs = store.group_seqs(&[7]).await.expect("seqs");
        assert_eq!(seqs, vec![1]);
        // A resend of the version 1 message is still recognised.
        let again = store
            .write_batch(&[hi(201, &two, &ten)])
            .await
            .expect("write");
        let Outcome::Stored(again) = &again[0] else {
            panic!("stored")
        };
        assert!(again.repeat);
        assert_eq!(again.message.mid, 100);
        assert_eq!((again.sender_seq, again.receiver_seq), (1, 1));
    }

    fn u_id(s: &str) -> UserId {
        UserId::parse(s).expect("user id")
    }

    /// Whatever state a failed transaction left its connection in (still
    /// open, or rolled back by SQLite itself as on some full-disk errors),
    /// the connection is not handed out again: the next write starts clean.
    #[tokio::test]
    async fn a_failed_write_transaction_never_returns_its_connection_to_the_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = one_connection(&dir).await;
        sqlx::query("CREATE TABLE t (v INTEGER)")
            .execute(&pool)
            .await
            .expect("table");
        // A statement fails and the transaction is left open.
        {
            let mut tx = WriteTx::begin(&pool).await.expect("begin");
            sqlx::query("INSERT INTO t VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect("insert");
            assert!(sqlx::query("INSERT INTO missing VALUES (1)")
                .execute(&mut *tx)
                .await
                .is_err());
        }
        // SQLite ended the transaction by itself: the commit fails.
        {
            let mut tx = WriteTx::begin(&pool)
                .await
                .expect("begin after a dropped transaction");
            sqlx::query("ROLLBACK")
                .execute(&mut *tx)
                .await
                .expect("rolled back underneath");
            assert!(tx.commit().await.is_err());
        }
        let mut tx = WriteTx::begin(&pool)
            .await
            .expect("begin after a failed commit");
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        let rows: Vec<i64> = sqlx::query_scalar("SELECT v FROM t")
            .fetch_all(&pool)
            .await
            .expect("read");
        assert_eq!(rows, vec![2], "only the committed write is there");
    }

    /// A full disk, made deterministic with `max_page_count` on the one
    /// pooled connection: batches fail while it is full, the store reports
    /// itself down, and once there is room again writing resumes without a
    /// restart and the store is ready.
    #[tokio::test]
    async fn a_full_disk_fails_batches_and_writing_resumes_when_room_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SqliteOptions {
            readers: 0,
            ..SqliteOptions::default()
        };
        let store = SqliteStore::open(&dir.path().join("natter.db"), &options)
            .await
            .expect("store");
        let big = |seq: u64| {
            let mut m = crate::suite::text(1, 2, seq);
            m.content = vec![7; 3000];
            Write::Message(m)
        };
        store.write_batch(&[big(1)]).await.expect("first write");
        store.ping().await.expect("ready while writing works");
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.pool)
            .await
            .expect("page count");
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 2))
            .execute(&store.pool)
            .await
            .expect("limit");
        let mut failed = None;
        for seq in 2..50 {
            if let Err(e) = store.write_batch(&[big(seq)]).await {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.expect("the database filled up");
        assert!(failed.to_string().contains("full"), "{failed}");
        assert!(
            matches!(store.ping().await, Err(StoreError::Unwritable)),
            "a store whose last commit failed is not ready"
        );
        // Room again (a new connection has no limit; the old one, if it were
        // still pooled, gets the limit lifted).
        sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(&store.pool)
            .await
            .expect("lift");
        let outcomes = store
            .write_batch(&[big(100)])
            .await
            .expect("writes resume once there is room, without a restart");
        assert_eq!(outcomes.len(), 1);
        store.ping().await.expect("ready again");
        store.close().await;
    }

    #[tokio::test]
    async fn sqlite_passes_the_store_suite() {
        crate::suite::run_all(|| async { SqliteStore::memory().await.expect("memory store") })
            .await;
    }

    #[tokio::test]
    async fn sqlite_passes_the_search_suite() {
        crate::suite::run_search(|| async { SqliteStore::memory().await.expect("memory store") })
            .await;
    }

    /// Without a flush, the background indexer makes a message findable
    /// within about two seconds; after `close` it is stopped.
    #[tokio::test]
    async fn the_indexer_finds_messages_behind_the_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(&dir.path().join("s.db"), &SqliteOptions::default())
            .await
            .expect("open");
        let stored = crate::suite::store_one(&store, 1, 2, 1).await;
        let query = SearchQuery {
            owner: u(2),
            text: "1->2".into(),
            conversation: None,
            groups: Vec::new(),
            from_ms: None,
            to_ms: None,
            before: None,
            limit: PageLimit::from(10),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let page = store.search(&query).await.expect("search");
            if page.items.iter().any(|m| m.mid == stored.message.mid) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "not indexed in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.close().await;
        assert!(
            store.indexer.is_finished() || {
                tokio::time::sleep(Duration::from_millis(50)).await;
                store.indexer.is_finished()
            }
        );
    }

    #[tokio::test]
    async fn batch_statements_search_indexes_instead_of_scanning_tables() {
        let store = SqliteStore::memory().await.expect("store");
        let statements = [
            DEDUPE_SQL.to_string(),
            RELATION_SEQS_SQL.to_string(),
            "SELECT mid, sender, receiver FROM message WHERE mid < ? AND created_at < ? ORDER BY mid LIMIT ?".to_string(),
            "DELETE FROM relation WHERE owner = ? AND other = ? AND mid = ?".to_string(),
            CONVERSATIONS_SQL.to_string(),
            USERS_SQL.to_string(),
            CURSORS_SQL.to_string(),
            GROUP_CURSORS_SQL.to_string(),
            MARK_RECEIVED_SQL.to_string(),
            KNOWN_IDS_SQL.to_string(),
            NEW_IDS_SQL.to_string(),
            READ_GROUP_CURSORS_SQL.to_string(),
            "SELECT cursor FROM device WHERE owner = (SELECT id FROM users WHERE uid = ?) AND device = ?".to_string(),
            "SELECT at FROM user_logout WHERE owner = (SELECT id FROM users WHERE uid = ?)".to_string(),
            format!(
                "SELECT r.user_seq, {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid {USER_JOINS} \
                 WHERE r.owner = (SELECT id FROM users WHERE uid = ?) AND r.user_seq > ? ORDER BY r.user_seq LIMIT ?"
            ),
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid {USER_JOINS} \
                 WHERE r.owner = (SELECT id FROM users WHERE uid = ?) \
                   AND r.other = (SELECT id FROM users WHERE uid = ?) AND r.mid < ? ORDER BY r.mid DESC LIMIT ?"
            ),
            format!(
                "SELECT {MESSAGE_COLUMNS} FROM message m {USER_JOINS} \
                 WHERE m.conv_id = ? AND m.conv_seq > ? ORDER BY m.conv_seq LIMIT ?"
            ),
        ];
        for sql in statements {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(&store.pool)
                    .await
                    .expect("plan");
            for (_, _, _, step) in &plan {
                let table_scan = step.starts_with("SCAN")
                    && !step.contains("json_each")
                    && !step.starts_with("SCAN k");
                assert!(!table_scan, "{sql}\nscans a table: {plan:?}");
            }
        }
    }

    /// A store in `dir` with three messages from user 1 in group 9.
    async fn group_of_three(dir: &tempfile::TempDir) -> (std::path::PathBuf, SqliteStore) {
        let path = dir.path().join("natter.db");
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("open");
        for seq in 1..=3 {
            crate::suite::store_group_one(&store, 1, 9, seq).await;
        }
        (path, store)
    }

    #[tokio::test]
    async fn cursor_writes_are_coalesced_and_written_out_on_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, store) = group_of_three(&dir).await;
        let acks: Vec<Write> = (1..=3)
            .map(|seq| Write::Received {
                floor: 0,
                owner: u(2),
                device: "phone".into(),
                group: 9,
                seq,
            })
            .collect();
        store.write_batch(&acks).await.expect("acks");
        // Served from memory at once; not in the table yet.
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 3);
        let rows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM group_cursor WHERE owner = (SELECT id FROM users WHERE uid = 'u2')",
        )
            .fetch_one(&store.pool)
            .await
            .expect("count");
        assert_eq!(rows, 0, "cursor rows wait for the next flush");
        store.close().await;
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("reopen");
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 3);
        assert_eq!(store.cursor(&u(1), "phone", 9).await.expect("cursor"), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn a_group_ack_of_a_cached_cursor_is_recorded_without_a_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, store) = group_of_three(&dir).await;
        let ack = |seq| Write::Received {
            floor: 0,
            owner: u(2),
            device: "phone".into(),
            group: 9,
            seq,
        };
        let acks = |group, seqs: &[u64]| -> Vec<GroupAck> {
            seqs.iter()
                .map(|&seq| GroupAck {
                    group,
                    seq,
                    floor: 0,
                })
                .collect()
        };
        // With nothing queued for search the indexer leaves the writer lock
        // alone, so only the cases below decide.
        store.flush_search().await.expect("index");
        // Not cached yet: the store declines, and the batch path loads it.
        assert!(!store.received_now(&u(2), "phone", &acks(9, &[1])));
        store.write_batch(&[ack(1)]).await.expect("ack");
        assert!(store.received_now(&u(2), "phone", &acks(9, &[2])));
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 2);
        // One-to-one acks always take the batch path.
        assert!(!store.received_now(&u(2), "phone", &acks(0, &[1])));
        // All or nothing: one ack the store cannot take here declines them all.
        let mut mixed = acks(9, &[3]);
        mixed.extend(acks(10, &[1]));
        assert!(!store.received_now(&u(2), "phone", &mixed));
        assert!(!store.received_now(&u(3), "phone", &acks(9, &[3])));
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 2);
        // Not while the writer is busy.
        let busy = store.writer.lock().await;
        assert!(!store.received_now(&u(2), "phone", &acks(9, &[3])));
        drop(busy);
        assert!(store.received_now(&u(2), "phone", &acks(9, &[3])));
        // A run of acks for one cursor, recorded together.
        crate::suite::store_group_one(&store, 1, 9, 4).await;
        crate::suite::store_group_one(&store, 1, 9, 5).await;
        assert!(store.received_now(&u(2), "phone", &acks(9, &[5, 4])));
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 5);
        // Written out on close like any other cursor.
        store.close().await;
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("reopen");
        assert_eq!(store.cursor(&u(2), "phone", 9).await.expect("cursor"), 5);
        store.close().await;
    }

    /// The hot tables hold each user as its internal integer, once per
    /// user in `users`; reads give the strings back.
    #[tokio::test]
    async fn hot_tables_keep_users_as_internal_integers() {
        let store = SqliteStore::memory().await.expect("store");
        let (alice, bob) = (u_id("alice@example.org"), u_id("bob"));
        for seq in 1..=2 {
            let mut m = crate::suite::text(1, 2, seq);
            m.sender = alice.clone();
            m.to = Peer::User(bob.clone());
            store
                .write_batch(&[Write::Message(m)])
                .await
                .expect("write");
        }
        store.log_out(&bob, 5).await.expect("log out");
        let users: Vec<(i64, String)> = sqlx::query_as("SELECT id, uid FROM users ORDER BY id")
            .fetch_all(&store.pool)
            .await
            .expect("users");
        let uids: Vec<&str> = users.iter().map(|(_, uid)| uid.as_str()).collect();
        assert_eq!(uids.len(), 2, "{users:?}");
        assert!(uids.contains(&"alice@example.org") && uids.contains(&"bob"));
        for sql in [
            "SELECT typeof(sender) || typeof(receiver) FROM message",
            "SELECT typeof(owner) || typeof(other) FROM relation",
            "SELECT typeof(owner) || 'integer' FROM user_sequence",
            "SELECT typeof(owner) || 'integer' FROM user_logout",
        ] {
            let types: Vec<String> = sqlx::query_scalar(sql)
                .fetch_all(&store.pool)
                .await
                .expect(sql);
            assert!(!types.is_empty(), "{sql}");
            assert!(
                types.iter().all(|t| t == "integerinteger"),
                "{sql}: {types:?}"
            );
        }
        let synced = store.sync(&bob, 0, 10.into()).await.expect("sync").items;
        assert_eq!(synced.len(), 2);
        assert_eq!(synced[0].message.sender, alice);
        assert_eq!(synced[0].message.to, Peer::User(bob.clone()));
        assert_eq!(store.logged_out_at(&bob).await.expect("logout"), Some(5));
        assert_eq!(store.logged_out_at(&alice).await.expect("logout"), None);
    }

    /// Ids inserted by a batch that did not commit are not kept: the next
    /// batch resolves the user again and finds the id that was committed.
    #[tokio::test]
    async fn a_rolled_back_batch_leaves_no_user_id_cached() {
        let store = SqliteStore::memory().await.expect("store");
        // A message row whose mid is taken makes the batch fail after the
        // new users were inserted (in its transaction).
        crate::suite::store_one(&store, 1, 2, 1).await;
        let mut clash = crate::suite::text(3, 4, 1);
        clash.mid = {
            let mid: i64 = sqlx::query_scalar("SELECT mid FROM message")
                .fetch_one(&store.pool)
                .await
                .expect("mid");
            mid as u64
        };
        assert!(store.write_batch(&[Write::Message(clash)]).await.is_err());
        let after: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(&store.pool)
            .await
            .expect("count");
        assert_eq!(after, 2, "users 3 and 4 were rolled back");
        // Another user takes the id 3 would have had; 3 and 4 then get ids
        // of their own, and their messages read back as theirs.
        crate::suite::store_one(&store, 5, 1, 1).await;
        crate::suite::store_one(&store, 3, 4, 1).await;
        let synced = store.sync(&u(4), 0, 10.into()).await.expect("sync").items;
        assert_eq!(synced.len(), 1);
        assert_eq!(synced[0].message.sender, u(3));
        let synced = store.sync(&u(5), 0, 10.into()).await.expect("sync").items;
        assert_eq!(synced[0].message.to, Peer::User(u(1)));
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("natter.db");
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("open");
        crate::suite::store_one(&store, 1, 2, 1).await;
        store.close().await;
        assert!(matches!(store.ping().await, Err(StoreError::Closed)));
        let store = SqliteStore::open(&path, &SqliteOptions::default())
            .await
            .expect("reopen");
        let again = crate::suite::store_one(&store, 1, 2, 2).await;
        // Counters continue from the file after a restart.
        assert_eq!(again.message.conv_seq, 2);
        assert_eq!(again.sender_seq, 2);
        let repeat = crate::suite::store_one(&store, 1, 2, 1).await;
        assert!(repeat.repeat);
        store.close().await;
    }
}
