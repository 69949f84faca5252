//! The MySQL / MariaDB implementation of [`MessageStore`], for the
//! distributed shape: any number of logic nodes write through it at once.
//!
//! Nothing is cached between batches. Each batch is one transaction that
//! locks the sequence counters and device cursors it advances (`SELECT …
//! FOR UPDATE`, in key order), walks the batch like every store does
//! ([`crate::batch::walk`]), and writes each table with one multi-row
//! statement. Two nodes that race for the same rows wait for each other;
//! a deadlock or a duplicate from a racing insert rolls the batch back and
//! runs it again, where the dedupe finds what the other node stored.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{MySql, MySqlConnection, MySqlPool, QueryBuilder, Row};

use crate::batch::{
    expiry_mid_bound, touched, walk, CursorKey, DedupeKey, DeviceCursor, Effect, ReadKey, Walk,
    MESSAGE_COLUMNS,
};
use crate::store::*;
use natter_proto::UserId;

/// The store's migrations, in order: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "messages",
        include_str!("../migrations/mysql/0001_messages.sql"),
    ),
    (
        2,
        "device ids case-sensitive",
        include_str!("../migrations/mysql/0002_device_ids_case_sensitive.sql"),
    ),
    (
        3,
        "cursor device ids case-sensitive",
        include_str!("../migrations/mysql/0003_cursor_device_ids_case_sensitive.sql"),
    ),
    (
        4,
        "message user ids",
        include_str!("../migrations/mysql/0004_message_user_ids.sql"),
    ),
    (
        5,
        "message conversation order",
        include_str!("../migrations/mysql/0005_message_conversation_order.sql"),
    ),
    (
        6,
        "relation user ids",
        include_str!("../migrations/mysql/0006_relation_user_ids.sql"),
    ),
    (
        7,
        "conversation ids",
        include_str!("../migrations/mysql/0007_conversation_ids.sql"),
    ),
    (
        8,
        "conversation order",
        include_str!("../migrations/mysql/0008_conversation_order.sql"),
    ),
    (
        9,
        "user sequence ids",
        include_str!("../migrations/mysql/0009_user_sequence_ids.sql"),
    ),
    (
        10,
        "cursor user ids",
        include_str!("../migrations/mysql/0010_cursor_user_ids.sql"),
    ),
    (
        11,
        "user logout",
        include_str!("../migrations/mysql/0011_user_logout.sql"),
    ),
    (
        12,
        "conversations",
        include_str!("../migrations/mysql/0012_conversations.sql"),
    ),
    (
        13,
        "search",
        include_str!("../migrations/mysql/0013_search.sql"),
    ),
];

fn migrator() -> Migrator {
    // The group store's migrations (1001 on) live in the same database.
    crate::migrations::migrator(MIGRATIONS, true)
}

/// Options for [`MySqlStore::connect`].
#[derive(Clone, Debug)]
pub struct MySqlOptions {
    /// Pooled connections at most.
    pub max_connections: u32,
    /// Wait for a pooled connection before failing.
    pub acquire_timeout: Duration,
}

