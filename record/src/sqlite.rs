//! The SQLite implementation of [`MessageStore`], for the embedded shape.
//!
//! WAL mode; `synchronous=FULL` when commits must survive a power loss,
//! `NORMAL` otherwise (a process crash loses nothing either way). Writes are
//! serialized by one lock and come in batches from the committer, so the
//! per-conversation and per-user sequence counters are cached in memory
//! while the process is the only writer of the file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::Mutex;

use crate::store::*;

const MESSAGE_COLUMNS: &str =
    "m.mid, m.conv_id, m.conv_seq, m.sender, m.sender_device, m.client_seq, m.receiver, m.msg_type, m.content, m.created_at";

fn migrator() -> Migrator {
    Migrator {
        migrations: Cow::Owned(vec![Migration::new(
            1,
            Cow::Borrowed("messages"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/sqlite/0001_messages.sql")),
            false,
        )]),
        ..Migrator::DEFAULT
    }
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

/// Counters cached by the single writer.
#[derive(Default)]
struct Counters {
    conv: HashMap<String, u64>,
    user: HashMap<u64, u64>,
}

pub struct SqliteStore {
    pool: SqlitePool,
    writer: Mutex<Counters>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(path: &Path, options: &SqliteOptions) -> Result<SqliteStore, StoreError> {
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
            .foreign_keys(false);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.readers + 1)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        migrator().run(&pool).await?;
        Ok(SqliteStore {
            pool,
            writer: Mutex::new(Counters::default()),
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
        migrator().run(&pool).await?;
        Ok(SqliteStore {
            pool,
            writer: Mutex::new(Counters::default()),
        })
    }

    fn closed(&self) -> Result<(), StoreError> {
        if self.pool.is_closed() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }
}

fn message_from_row(row: &SqliteRow) -> Result<StoredMessage, sqlx::Error> {
    Ok(StoredMessage {
        mid: row.try_get::<i64, _>("mid")? as u64,
        conversation: row.try_get("conv_id")?,
        conv_seq: row.try_get::<i64, _>("conv_seq")? as u64,
        sender: row.try_get::<i64, _>("sender")? as u64,
        sender_device: row.try_get("sender_device")?,
        client_seq: row.try_get::<i64, _>("client_seq")? as u64,
        receiver: row.try_get::<i64, _>("receiver")? as u64,
        msg_type: row.try_get::<i64, _>("msg_type")? as u32,
        content: row.try_get("content")?,
        time_ms: row.try_get("created_at")?,
    })
}

async fn next_conv_seq(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    conv: &str,
) -> Result<u64, sqlx::Error> {
    let last = match counters.conv.get(conv) {
        Some(v) => *v,
        None => sqlx::query_scalar::<_, i64>("SELECT last_seq FROM conversation WHERE conv_id = ?")
            .bind(conv)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or(0) as u64,
    };
    counters.conv.insert(conv.to_string(), last + 1);
    Ok(last + 1)
}

async fn next_user_seq(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    owner: u64,
) -> Result<u64, sqlx::Error> {
    let last = match counters.user.get(&owner) {
        Some(v) => *v,
        None => sqlx::query_scalar::<_, i64>("SELECT last_seq FROM user_sequence WHERE owner = ?")
            .bind(owner as i64)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or(0) as u64,
    };
    counters.user.insert(owner, last + 1);
    Ok(last + 1)
}

async fn find_existing(
    conn: &mut SqliteConnection,
    m: &NewMessage,
) -> Result<Option<Stored>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM message m WHERE m.sender = ? AND m.sender_device = ? AND m.client_seq = ?"
    ))
    .bind(m.sender as i64)
    .bind(&m.sender_device)
    .bind(m.client_seq as i64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let message = message_from_row(&row)?;
    let seq_of = |owner: u64| {
        sqlx::query_scalar::<_, i64>("SELECT user_seq FROM relation WHERE owner = ? AND mid = ?")
            .bind(owner as i64)
            .bind(message.mid as i64)
    };
    let sender_seq = seq_of(message.sender).fetch_one(&mut *conn).await? as u64;
    let receiver_seq = seq_of(message.receiver).fetch_one(&mut *conn).await? as u64;
    Ok(Some(Stored {
        message,
        sender_seq,
        receiver_seq,
        repeat: true,
    }))
}

async fn insert_relation(
    conn: &mut SqliteConnection,
    owner: u64,
    user_seq: u64,
    m: &StoredMessage,
    other: u64,
    direction: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relation (owner, user_seq, mid, other, direction, received, created_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
    )
    .bind(owner as i64)
    .bind(user_seq as i64)
    .bind(m.mid as i64)
    .bind(other as i64)
    .bind(direction)
    .bind(m.time_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn raise_cursor(
    conn: &mut SqliteConnection,
    owner: u64,
    device: &str,
    to: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO device (owner, device, cursor, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (owner, device) DO UPDATE SET cursor = MAX(cursor, excluded.cursor), updated_at = excluded.updated_at",
    )
    .bind(owner as i64)
    .bind(device)
    .bind(to as i64)
    .bind(natter_node::ids::now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn apply(
    conn: &mut SqliteConnection,
    counters: &mut Counters,
    writes: &[Write],
) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut outcomes = Vec::with_capacity(writes.len());
    // Duplicates within one batch: the key of each message stored so far.
    let mut in_batch: HashMap<(u64, &str, u64), usize> = HashMap::new();
    let mut touched_convs: Vec<String> = Vec::new();
    let mut touched_users: Vec<u64> = Vec::new();
    for write in writes {
        match write {
            Write::Message(m) => {
                if let Some(&i) = in_batch.get(&(m.sender, m.sender_device.as_str(), m.client_seq))
                {
                    let Outcome::Stored(earlier) = &outcomes[i] else {
                        unreachable!("index of a message")
                    };
                    outcomes.push(Outcome::Stored(Stored {
                        repeat: true,
                        ..earlier.clone()
                    }));
                    continue;
                }
                if let Some(existing) = find_existing(conn, m).await? {
                    outcomes.push(Outcome::Stored(existing));
                    continue;
                }
                let conversation = p2p_conversation(m.sender, m.receiver);
                let conv_seq = next_conv_seq(conn, counters, &conversation).await?;
                let stored = StoredMessage {
                    mid: m.mid,
                    conversation: conversation.clone(),
                    conv_seq,
                    sender: m.sender,
                    sender_device: m.sender_device.clone(),
                    client_seq: m.client_seq,
                    receiver: m.receiver,
                    msg_type: m.msg_type,
                    content: m.content.clone(),
                    time_ms: m.time_ms,
                };
                sqlx::query(
                    "INSERT INTO message (mid, conv_id, conv_seq, sender, sender_device, client_seq, receiver, msg_type, content, created_at)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(stored.mid as i64)
                .bind(&stored.conversation)
                .bind(conv_seq as i64)
                .bind(stored.sender as i64)
                .bind(&stored.sender_device)
                .bind(stored.client_seq as i64)
                .bind(stored.receiver as i64)
                .bind(i64::from(stored.msg_type))
                .bind(&stored.content)
                .bind(stored.time_ms)
                .execute(&mut *conn)
                .await?;
                let sender_seq = next_user_seq(conn, counters, m.sender).await?;
                insert_relation(conn, m.sender, sender_seq, &stored, m.receiver, 1).await?;
                let receiver_seq = if m.receiver == m.sender {
                    sender_seq
                } else {
                    let seq = next_user_seq(conn, counters, m.receiver).await?;
                    insert_relation(conn, m.receiver, seq, &stored, m.sender, 2).await?;
                    touched_users.push(m.receiver);
                    seq
                };
                touched_users.push(m.sender);
                // The sending device holds its own message once it has the ack.
                raise_cursor(conn, m.sender, &m.sender_device, sender_seq).await?;
                touched_convs.push(conversation);
                in_batch.insert(
                    (m.sender, m.sender_device.as_str(), m.client_seq),
                    outcomes.len(),
                );
                outcomes.push(Outcome::Stored(Stored {
                    message: stored,
                    sender_seq,
                    receiver_seq,
                    repeat: false,
                }));
            }
            Write::Received {
                owner,
                device,
                user_seq,
            } => {
                sqlx::query("UPDATE relation SET received = 1 WHERE owner = ? AND user_seq = ?")
                    .bind(*owner as i64)
                    .bind(*user_seq as i64)
                    .execute(&mut *conn)
                    .await?;
                raise_cursor(conn, *owner, device, *user_seq).await?;
                outcomes.push(Outcome::Done);
            }
            Write::SetCursor {
                owner,
                device,
                cursor,
            } => {
                sqlx::query(
                    "INSERT INTO device (owner, device, cursor, updated_at) VALUES (?, ?, ?, ?)
                     ON CONFLICT (owner, device) DO UPDATE SET cursor = excluded.cursor, updated_at = excluded.updated_at",
                )
                .bind(*owner as i64)
                .bind(device)
                .bind(*cursor as i64)
                .bind(natter_node::ids::now_ms())
                .execute(&mut *conn)
                .await?;
                outcomes.push(Outcome::Done);
            }
            Write::Rewind {
                owner,
                device,
                user_seq,
            } => {
                sqlx::query("UPDATE device SET cursor = MIN(cursor, ?), updated_at = ? WHERE owner = ? AND device = ?")
                    .bind(user_seq.saturating_sub(1) as i64)
                    .bind(natter_node::ids::now_ms())
                    .bind(*owner as i64)
                    .bind(device)
                    .execute(&mut *conn)
                    .await?;
                outcomes.push(Outcome::Done);
            }
        }
    }
    touched_convs.sort_unstable();
    touched_convs.dedup();
    for conv in &touched_convs {
        sqlx::query(
            "INSERT INTO conversation (conv_id, last_seq) VALUES (?, ?)
             ON CONFLICT (conv_id) DO UPDATE SET last_seq = excluded.last_seq",
        )
        .bind(conv)
        .bind(counters.conv.get(conv).copied().unwrap_or(0) as i64)
        .execute(&mut *conn)
        .await?;
    }
    touched_users.sort_unstable();
    touched_users.dedup();
    for owner in &touched_users {
        sqlx::query(
            "INSERT INTO user_sequence (owner, last_seq) VALUES (?, ?)
             ON CONFLICT (owner) DO UPDATE SET last_seq = excluded.last_seq",
        )
        .bind(*owner as i64)
        .bind(counters.user.get(owner).copied().unwrap_or(0) as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(outcomes)
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn write_batch(&self, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
        self.closed()?;
        let mut counters = self.writer.lock().await;
        let mut tx = self.pool.begin().await?;
        match apply(&mut tx, &mut counters, writes).await {
            Ok(outcomes) => match tx.commit().await {
                Ok(()) => Ok(outcomes),
                Err(e) => {
                    // The cached counters may be ahead of what was committed.
                    *counters = Counters::default();
                    Err(e.into())
                }
            },
            Err(e) => {
                *counters = Counters::default();
                let _ = tx.rollback().await;
                Err(e.into())
            }
        }
    }

    async fn history(&self, q: &HistoryQuery) -> Result<Vec<StoredMessage>, StoreError> {
        self.closed()?;
        let mut sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid
             WHERE r.owner = ? AND r.other = ? AND r.mid < ?"
        );
        if !q.types.is_empty() {
            let marks = vec!["?"; q.types.len()].join(", ");
            sql.push_str(&format!(" AND m.msg_type IN ({marks})"));
        }
        sql.push_str(" ORDER BY r.mid DESC LIMIT ?");
        let mut query = sqlx::query(&sql)
            .bind(q.owner as i64)
            .bind(q.other as i64)
            .bind(
                q.before
                    .map(|b| b.min(i64::MAX as u64) as i64)
                    .unwrap_or(i64::MAX),
            );
        for t in &q.types {
            query = query.bind(i64::from(*t));
        }
        let rows = query.bind(i64::from(q.limit)).fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(message_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn sync(&self, owner: u64, after: u64, limit: u32) -> Result<Vec<SyncItem>, StoreError> {
        self.closed()?;
        let rows = sqlx::query(&format!(
            "SELECT r.user_seq, {MESSAGE_COLUMNS} FROM relation r JOIN message m ON m.mid = r.mid
             WHERE r.owner = ? AND r.user_seq > ? ORDER BY r.user_seq LIMIT ?"
        ))
        .bind(owner as i64)
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(|row| {
                Ok(SyncItem {
                    user_seq: row.try_get::<i64, _>("user_seq")? as u64,
                    message: message_from_row(row)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(items)
    }

    async fn cursor(&self, owner: u64, device: &str) -> Result<u64, StoreError> {
        self.closed()?;
        let cursor = sqlx::query_scalar::<_, i64>(
            "SELECT cursor FROM device WHERE owner = ? AND device = ?",
        )
        .bind(owner as i64)
        .bind(device)
        .fetch_optional(&self.pool)
        .await?;
        Ok(cursor.unwrap_or(0) as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.closed()?;
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // Wait for an in-flight batch, then close every connection (which
        // checkpoints the WAL when the last one goes).
        let _writer = self.writer.lock().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_passes_the_store_suite() {
        crate::suite::run_all(|| async { SqliteStore::memory().await.expect("memory store") })
            .await;
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