impl Default for MySqlOptions {
    fn default() -> Self {
        MySqlOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// Times a batch is run again after a deadlock or a racing insert.
const RETRIES: u32 = 5;

pub struct MySqlStore {
    pool: MySqlPool,
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// A device id column. Device ids compare byte for byte (`utf8mb4_bin`),
/// which MySQL reports as `VARBINARY`, so they are read as bytes.
fn device_id(bytes: Vec<u8>) -> Result<String, sqlx::Error> {
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// A user id column (`ascii_bin`, read as bytes like device ids).
fn uid(bytes: Vec<u8>) -> Result<UserId, sqlx::Error> {
    user_id(device_id(bytes)?)
}

pub(crate) fn message_from_row(row: &MySqlRow) -> Result<StoredMessage, sqlx::Error> {
    let conversation = device_id(row.try_get("conv_id")?)?;
    Ok(StoredMessage {
        mid: row.try_get::<i64, _>("mid")? as u64,
        conv_seq: row.try_get::<i64, _>("conv_seq")? as u64,
        sender: uid(row.try_get("sender")?)?,
        sender_device: device_id(row.try_get("sender_device")?)?,
        client_seq: row.try_get::<i64, _>("client_seq")? as u64,
        to: peer(&conversation, device_id(row.try_get("receiver")?)?)?,
        conversation,
        msg_type: row.try_get::<i32, _>("msg_type")? as u32,
        content: row.try_get("content")?,
        time_ms: row.try_get("created_at")?,
        edited_ms: row.try_get("edited_at")?,
        revoked_ms: row.try_get("revoked_at")?,
    })
}

/// `above` as stored: ascending positions, comma-separated.
fn parse_above(text: &str) -> BTreeSet<u64> {
    text.split(',').filter_map(|s| s.parse().ok()).collect()
}

fn format_above(above: &BTreeSet<u64>) -> String {
    above
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether running the batch again may succeed: a deadlock, a lock wait
/// time-out, or a resend that raced its first copy on another node (the
/// dedupe key; the run again finds the stored copy).
fn retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            match db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number())
            {
                Some(1213 | 1205) => true,
                Some(1062) => db.message().contains("message_dedupe"),
                _ => false,
            }
        }
        _ => false,
    }
}

/// A short random pause before running a batch again, growing with the
/// attempt, so that racing writers do not meet again at once.
async fn back_off(attempt: u32) {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    let ms = u64::from(byte[0] % 10 + 1) << attempt.min(4);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Runs `migrator` on `pool` with every other process's migrations kept
/// out: nodes that start together would otherwise apply the same migration
/// at once (sqlx's own lock does not hold on MariaDB).
pub async fn migrate_exclusively(pool: &MySqlPool, migrator: &Migrator) -> Result<(), StoreError> {
    let mut holder = pool.acquire().await?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('natter_migrations', 120)")
        .fetch_one(&mut *holder)
        .await?;
    if locked != Some(1) {
        return Err(StoreError::Database(sqlx::Error::Protocol(
            "another node held the migration lock for 120 s".into(),
        )));
    }
    let result = migrator.run(pool).await;
    let _ = sqlx::query("SELECT RELEASE_LOCK('natter_migrations')")
        .execute(&mut *holder)
        .await;
    Ok(result?)
}

impl MySqlStore {
    /// Connects to `url` (`mysql://user:pass@host:port/db`) and runs the migrations.
    pub async fn connect(url: &str, options: &MySqlOptions) -> Result<MySqlStore, StoreError> {
        let connect: MySqlConnectOptions = url.parse()?;
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        migrate_exclusively(&pool, &migrator()).await?;
        Ok(MySqlStore { pool })
    }

    fn closed(&self) -> Result<(), StoreError> {
        if self.pool.is_closed() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }
}

impl MySqlStore {
    /// The list entries of the query's groups (after its key), each with its
    /// newest mid as of the user's join point: nothing from before the user
    /// joined shows. A member without a row counts from its join point.
    async fn group_entries(
        &self,
        q: &ConversationQuery,
    ) -> Result<Vec<(u64, ConversationEntry)>, StoreError> {
        // (group, conversation, floor): positions up to the floor count as read.
        let groups: Vec<(u64, String, u64)> = q
            .groups
            .iter()
            .map(|(g, join)| (*g, group_conversation(*g), join.saturating_sub(1)))
            .collect();
        let mut b = QueryBuilder::<MySql>::new(
            "SELECT conv_id, last_seq, last_mid FROM conversation WHERE conv_id IN ",
        );
        b.push_tuples(&groups, |mut t, (_, c, _)| {
            t.push_bind(c.as_str());
        });
        let rows: Vec<(Vec<u8>, i64, i64)> = b.build_query_as().fetch_all(&self.pool).await?;
        let mut newest: HashMap<String, (u64, u64)> = HashMap::with_capacity(rows.len());
        for (c, seq, mid) in rows {
            newest.insert(device_id(c)?, (seq as u64, mid as u64));
        }
        let mut b = QueryBuilder::<MySql>::new(
            "SELECT conv_id, read_seq, pinned, push FROM chat WHERE owner = ",
        );
        b.push_bind(q.owner.as_str()).push(" AND conv_id IN ");
        b.push_tuples(&groups, |mut t, (_, c, _)| {
            t.push_bind(c.as_str());
        });
        let rows: Vec<(Vec<u8>, i64, i64, i64)> = b.build_query_as().fetch_all(&self.pool).await?;
        let mut own: HashMap<String, (u64, Settings)> = HashMap::with_capacity(rows.len());
        for (c, read_seq, pinned, push) in rows {
            let settings = Settings {
                pinned: pinned != 0,
                push: push_mode_from(push),
            };
            own.insert(device_id(c)?, (read_seq as u64, settings));
        }
        // Each group's cursor: the user's, or the join point without one.
        let cursors: Vec<(&str, u64)> = groups
            .iter()
            .map(|(_, c, floor)| {
                let read_seq = own.get(c).map_or(0, |(seq, _)| *seq);
                (c.as_str(), read_seq.max(*floor))
            })
            .collect();
        // The markers after each cursor, in one range scan per group.
        let mut b = QueryBuilder::<MySql>::new("SELECT conv_id, COUNT(*) FROM conv_marker WHERE ");
        for (n, (c, read_seq)) in cursors.iter().enumerate() {
            if n > 0 {
                b.push(" OR ");
            }
            b.push("(conv_id = ")
                .push_bind(*c)
                .push(" AND conv_seq > ")
                .push_bind(i(*read_seq))
                .push(")");
        }
        b.push(" GROUP BY conv_id");
        let rows: Vec<(Vec<u8>, i64)> = b.build_query_as().fetch_all(&self.pool).await?;
        let mut markers: HashMap<String, u64> = HashMap::with_capacity(rows.len());
        for (c, count) in rows {
            markers.insert(device_id(c)?, count.max(0) as u64);
        }
        let mut entries = Vec::with_capacity(groups.len());
        for ((group, conversation, floor), (_, read_seq)) in groups.iter().zip(&cursors) {
            let (last_seq, last_mid) = newest.get(conversation).copied().unwrap_or((0, 0));
            let settings = own.get(conversation).map(|(_, s)| *s).unwrap_or_default();
            // Nothing from before the user joined shows.
            let mid = if last_seq > *floor { last_mid } else { 0 };
            let key = ListKey {
                pinned: settings.pinned,
                last_mid: mid,
                conversation: conversation.clone(),
            };
            if q.after.as_ref().is_some_and(|after| key >= *after) {
                continue;
            }
            let markers = markers.get(conversation).copied().unwrap_or(0);
            entries.push((
                mid,
                ConversationEntry {
                    peer: Peer::Group(*group),
                    conversation: conversation.clone(),
                    last: None,
                    last_seq,
                    read_seq: *read_seq,
                    unread: unread(last_seq, *read_seq, markers),
                    peer_read_seq: 0,
                    settings,
                },
            ));
        }
        Ok(entries)
    }
}

/// Messages already stored under the batch's dedupe keys, with both
/// parties' stream positions.
async fn find_existing(
    conn: &mut MySqlConnection,
    keys: &[DedupeKey],
) -> Result<HashMap<DedupeKey, Stored>, sqlx::Error> {
    let mut found = HashMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    let mut q = QueryBuilder::<MySql>::new(format!(
        "SELECT {MESSAGE_COLUMNS} FROM message m WHERE (m.sender, m.sender_device, m.client_seq) IN "
    ));
    q.push_tuples(keys, |mut b, (sender, device, seq)| {
        b.push_bind(sender.as_str())
            .push_bind(device.as_str())
            .push_bind(i(*seq));
    });
    let rows = q.build().fetch_all(&mut *conn).await?;
    for row in &rows {
        let message = message_from_row(row)?;
        let (mut sender_seq, mut receiver_seq) = (0, 0);
        if let Some(receiver) = message.to.user() {
            let seqs: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT owner, user_seq FROM relation WHERE (owner = ? AND other = ? AND mid = ?) OR (owner = ? AND other = ? AND mid = ?)",
            )
            .bind(message.sender.as_str())
            .bind(receiver.as_str())
            .bind(i(message.mid))
            .bind(receiver.as_str())
            .bind(message.sender.as_str())
            .bind(i(message.mid))
            .fetch_all(&mut *conn)
            .await?;
            for (owner, seq) in seqs {
                if owner == message.sender.as_bytes() {
                    sender_seq = seq as u64;
                }
                if owner == receiver.as_bytes() {
                    receiver_seq = seq as u64;
                }
            }
        }
        let key = (
            message.sender.clone(),
            message.sender_device.clone(),
            message.client_seq,
        );
        found.insert(
            key,
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

/// Creates the missing counter rows, then locks and reads them all.
async fn lock_counters(
    conn: &mut MySqlConnection,
    convs: &[String],
    users: &[UserId],
) -> Result<(HashMap<String, u64>, HashMap<UserId, u64>), sqlx::Error> {
    let mut conv = HashMap::new();
    let mut user = HashMap::new();
    if !convs.is_empty() {
        // Creating or touching the rows takes their exclusive locks at once
        // (the shared lock INSERT IGNORE takes would deadlock two writers
        // that both upgrade it next).
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO conversation (conv_id, last_seq) ");
        q.push_values(convs, |mut b, c| {
            b.push_bind(c.as_str()).push_bind(0i64);
        });
        q.push(" ON DUPLICATE KEY UPDATE last_seq = last_seq");
        q.build().execute(&mut *conn).await?;
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT conv_id, last_seq FROM conversation WHERE conv_id IN ",
        );
        q.push_tuples(convs, |mut b, c| {
            b.push_bind(c.as_str());
        });
        q.push(" ORDER BY conv_id FOR UPDATE");
        let rows: Vec<(Vec<u8>, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
        for (c, s) in rows {
            conv.insert(device_id(c)?, s as u64);
        }
    }
    if !users.is_empty() {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO user_sequence (owner, last_seq) ");
        q.push_values(users, |mut b, u| {
            b.push_bind(u.as_str()).push_bind(0i64);
        });
        q.push(" ON DUPLICATE KEY UPDATE last_seq = last_seq");
        q.build().execute(&mut *conn).await?;
        let mut q =
            QueryBuilder::<MySql>::new("SELECT owner, last_seq FROM user_sequence WHERE owner IN ");
        q.push_tuples(users, |mut b, u| {
            b.push_bind(u.as_str());
        });
        q.push(" ORDER BY owner FOR UPDATE");
        let rows: Vec<(Vec<u8>, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
        for (o, s) in rows {
            user.insert(uid(o)?, s as u64);
        }
    }
    Ok((conv, user))
}

/// A `device_cursor` row as read: owner, device, gid, cursor_seq, above.
type CursorRow = (Vec<u8>, Vec<u8>, i64, i64, String);

/// Creates the missing cursor rows, then locks and reads them all.
async fn lock_cursors(
    conn: &mut MySqlConnection,
    keys: &[CursorKey],
) -> Result<HashMap<CursorKey, DeviceCursor>, sqlx::Error> {
    let mut cursors = HashMap::new();
    if keys.is_empty() {
        return Ok(cursors);
    }
    let mut q = QueryBuilder::<MySql>::new(
        "INSERT INTO device_cursor (owner, device, gid, cursor_seq, above, updated_at) ",
    );
    let now = natter_node::ids::now_ms();
    q.push_values(keys, |mut b, (owner, device, gid)| {
        b.push_bind(owner.as_str())
            .push_bind(device.as_str())
            .push_bind(i(*gid))
            .push_bind(0i64)
            .push_bind("")
            .push_bind(now);
    });
    q.push(" ON DUPLICATE KEY UPDATE cursor_seq = cursor_seq");
    q.build().execute(&mut *conn).await?;
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT owner, device, gid, cursor_seq, above FROM device_cursor WHERE (owner, device, gid) IN ",
    );
    q.push_tuples(keys, |mut b, (owner, device, gid)| {
        b.push_bind(owner.as_str())
            .push_bind(device.as_str())
            .push_bind(i(*gid));
    });
    q.push(" ORDER BY owner, device, gid FOR UPDATE");
    let rows: Vec<CursorRow> = q.build_query_as().fetch_all(&mut *conn).await?;
    for (owner, device, gid, cursor, above) in rows {
        cursors.insert(
            (uid(owner)?, device_id(device)?, gid as u64),
            DeviceCursor {
                contiguous: cursor as u64,
                above: parse_above(&above),
            },
        );
    }
    Ok(cursors)
}

/// Locks and reads the stored read cursors of the batch's reads (absent:
/// none yet). The batch holds their conversations' counters, so no other
/// batch moves them meanwhile; the locking read sees the newest committed
/// rows, not the transaction's older snapshot.
async fn lock_read_cursors(
    conn: &mut MySqlConnection,
    writes: &[Write],
) -> Result<HashMap<ReadKey, u64>, sqlx::Error> {
    let mut keys: Vec<(&UserId, &str)> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Read {
                owner,
                conversation,
                ..
            } => Some((owner, conversation.as_str())),
            _ => None,
        })
        .collect();
    let mut cursors = HashMap::new();
    if keys.is_empty() {
        return Ok(cursors);
    }
    keys.sort_unstable();
    keys.dedup();
    let mut q = QueryBuilder::<MySql>::new(
        "SELECT owner, conv_id, read_seq FROM chat WHERE (owner, conv_id) IN ",
    );
    q.push_tuples(&keys, |mut b, (owner, conversation)| {
        b.push_bind(owner.as_str()).push_bind(*conversation);
    });
    q.push(" ORDER BY owner, conv_id FOR UPDATE");
    let rows: Vec<(Vec<u8>, Vec<u8>, i64)> = q.build_query_as().fetch_all(&mut *conn).await?;
    for (owner, conversation, read_seq) in rows {
        cursors.insert((uid(owner)?, device_id(conversation)?), read_seq as u64);
    }
    Ok(cursors)
}

/// Messages from others after a read cursor: the positions after it that
/// are not markers.
fn unread(last_seq: u64, read_seq: u64, markers: u64) -> u64 {
    last_seq.saturating_sub(read_seq).saturating_sub(markers)
}

/// The markers of `conversation` in (`after`, `upto`]. A locking read: the
/// batch's snapshot may be older than the markers of the batch that held
/// the conversation before it.
async fn markers_between(
    conn: &mut MySqlConnection,
    conversation: &str,
    after: u64,
    upto: u64,
) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM conv_marker WHERE conv_id = ? AND conv_seq > ? AND conv_seq <= ? \
         LOCK IN SHARE MODE",
    )
    .bind(conversation)
    .bind(i(after))
    .bind(i(upto))
    .fetch_one(&mut *conn)
    .await?;
    Ok(count.max(0) as u64)
}

/// Applies a revoke or an edit to its target message, which must be in the
/// same conversation.
async fn apply_effect(conn: &mut MySqlConnection, effect: &Effect) -> Result<(), sqlx::Error> {
    match effect {
        Effect::Revoke {
            conversation,
            target,
            at,
        } => {
            sqlx::query(
                "UPDATE message SET content = '', revoked_at = ? \
                 WHERE mid = ? AND conv_id = ? AND revoked_at = 0",
            )
            .bind(at)
            .bind(i(*target))
            .bind(conversation.as_str())
            .execute(&mut *conn)
            .await?;
            // The edits of a revoked message lose their text too.
            sqlx::query(
                "UPDATE message m JOIN conv_marker k \
                 ON k.conv_id = m.conv_id AND k.conv_seq = m.conv_seq \
                 SET m.content = ? WHERE k.target = ? AND k.conv_id = ? AND m.msg_type = 13",
            )
            .bind(crate::batch::revoked_edit(*target))
            .bind(i(*target))
            .bind(conversation.as_str())
            .execute(&mut *conn)
            .await?;
        }
        Effect::Edit {
            conversation,
            target,
            content,
            at,
        } => {
            sqlx::query(
                "UPDATE message SET content = ?, edited_at = ? \
                 WHERE mid = ? AND conv_id = ? AND revoked_at = 0 AND msg_type = 1",
            )
            .bind(content.as_slice())
            .bind(at)
            .bind(i(*target))
            .bind(conversation.as_str())
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// One batch, in the caller's transaction.
async fn apply(conn: &mut MySqlConnection, writes: &[Write]) -> Result<Vec<Outcome>, sqlx::Error> {
    let touched = touched(writes);
    let existing = find_existing(conn, &touched.keys).await?;
    let (mut conv, mut user) = lock_counters(conn, &touched.convs, &touched.users).await?;
    let mut devices = lock_cursors(conn, &touched.devices).await?;
    let read_cursors = lock_read_cursors(conn, writes).await?;
    let Walk {
        mut outcomes,
        messages,
        relations,
        received,
        touched_convs,
        touched_users,
        mut chats,
        last_mids,
        markers,
        effects,
        forget,
        reads,
    } = walk(
        writes,
        &existing,
        &mut conv,
        &mut user,
        &mut devices,
        &read_cursors,
    );

    if !messages.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO message (mid, conv_id, conv_seq, sender, sender_device, client_seq, receiver, msg_type, content, created_at) ",
        );
        q.push_values(&messages, |mut b, m| {
            b.push_bind(i(m.mid))
                .push_bind(m.conversation.as_str())
                .push_bind(i(m.conv_seq))
                .push_bind(m.sender.as_str())
                .push_bind(m.sender_device.as_str())
                .push_bind(i(m.client_seq))
                .push_bind(m.to.user().map_or("", |u| u.as_str()))
                .push_bind(m.msg_type as i32)
                .push_bind(m.content.as_slice())
                .push_bind(m.time_ms);
        });
        q.build().execute(&mut *conn).await?;
        crate::search::mysql::index(conn, &messages).await?;
    }
    crate::search::mysql::apply_effects(conn, &effects).await?;
    if !relations.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO relation (owner, user_seq, mid, other, direction, received, created_at) ",
        );
        q.push_values(&relations, |mut b, r| {
            b.push_bind(r.owner.as_str())
                .push_bind(i(r.user_seq))
                .push_bind(i(r.mid))
                .push_bind(r.other.as_str())
                .push_bind(r.direction)
                .push_bind(0i64)
                .push_bind(r.time_ms);
        });
        q.build().execute(&mut *conn).await?;
    }
    if !received.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "UPDATE relation SET received = 1 WHERE (owner, user_seq) IN ",
        );
        q.push_tuples(&received, |mut b, (owner, seq)| {
            b.push_bind(owner.as_str()).push_bind(i(*seq));
        });
        q.build().execute(&mut *conn).await?;
    }
    if !touched_convs.is_empty() {
        let last_mid: HashMap<&str, u64> =
            last_mids.iter().map(|(c, m)| (c.as_str(), *m)).collect();
        let mut q =
            QueryBuilder::<MySql>::new("INSERT INTO conversation (conv_id, last_seq, last_mid) ");
        q.push_values(&touched_convs, |mut b, c| {
            b.push_bind(c.as_str())
                .push_bind(i(conv.get(c).copied().unwrap_or(0)))
                .push_bind(i(last_mid.get(c.as_str()).copied().unwrap_or(0)));
        });
        q.push(" ON DUPLICATE KEY UPDATE last_seq = VALUES(last_seq), last_mid = VALUES(last_mid)");
        q.build().execute(&mut *conn).await?;
    }
    if !chats.is_empty() {
        // In key order, like every other lock a batch takes. A racing writer
        // may have moved a row on: cursors and newest mids never move back.
        chats
            .sort_unstable_by(|a, b| (&a.owner, &a.conversation).cmp(&(&b.owner, &b.conversation)));
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO chat (owner, conv_id, peer, read_seq, last_mid) ",
        );
        q.push_values(&chats, |mut b, c| {
            b.push_bind(c.owner.as_str())
                .push_bind(c.conversation.as_str())
                .push_bind(c.peer.as_ref().map_or("", |p| p.as_str()))
                .push_bind(i(c.read_seq))
                .push_bind(i(c.last_mid));
        });
        q.push(
            " ON DUPLICATE KEY UPDATE read_seq = GREATEST(read_seq, VALUES(read_seq)), \
             last_mid = GREATEST(last_mid, VALUES(last_mid))",
        );
        q.build().execute(&mut *conn).await?;
    }
    if !markers.is_empty() {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT IGNORE INTO conv_marker (conv_id, conv_seq, target) ",
        );
        q.push_values(&markers, |mut b, (c, seq, target)| {
            b.push_bind(c.as_str())
                .push_bind(i(*seq))
                .push_bind(i(*target));
        });
        q.build().execute(&mut *conn).await?;
    }
    for effect in &effects {
        apply_effect(conn, effect).await?;
    }
    for (owner, conversation) in &forget {
        sqlx::query("DELETE FROM chat WHERE owner = ? AND conv_id = ?")
            .bind(owner.as_str())
            .bind(conversation.as_str())
            .execute(&mut *conn)
            .await?;
    }
    for (index, (_, conversation), _) in &reads {
        if let Some(Outcome::Read(state)) = outcomes.get_mut(*index) {
            let markers =
                markers_between(conn, conversation, state.read_seq, state.last_seq).await?;
            state.unread = unread(state.last_seq, state.read_seq, markers);
        }
    }
    if !touched_users.is_empty() {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO user_sequence (owner, last_seq) ");
        q.push_values(&touched_users, |mut b, u| {
            b.push_bind(u.as_str())
                .push_bind(i(user.get(u).copied().unwrap_or(0)));
        });
        q.push(" ON DUPLICATE KEY UPDATE last_seq = VALUES(last_seq)");
        q.build().execute(&mut *conn).await?;
    }
    if !touched.devices.is_empty() {
        let now = natter_node::ids::now_ms();
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO device_cursor (owner, device, gid, cursor_seq, above, updated_at) ",
        );
        q.push_values(&touched.devices, |mut b, key| {
            let cursor = devices.get(key).cloned().unwrap_or_default();
            b.push_bind(key.0.as_str())
                .push_bind(key.1.as_str())
                .push_bind(i(key.2))
                .push_bind(i(cursor.contiguous))
                .push_bind(format_above(&cursor.above))
                .push_bind(now);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE cursor_seq = VALUES(cursor_seq), above = VALUES(above), updated_at = VALUES(updated_at)",
        );
        q.build().execute(&mut *conn).await?;
    }
    Ok(outcomes)
}

#[async_trait]
impl MessageStore for MySqlStore {
    async fn write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
        self.closed()?;
        let mut attempt = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            match apply(&mut tx, writes).await {
                Ok(outcomes) => match tx.commit().await {
                    Ok(()) => return Ok(outcomes),
                    Err(e) if retryable(&e) && attempt < RETRIES => {}
                    Err(e) => return Err(e.into()),
                },
                Err(e) => {
                    let _ = tx.rollback().await;
                    if !(retryable(&e) && attempt < RETRIES) {
                        return Err(e.into());
                    }
                    tracing::debug!(error = %e, attempt, "batch raced another writer; running it again");
                }
            }
            attempt += 1;
            back_off(attempt).await;
        }
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        let mut b = QueryBuilder::<MySql>::new(format!(
            "SELECT {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid WHERE r.owner = "
        ));
        b.push_bind(q.owner.as_str())
            .push(" AND r.other = ")
            .push_bind(q.other.as_str())
            .push(" AND r.mid < ")
            .push_bind(q.before.map(i).unwrap_or(i64::MAX));
        if !q.types.is_empty() {
            b.push(" AND m.msg_type IN ");
            b.push_tuples(&q.types, |mut t, ty| {
                t.push_bind(*ty as i32);
            });
        }
        b.push(" ORDER BY r.mid DESC LIMIT ")
            .push_bind(i64::from(q.limit.count));
        let rows = b.build().fetch(&self.pool);
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
            "SELECT r.user_seq, {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid
             WHERE r.owner = ? AND r.user_seq > ? ORDER BY r.user_seq LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(owner.as_str())
            .bind(i(after))
            .bind(i64::from(limit.count))
            .fetch(&self.pool);
        let item = |row: &MySqlRow| {
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
        let conv = group_conversation(q.group);
        let mut b = QueryBuilder::<MySql>::new(format!(
            "SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.conv_id = "
        ));
        b.push_bind(conv.clone())
            .push(" AND m.conv_seq >= ")
            .push_bind(i(q.from_seq));
        if let Some(before) = q.before {
            // A `before` that is not a message of this group gives an empty page.
            b.push(" AND m.conv_seq < COALESCE((SELECT x.conv_seq FROM message x WHERE x.mid = ")
                .push_bind(i(before))
                .push(" AND x.conv_id = ")
                .push_bind(conv)
                .push("), 0)");
        }
        if !q.types.is_empty() {
            b.push(" AND m.msg_type IN ");
            b.push_tuples(&q.types, |mut t, ty| {
                t.push_bind(*ty as i32);
            });
        }
        b.push(" ORDER BY m.conv_seq DESC LIMIT ")
            .push_bind(i64::from(q.limit.count));
        let rows = b.build().fetch(&self.pool);
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
            "SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.conv_id = ? AND m.conv_seq > ? ORDER BY m.conv_seq LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(group_conversation(group))
            .bind(i(after))
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
        let mut b = QueryBuilder::<MySql>::new(
            "SELECT conv_id, last_seq FROM conversation WHERE conv_id IN ",
        );
        b.push_tuples(&convs, |mut t, c| {
            t.push_bind(c.as_str());
        });
        let rows: Vec<(Vec<u8>, i64)> = b.build_query_as().fetch_all(&self.pool).await?;
        let mut known: HashMap<String, u64> = HashMap::with_capacity(rows.len());
        for (c, s) in rows {
            known.insert(device_id(c)?, s as u64);
        }
        Ok(convs
            .iter()
            .map(|c| known.get(c).copied().unwrap_or(0))
            .collect())
    }

    async fn cursor(&self, owner: &UserId, device: &str, group: u64) -> Result<u64, StoreError> {
        self.closed()?;
        let cursor: Option<i64> = sqlx::query_scalar(
            "SELECT cursor_seq FROM device_cursor WHERE owner = ? AND device = ? AND gid = ?",
        )
        .bind(owner.as_str())
        .bind(device)
        .bind(i(group))
        .fetch_optional(&self.pool)
        .await?;
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
        let mut b =
            QueryBuilder::<MySql>::new("SELECT gid, cursor_seq FROM device_cursor WHERE owner = ");
        b.push_bind(owner.as_str())
            .push(" AND device = ")
            .push_bind(device)
            .push(" AND gid IN ");
        b.push_tuples(groups, |mut t, g| {
            t.push_bind(i(*g));
        });
        let rows: Vec<(i64, i64)> = b.build_query_as().fetch_all(&self.pool).await?;
        let stored: HashMap<u64, u64> = rows
            .into_iter()
            .map(|(g, c)| (g as u64, c as u64))
            .collect();
        Ok(groups
            .iter()
            .map(|g| stored.get(g).copied().unwrap_or(0))
            .collect())
    }

    async fn expire(&self, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.closed()?;
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT mid, sender, receiver FROM message WHERE mid < ? AND created_at < ? ORDER BY mid LIMIT ? FOR UPDATE",
        )
        .bind(expiry_mid_bound(before_ms))
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        for (mid, sender, receiver) in &rows {
            sqlx::query(
                "DELETE FROM relation WHERE (owner = ? AND other = ? AND mid = ?) OR (owner = ? AND other = ? AND mid = ?)",
            )
            .bind(sender)
            .bind(receiver)
            .bind(mid)
            .bind(receiver)
            .bind(sender)
            .bind(mid)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM message WHERE mid = ?")
                .bind(mid)
                .execute(&mut *tx)
                .await?;
            crate::search::mysql::expired(&mut tx, *mid).await?;
        }
        tx.commit().await?;
        Ok(rows.len() as u64)
    }

    async fn log_out(&self, uid: &UserId, at_ms: i64) -> Result<(), StoreError> {
        self.closed()?;
        sqlx::query(
            "INSERT INTO user_logout (uid, at) VALUES (?, ?) \
             ON DUPLICATE KEY UPDATE at = GREATEST(at, VALUES(at))",
        )
        .bind(uid.as_str())
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn logged_out_at(&self, uid: &UserId) -> Result<Option<i64>, StoreError> {
        self.closed()?;
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT at FROM user_logout WHERE uid = ?")
                .bind(uid.as_str())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn message(&self, mid: u64) -> Result<Option<StoredMessage>, StoreError> {
        self.closed()?;
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.mid = ?");
        let row = sqlx::query(&sql)
            .bind(i(mid))
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
        // One-to-one rows: a page of the `chat_recent` index after the key,
        // with the conversation's newest position, the markers after the
        // user's cursor, and the other user's cursor. The key comparison is
        // spelled out: MySQL ranges an index by a row comparison only as a
        // chain of ORs.
        let mut b = QueryBuilder::<MySql>::new(
            "SELECT h.conv_id, h.peer, h.read_seq, h.pinned, h.push, h.last_mid, \
             COALESCE(c.last_seq, 0) AS last_seq, \
             (SELECT COUNT(*) FROM conv_marker k \
              WHERE k.conv_id = h.conv_id AND k.conv_seq > h.read_seq) AS markers, \
             COALESCE((SELECT o.read_seq FROM chat o \
              WHERE o.owner = h.peer AND o.conv_id = h.conv_id), 0) AS peer_read \
             FROM chat h LEFT JOIN conversation c ON c.conv_id = h.conv_id WHERE h.owner = ",
        );
        b.push_bind(q.owner.as_str()).push(" AND h.peer != ''");
        if let Some(after) = &q.after {
            let pinned = i64::from(after.pinned);
            let last_mid = i(after.last_mid);
            b.push(" AND (h.pinned < ")
                .push_bind(pinned)
                .push(" OR (h.pinned = ")
                .push_bind(pinned)
                .push(" AND (h.last_mid < ")
                .push_bind(last_mid)
                .push(" OR (h.last_mid = ")
                .push_bind(last_mid)
                .push(" AND h.conv_id < ")
                .push_bind(after.conversation.as_str())
                .push("))))");
        }
        b.push(" ORDER BY h.pinned DESC, h.last_mid DESC, h.conv_id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let rows = b.build().fetch_all(&self.pool).await?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in &rows {
            let last_seq = row.try_get::<i64, _>("last_seq")? as u64;
            let read_seq = row.try_get::<i64, _>("read_seq")? as u64;
            let markers = row.try_get::<i64, _>("markers")?.max(0) as u64;
            let mid = row.try_get::<i64, _>("last_mid")? as u64;
            entries.push((
                mid,
                ConversationEntry {
                    peer: Peer::User(uid(row.try_get("peer")?)?),
                    conversation: device_id(row.try_get("conv_id")?)?,
                    last: None,
                    last_seq,
                    read_seq,
                    unread: unread(last_seq, read_seq, markers),
                    peer_read_seq: row.try_get::<i64, _>("peer_read")? as u64,
                    settings: Settings {
                        pinned: row.try_get::<i64, _>("pinned")? != 0,
                        push: push_mode_from(row.try_get("push")?),
                    },
                },
            ));
        }
        if !q.groups.is_empty() {
            entries.extend(self.group_entries(q).await?);
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
        let mids: Vec<u64> = entries
            .iter()
            .map(|(mid, _)| *mid)
            .filter(|mid| *mid != 0)
            .collect();
        let mut last: HashMap<u64, StoredMessage> = HashMap::with_capacity(mids.len());
        if !mids.is_empty() {
            let mut b = QueryBuilder::<MySql>::new(format!(
                "SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.mid IN "
            ));
            b.push_tuples(&mids, |mut t, mid| {
                t.push_bind(i(*mid));
            });
            for row in &b.build().fetch_all(&self.pool).await? {
                let m = message_from_row(row)?;
                last.insert(m.mid, m);
            }
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
        let (last_seq, read_seq): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT last_seq FROM conversation WHERE conv_id = ?), 0), \
             COALESCE((SELECT read_seq FROM chat WHERE owner = ? AND conv_id = ?), 0)",
        )
        .bind(conversation)
        .bind(owner.as_str())
        .bind(conversation)
        .fetch_one(&self.pool)
        .await?;
        let last_seq = last_seq as u64;
        let read_seq = (read_seq as u64).max(floor).min(last_seq.max(floor));
        let markers: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM conv_marker WHERE conv_id = ? AND conv_seq > ? AND conv_seq <= ?",
        )
        .bind(conversation)
        .bind(i(read_seq))
        .bind(i(last_seq))
        .fetch_one(&self.pool)
        .await?;
        Ok(ReadState {
            last_seq,
            read_seq,
            unread: unread(last_seq, read_seq, markers.max(0) as u64),
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
        let pinned = change.pinned.map(i64::from);
        let push = change.push.map(push_mode_code);
        let mut tx = self.pool.begin().await?;
        // Creates the user's row if needed and changes the settings given
        // (NULL keeps one).
        sqlx::query(
            "INSERT INTO chat (owner, conv_id, peer, pinned, push) \
             VALUES (?, ?, ?, COALESCE(?, 0), COALESCE(?, 0)) \
             ON DUPLICATE KEY UPDATE pinned = COALESCE(?, pinned), push = COALESCE(?, push)",
        )
        .bind(owner.as_str())
        .bind(conversation)
        .bind(peer.as_ref().map_or("", |p| p.as_str()))
        .bind(pinned)
        .bind(push)
        .bind(pinned)
        .bind(push)
        .execute(&mut *tx)
        .await?;
        let (pinned, push): (i64, i64) =
            sqlx::query_as("SELECT pinned, push FROM chat WHERE owner = ? AND conv_id = ?")
                .bind(owner.as_str())
                .bind(conversation)
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
        let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
            "SELECT owner, read_seq FROM chat \
             WHERE conv_id = ? AND read_seq >= ? AND peer = '' ORDER BY owner LIMIT ?",
        )
        .bind(conversation)
        .bind(i(seq))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut readers = Vec::with_capacity(rows.len());
        for (owner, read_seq) in rows {
            readers.push(Reader {
                uid: uid(owner)?,
                read_seq: read_seq as u64,
            });
        }
        Ok(readers)
    }

    async fn read_count(&self, conversation: &str, seq: u64) -> Result<u64, StoreError> {
        self.closed()?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM chat WHERE conv_id = ? AND read_seq >= ? AND peer = ''",
        )
        .bind(conversation)
        .bind(i(seq))
        .fetch_one(&self.pool)
        .await?;
        Ok(count.max(0) as u64)
    }

    async fn search(&self, q: &SearchQuery) -> Result<Page<StoredMessage>, StoreError> {
        self.closed()?;
        Ok(crate::search::mysql::search(&self.pool, q).await?)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.closed()?;
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// A fresh database per test on the machine's MariaDB/MySQL, dropped at
/// the end. A missing server fails the test, saying what to install.
#[cfg(any(test, feature = "test-util"))]
pub mod testing {
    use super::*;

    /// The server tests use: `NATTER_TEST_MYSQL`, else the local root.
    pub fn server_url() -> String {
        std::env::var("NATTER_TEST_MYSQL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
    }

    /// Creates an empty database; returns its URL and name. Panics without a
    /// server, saying what to install.
    pub async fn fresh_database() -> (String, String) {
        let admin = format!("{}/test", server_url());
        let pool = match MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin)
            .await
        {
            Ok(pool) => pool,
            Err(e) => panic!(
                "no MySQL/MariaDB at {admin} ({e}): install and start Debian's mariadb-server, or run scripts/test, which does"
            ),
        };
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("random");
        let name = format!(
            "natter_t_{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        (format!("{}/{name}", server_url()), name)
    }

    /// Drops a database made by [`fresh_database`].
    pub async fn drop_database(name: &str) {
        let admin = format!("{}/test", server_url());
        if let Ok(pool) = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::suite::u;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn mysql_passes_the_store_suite() {
        let (_, probe) = fresh_database().await;
        drop_database(&probe).await;
        let made: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = made.clone();
        crate::suite::run_all(move || {
            let record = record.clone();
            async move {
                let (url, name) = fresh_database().await;
                record.lock().expect("lock").push(name);
                MySqlStore::connect(&url, &MySqlOptions::default())
                    .await
                    .expect("store")
            }
        })
        .await;
        let names = made.lock().expect("lock").clone();
        for name in names {
            drop_database(&name).await;
        }
    }

    /// A database from before conversations gets them from what it holds:
    /// each conversation's newest message, a row per one-to-one party with
    /// what it sent read, and group events that are no unread messages.
    #[tokio::test]
    async fn conversations_of_a_database_before_them_are_listed() {
        let (url, name) = fresh_database().await;
        let pool = MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("pool");
        migrate_exclusively(&pool, &crate::migrations::migrator(&MIGRATIONS[..11], true))
            .await
            .expect("the migrations before conversations");
        for sql in [
            // a -> b twice, b -> a once; in group 7 a text, an event, a text.
            "INSERT INTO message VALUES \
             (100, 'p:a:b', 1, 'a', 'phone', 1, 'b', 1, x'0a040a026869', 1700000000000), \
             (101, 'p:a:b', 2, 'a', 'phone', 2, 'b', 1, x'0a040a026869', 1700000000001), \
             (102, 'p:a:b', 3, 'b', 'phone', 1, 'a', 1, x'0a040a026869', 1700000000002), \
             (103, 'g:7', 1, 'a', 'phone', 3, '', 1, x'0a040a026869', 1700000000003), \
             (104, 'g:7', 2, 'a', '', 1, '', 11, x'', 1700000000004), \
             (105, 'g:7', 3, 'a', 'phone', 4, '', 1, x'0a040a026869', 1700000000005)",
            "INSERT INTO relation VALUES \
             ('a', 1, 100, 'b', 1, 0, 0), ('a', 2, 101, 'b', 1, 0, 0), ('a', 3, 102, 'b', 2, 0, 0), \
             ('b', 1, 100, 'a', 2, 0, 0), ('b', 2, 101, 'a', 2, 0, 0), ('b', 3, 102, 'a', 1, 0, 0)",
            "INSERT INTO conversation VALUES ('p:a:b', 3), ('g:7', 3)",
            "INSERT INTO user_sequence VALUES ('a', 3), ('b', 3)",
        ] {
            sqlx::query(sql).execute(&pool).await.expect(sql);
        }
        pool.close().await;
        let store = MySqlStore::connect(&url, &MySqlOptions::default())
            .await
            .expect("migrated");
        let id = |s: &str| UserId::parse(s).expect("a valid user id");
        let list = |owner: &str, groups: Vec<(u64, u64)>| ConversationQuery {
            owner: id(owner),
            groups,
            after: None,
            limit: 10,
        };
        let a = store
            .conversations(&list("a", vec![]))
            .await
            .expect("list")
            .items;
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].conversation, "p:a:b");
        assert_eq!(a[0].last.as_ref().map(|m| m.mid), Some(102));
        assert_eq!(
            (
                a[0].last_seq,
                a[0].read_seq,
                a[0].unread,
                a[0].peer_read_seq
            ),
            (3, 2, 1, 3)
        );
        let b = store
            .conversations(&list("b", vec![]))
            .await
            .expect("list")
            .items;
        assert_eq!((b[0].read_seq, b[0].unread, b[0].peer_read_seq), (3, 0, 2));
        let c = store
            .conversations(&list("c", vec![(7, 1)]))
            .await
            .expect("list")
            .items;
        assert_eq!(c[0].last.as_ref().map(|m| m.mid), Some(105));
        assert_eq!(
            (c[0].last_seq, c[0].unread),
            (3, 2),
            "the event is no message"
        );
        // The conversation goes on from there.
        store
            .write_batch(&[Write::Message(NewMessage {
                mid: 200,
                time_ms: 1_700_000_000_200,
                sender: id("b"),
                sender_device: "phone".into(),
                client_seq: 2,
                to: Peer::User(id("a")),
                msg_type: 1,
                content: vec![0x0a, 0x04, 0x0a, 0x02, b'h', b'i'],
            })])
            .await
            .expect("write");
        let a = store
            .conversations(&list("a", vec![]))
            .await
            .expect("list")
            .items;
        assert_eq!(a[0].last.as_ref().map(|m| m.mid), Some(200));
        assert_eq!((a[0].last_seq, a[0].unread), (4, 2));
        store.close().await;
        drop_database(&name).await;
    }

    #[tokio::test]
    async fn mysql_passes_the_search_suite() {
        let made: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = made.clone();
        crate::suite::run_search(move || {
            let record = record.clone();
            async move {
                let (url, name) = fresh_database().await;
                record.lock().expect("lock").push(name);
                MySqlStore::connect(&url, &MySqlOptions::default())
                    .await
                    .expect("store")
            }
        })
        .await;
        let names = made.lock().expect("lock").clone();
        for name in names {
            drop_database(&name).await;
        }
    }

    #[tokio::test]
    async fn nodes_starting_together_migrate_one_database_once() {
        let (url, name) = fresh_database().await;
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(
                    async move { MySqlStore::connect(&url, &MySqlOptions::default()).await },
                )
            })
            .collect();
        for start in starts {
            let store = start.await.expect("task").expect("every node starts");
            store.close().await;
        }
        drop_database(&name).await;
    }

    #[tokio::test]
    async fn two_writers_racing_on_one_conversation_number_it_without_gaps() {
        let (url, name) = fresh_database().await;
        // Two stores on one database: two logic nodes.
        let a = Arc::new(
            MySqlStore::connect(&url, &MySqlOptions::default())
                .await
                .expect("a"),
        );
        let b = Arc::new(
            MySqlStore::connect(&url, &MySqlOptions::default())
                .await
                .expect("b"),
        );
        let mut tasks = Vec::new();
        for (n, store) in [a.clone(), b.clone()].into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                for k in 0..40u64 {
                    let client_seq = n as u64 * 1000 + k + 1;
                    // Both write the same conversation and the same users.
                    let batch = vec![Write::Message(crate::suite::text(1, 2, client_seq))];
                    store.write_batch(&batch).await.expect("batch");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer");
        }
        let page = a
            .history(&HistoryQuery {
                owner: u(1),
                other: u(2),
                before: None,
                limit: 100.into(),
                types: vec![],
            })
            .await
            .expect("history")
            .items;
        let mut seqs: Vec<u64> = page.iter().map(|m| m.conv_seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=80).collect::<Vec<u64>>());
        let stream: Vec<u64> = b
            .sync(&u(2), 0, 500.into())
            .await
            .expect("sync")
            .items
            .iter()
            .map(|s| s.user_seq)
            .collect();
        assert_eq!(stream, (1..=80).collect::<Vec<u64>>());
        a.close().await;
        b.close().await;
        drop_database(&name).await;
    }
}
