//! Message search: which text of a message is searchable, the query's
//! checks, and how each store indexes and finds it.
//!
//! Both stores keep one row per searchable message (`search_text`): its
//! conversation, position, time and its text in lower case. A query is
//! lowered the same way and matches a substring of that text, so English is
//! found case-insensitively and Chinese or Japanese without word breaks.
//!
//! - SQLite ([`sqlite`]): an FTS5 index with the trigram tokenizer over the
//!   text, filled behind the commit by a background indexer from a durable
//!   queue. Trigrams need three characters; shorter queries scan the
//!   texts of the user's own conversations instead (see [`sqlite::search`]).
//! - MySQL/MariaDB ([`mysql`]): MariaDB ships no ngram parser, so the store
//!   writes each text's character bigrams itself into a FULLTEXT-indexed
//!   column, in the batch transaction (see [`mysql::grams`]).

use natter_proto::msg::{Content, MessageBody};
use prost::Message as _;

use crate::store::*;

/// The longest query, in characters.
pub const MAX_QUERY_CHARS: usize = 200;

/// The searchable text of a message body: the words a user would look for,
/// joined by newlines; `None` for bodies with none (media only, custom
/// data, group events, revokes and edits, which change other messages).
pub fn searchable_text(body: &MessageBody) -> Option<String> {
    let parts: Vec<&str> = match body.content.as_ref()? {
        Content::Text(t) => vec![&t.text],
        Content::Notice(n) => vec![&n.title, &n.text],
        Content::File(f) => vec![&f.name],
        Content::Location(l) => vec![&l.title, &l.address],
        Content::Card(c) => vec![&c.name],
        Content::Forward(f) => std::iter::once(f.title.as_str())
            .chain(f.items.iter().map(|i| i.summary.as_str()))
            .collect(),
        Content::Image(_)
        | Content::Audio(_)
        | Content::Video(_)
        | Content::Custom(_)
        | Content::GroupEvent(_)
        | Content::Revoke(_)
        | Content::Edit(_) => return None,
    };
    let text = parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    (!text.is_empty()).then_some(text)
}

/// The indexed form of a stored message's encoded body: its searchable
/// text in lower case. `None` for nothing to index, or bytes that do not
/// decode (validated on the way in; a revoked message's content is empty).
pub(crate) fn indexed_text(content: &[u8]) -> Option<String> {
    let body = MessageBody::decode(content).ok()?;
    searchable_text(&body).map(|t| fold(&t))
}

/// Texts and queries are compared in lower case.
pub(crate) fn fold(text: &str) -> String {
    text.to_lowercase()
}

/// Why a query is refused, if it is: empty, or too long.
pub fn check_query(text: &str) -> Result<(), &'static str> {
    if text.trim().is_empty() {
        return Err("q must not be empty");
    }
    if text.chars().count() > MAX_QUERY_CHARS {
        return Err("q must be at most 200 characters");
    }
    Ok(())
}

/// The conversations a search covers, each with the first `conv_seq` it
/// may find (a group member's join point; 0 for one-to-one conversations).
pub(crate) type Scope = Vec<(String, u64)>;

/// The scope of a query that names its conversation: that one, if the
/// owner is a party of it or it is one of the owner's groups (else none).
/// `None` when the query names no conversation: then the store adds the
/// owner's one-to-one conversations to the groups ([`full_scope`]).
pub(crate) fn named_scope(q: &SearchQuery) -> Option<Scope> {
    let conversation = q.conversation.as_ref()?;
    if let Some(group) = parse_group_conversation(conversation) {
        return Some(
            q.groups
                .iter()
                .filter(|(g, _)| *g == group)
                .map(|(_, from)| (conversation.clone(), *from))
                .collect(),
        );
    }
    Some(match parse_p2p_conversation(conversation) {
        Some((a, b)) if a == q.owner || b == q.owner => vec![(conversation.clone(), 0)],
        _ => Vec::new(),
    })
}

/// All the owner's conversations: the one-to-one ones (`p2p`) and the groups.
pub(crate) fn full_scope(q: &SearchQuery, p2p: Vec<String>) -> Scope {
    p2p.into_iter()
        .map(|c| (c, 0))
        .chain(
            q.groups
                .iter()
                .map(|(g, from)| (group_conversation(*g), *from)),
        )
        .collect()
}

/// The mid bound of a page: below `before`, or every mid.
fn before(q: &SearchQuery) -> i64 {
    q.before.map_or(i64::MAX, |b| b.min(MAX_ID) as i64)
}

/// The time range of a query, both ends included.
fn range(q: &SearchQuery) -> (i64, i64) {
    (q.from_ms.unwrap_or(i64::MIN), q.to_ms.unwrap_or(i64::MAX))
}

pub(crate) mod sqlite {
    //! SQLite: `search_text` rows with an external-content FTS5 index
    //! (`search_fts`, trigram tokenizer) kept in step by triggers. A batch
    //! only queues its new mids (`search_queue`, in its own transaction);
    //! the indexer turns them into rows behind the commit, so the write
    //! path pays one small insert per batch. The queue is durable, so a
    //! crash loses no indexing, only delays it.

    use std::sync::Arc;
    use std::time::Duration;

    use sqlx::{SqliteConnection, SqlitePool};
    use tokio::sync::Mutex;

    use super::*;
    use crate::sqlite::{json, message_from_row, WriteTx, MESSAGE_COLUMNS, USER_JOINS};

    /// How often the indexer drains the queue: a message is found within
    /// about this long (plus one drain) of its commit. Draining on a timer
    /// rather than after every batch keeps the indexer's own commits (each
    /// a sync to disk, and an FTS5 segment to merge later) few and large
    /// under load: at 2 s and 10,000 per transaction the one-to-one
    /// benchmark's ceiling is 6 % higher than at 0.5 s and 1,000
    /// (docs/benchmarks.md).
    pub(crate) const INDEX_EVERY: Duration = Duration::from_millis(2000);
    /// Queued messages indexed per transaction: the writer lock is held
    /// for one such transaction at a time, so batches wait at most that long.
    const INDEX_BATCH: i64 = 10_000;

    /// Queues the batch's new messages for the indexer.
    pub(crate) const QUEUE_SQL: &str =
        "INSERT OR IGNORE INTO search_queue (mid) SELECT k.value FROM json_each(?1) AS k";
    const ANY_QUEUED_SQL: &str = "SELECT EXISTS (SELECT 1 FROM search_queue)";
    /// The oldest queued mids with their message (gone: expired).
    const QUEUED_SQL: &str = "SELECT q.mid, m.conv_id, m.conv_seq, m.created_at, m.content \
         FROM (SELECT mid FROM search_queue ORDER BY mid LIMIT ?1) AS q \
         LEFT JOIN message m ON m.mid = q.mid AND m.revoked_at = 0";
    const INSERT_TEXTS_SQL: &str = "INSERT INTO search_text (mid, conv_id, conv_seq, created_at, body) \
         SELECT k.value->>0, k.value->>1, k.value->>2, k.value->>3, k.value->>4 FROM json_each(?1) AS k WHERE true \
         ON CONFLICT (mid) DO UPDATE SET body = excluded.body";
    const DEQUEUE_SQL: &str =
        "DELETE FROM search_queue WHERE mid IN (SELECT k.value FROM json_each(?1) AS k)";
    const FORGET_SQL: &str = "DELETE FROM search_text WHERE mid = ?1 AND conv_id = ?2";
    const UNQUEUE_SQL: &str = "DELETE FROM search_queue WHERE mid = ?1";
    const REWRITE_SQL: &str = "UPDATE search_text SET body = ?1 WHERE mid = ?2 AND conv_id = ?3";
    const EXPIRE_SQL: &str = "DELETE FROM search_text WHERE mid = ?1";
    /// The owner's one-to-one conversations.
    const P2P_SQL: &str = "SELECT conv_id FROM chat \
         WHERE owner = (SELECT id FROM users WHERE uid = ?1) AND peer != 0";

    /// Queues newly stored messages, in the batch's transaction.
    pub(crate) async fn queue(
        conn: &mut SqliteConnection,
        messages: &[StoredMessage],
    ) -> Result<(), sqlx::Error> {
        let mids: Vec<u64> = messages.iter().map(|m| m.mid).collect();
        if !mids.is_empty() {
            sqlx::query(QUEUE_SQL)
                .bind(json(&mids))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// A revoked message's text leaves the index at once, with its revoke
    /// (and its queue entry, should it not be indexed yet).
    pub(crate) async fn revoked(
        conn: &mut SqliteConnection,
        conversation: &str,
        target: u64,
    ) -> Result<(), sqlx::Error> {
        let mid = target.min(MAX_ID) as i64;
        sqlx::query(FORGET_SQL)
            .bind(mid)
            .bind(conversation)
            .execute(&mut *conn)
            .await?;
        sqlx::query(UNQUEUE_SQL)
            .bind(mid)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// An edited message is indexed by its new text at once, with its edit
    /// (the caller calls this only when the edit changed the message). One
    /// not indexed yet is still queued: the indexer reads the new content.
    pub(crate) async fn edited(
        conn: &mut SqliteConnection,
        conversation: &str,
        target: u64,
        content: &[u8],
    ) -> Result<(), sqlx::Error> {
        let mid = target.min(MAX_ID) as i64;
        match indexed_text(content) {
            Some(text) => {
                sqlx::query(REWRITE_SQL)
                    .bind(text)
                    .bind(mid)
                    .bind(conversation)
                    .execute(&mut *conn)
                    .await?;
            }
            None => {
                sqlx::query(FORGET_SQL)
                    .bind(mid)
                    .bind(conversation)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// An expired message's text goes with it.
    pub(crate) async fn expired(conn: &mut SqliteConnection, mid: i64) -> Result<(), sqlx::Error> {
        sqlx::query(EXPIRE_SQL)
            .bind(mid)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// Indexes up to [`INDEX_BATCH`] queued messages in one transaction,
    /// under the store's writer lock (SQLite has one writer); returns how
    /// many queue entries it took.
    async fn index_some<T>(pool: &SqlitePool, writer: &Mutex<T>) -> Result<usize, sqlx::Error> {
        // A read first: an idle store's indexer never takes the writer lock.
        let queued: bool = sqlx::query_scalar(ANY_QUEUED_SQL).fetch_one(pool).await?;
        if !queued {
            return Ok(0);
        }
        let _writer = writer.lock().await;
        if pool.is_closed() {
            return Ok(0);
        }
        let mut tx = WriteTx::begin(pool).await?;
        type Queued = (
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            Option<Vec<u8>>,
        );
        let queued: Vec<Queued> = sqlx::query_as(QUEUED_SQL)
            .bind(INDEX_BATCH)
            .fetch_all(&mut *tx)
            .await?;
        if queued.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let mids: Vec<i64> = queued.iter().map(|q| q.0).collect();
        // Expired and revoked messages, and those without text, leave only
        // the queue.
        let rows: Vec<(i64, String, i64, i64, String)> = queued
            .into_iter()
            .filter_map(|(mid, conv, seq, at, content)| {
                Some((mid, conv?, seq?, at?, indexed_text(&content?)?))
            })
            .collect();
        if !rows.is_empty() {
            sqlx::query(INSERT_TEXTS_SQL)
                .bind(json(&rows))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(DEQUEUE_SQL)
            .bind(json(&mids))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(mids.len())
    }

    /// Indexes everything queued, a transaction at a time.
    pub(crate) async fn index_all<T>(
        pool: &SqlitePool,
        writer: &Mutex<T>,
    ) -> Result<(), sqlx::Error> {
        while index_some(pool, writer).await? > 0 {}
        Ok(())
    }

    /// The background indexer of a store: drains the queue every
    /// [`INDEX_EVERY`] until the pool closes (the store's `close`).
    pub(crate) fn spawn_indexer<T: Send + 'static>(
        pool: SqlitePool,
        writer: Arc<Mutex<T>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + INDEX_EVERY, INDEX_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if pool.is_closed() {
                    return;
                }
                if let Err(e) = index_all(&pool, &writer).await {
                    if pool.is_closed() {
                        return;
                    }
                    // The queue keeps what was not indexed: the next tick
                    // tries again.
                    tracing::warn!(error = %e, "search indexing failed");
                }
            }
        })
    }

    /// Queries of fewer characters than this cannot use the trigram index.
    const TRIGRAM: usize = 3;

    /// Three characters or more: the trigram index finds the candidates,
    /// newest first (FTS5 walks its rowids, the mids, backwards from the
    /// page's bound), and each is kept if it is in the owner's scope: a
    /// conversation of ?5 from its first position on.
    fn indexed_sql() -> String {
        format!(
            "SELECT {MESSAGE_COLUMNS} FROM search_fts f JOIN search_text s ON s.mid = f.rowid \
             JOIN message m ON m.mid = s.mid {USER_JOINS} \
             WHERE search_fts MATCH ?1 AND f.rowid < ?2 AND s.created_at >= ?3 AND s.created_at <= ?4 \
               AND s.conv_id IN (SELECT k.value->>0 FROM json_each(?5) AS k) \
               AND s.conv_seq >= (SELECT k.value->>1 FROM json_each(?5) AS k WHERE k.value->>0 = s.conv_id) \
               AND m.revoked_at = 0 \
             ORDER BY f.rowid DESC LIMIT ?6"
        )
    }

    /// One or two characters (the common case in Chinese), which trigrams
    /// cannot find: a substring scan of the texts of the owner's own
    /// conversations, each read through the `search_text_conv` index from
    /// its first position on. Its cost is bounded by the owner's own
    /// messages, never the whole table.
    fn scan_sql() -> String {
        format!(
            "SELECT {MESSAGE_COLUMNS} FROM json_each(?5) AS k \
             JOIN search_text s ON s.conv_id = k.value->>0 AND s.conv_seq >= k.value->>1 AND s.mid < ?2 \
             JOIN message m ON m.mid = s.mid {USER_JOINS} \
             WHERE instr(s.body, ?1) > 0 AND s.created_at >= ?3 AND s.created_at <= ?4 \
               AND m.revoked_at = 0 \
             ORDER BY s.mid DESC LIMIT ?6"
        )
    }

    /// A page of [`MessageStore::search`].
    pub(crate) async fn search(
        pool: &SqlitePool,
        q: &SearchQuery,
    ) -> Result<Page<StoredMessage>, sqlx::Error> {
        let scope = match named_scope(q) {
            Some(scope) => scope,
            None => {
                let p2p: Vec<String> = sqlx::query_scalar(P2P_SQL)
                    .bind(q.owner.as_str())
                    .fetch_all(pool)
                    .await?;
                full_scope(q, p2p)
            }
        };
        if scope.is_empty() || q.limit.count == 0 {
            return Ok(Page {
                items: Vec::new(),
                more: false,
            });
        }
        let text = fold(&q.text);
        let (sql, pattern) = if text.chars().count() < TRIGRAM {
            (scan_sql(), text)
        } else {
            // One FTS5 phrase: the query's trigrams in order, i.e. the
            // substring (quotes doubled inside a string).
            (indexed_sql(), format!("\"{}\"", text.replace('"', "\"\"")))
        };
        let (from, to) = range(q);
        let rows = sqlx::query(&sql)
            .bind(pattern)
            .bind(before(q))
            .bind(from)
            .bind(to)
            .bind(json(&scope))
            .bind(i64::from(q.limit.count))
            .fetch(pool);
        Page::collect(rows, q.limit, message_from_row, StoredMessage::page_bytes).await
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The plans of the search statements: the indexed one walks the
        /// FTS index, the scan walks `search_text` by conversation, and
        /// neither scans a table.
        #[tokio::test]
        async fn search_statements_use_their_indexes() {
            let store = crate::sqlite::SqliteStore::memory().await.expect("store");
            for sql in [indexed_sql(), scan_sql()] {
                let plan: Vec<(i64, i64, i64, String)> =
                    sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .fetch_all(store.pool())
                        .await
                        .expect("plan");
                for (_, _, _, step) in &plan {
                    let table_scan = step.starts_with("SCAN")
                        && !step.contains("json_each")
                        && !step.starts_with("SCAN k")
                        && !step.contains("VIRTUAL TABLE");
                    assert!(!table_scan, "{sql}\nscans a table: {plan:?}");
                }
            }
        }
    }
}

pub(crate) mod mysql {
    //! MySQL/MariaDB. MySQL's FULLTEXT `WITH PARSER ngram` is missing from
    //! MariaDB, so the store makes the n-grams itself: `search_text.grams`
    //! holds each distinct character bigram of the text as a word of its
    //! own, and a FULLTEXT index (the built-in parser) over it finds the
    //! messages holding every bigram of a query; `INSTR` on the text then
    //! keeps those that hold the query itself. The same on MySQL. Rows are
    //! written in the batch transaction: a message is found once its
    //! batch commits.

    use sqlx::{MySql, MySqlConnection, MySqlPool, QueryBuilder};

    use super::*;
    use crate::batch::{Effect, MESSAGE_COLUMNS};
    use crate::mysql::message_from_row;

    /// The bigrams of a folded text as FULLTEXT words: `g` and the hex of
    /// the two characters' UTF-8, which the built-in parser keeps as one
    /// word whatever the script (at least five characters: above the
    /// smallest word size, and no stopword), distinct, space-separated.
    pub(crate) fn grams(text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut words: Vec<String> = chars
            .windows(2)
            .map(|pair| {
                let mut word = String::from("g");
                let mut buf = [0u8; 4];
                for c in pair {
                    for b in c.encode_utf8(&mut buf).bytes() {
                        word.push_str(&format!("{b:02x}"));
                    }
                }
                word
            })
            .collect();
        words.sort_unstable();
        words.dedup();
        words.join(" ")
    }

    /// Indexes newly stored messages, in the batch's transaction.
    pub(crate) async fn index(
        conn: &mut MySqlConnection,
        messages: &[StoredMessage],
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<(&StoredMessage, String)> = messages
            .iter()
            .filter_map(|m| Some((m, indexed_text(&m.content)?)))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO search_text (mid, conv_id, conv_seq, created_at, body, grams) ",
        );
        q.push_values(&rows, |mut b, (m, text)| {
            b.push_bind(m.mid.min(MAX_ID) as i64)
                .push_bind(m.conversation.as_str())
                .push_bind(m.conv_seq.min(MAX_ID) as i64)
                .push_bind(m.time_ms)
                .push_bind(text.as_str())
                .push_bind(grams(text));
        });
        q.build().execute(&mut *conn).await?;
        Ok(())
    }

    /// A revoke takes its message's text out of the index, and an edit
    /// replaces it (only an edit of a text message changes it), in the
    /// batch's transaction.
    pub(crate) async fn apply_effects(
        conn: &mut MySqlConnection,
        effects: &[Effect],
    ) -> Result<(), sqlx::Error> {
        for effect in effects {
            match effect {
                Effect::Revoke {
                    conversation,
                    target,
                    ..
                } => {
                    sqlx::query("DELETE FROM search_text WHERE mid = ? AND conv_id = ?")
                        .bind((*target).min(MAX_ID) as i64)
                        .bind(conversation.as_str())
                        .execute(&mut *conn)
                        .await?;
                }
                Effect::Edit {
                    conversation,
                    target,
                    content,
                    ..
                } => {
                    let text = indexed_text(content).unwrap_or_default();
                    sqlx::query(
                        "UPDATE search_text s JOIN message m ON m.mid = s.mid \
                         SET s.body = ?, s.grams = ? \
                         WHERE s.mid = ? AND s.conv_id = ? AND m.msg_type = 1",
                    )
                    .bind(text.as_str())
                    .bind(grams(&text))
                    .bind((*target).min(MAX_ID) as i64)
                    .bind(conversation.as_str())
                    .execute(&mut *conn)
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// An expired message's text goes with it.
    pub(crate) async fn expired(conn: &mut MySqlConnection, mid: i64) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM search_text WHERE mid = ?")
            .bind(mid)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    /// A page of [`MessageStore::search`]. A one-character query has no
    /// bigram: it scans the texts of the owner's own conversations
    /// (through the `(conv_id, mid)` index), as SQLite does below three.
    pub(crate) async fn search(
        pool: &MySqlPool,
        q: &SearchQuery,
    ) -> Result<Page<StoredMessage>, sqlx::Error> {
        let scope = match named_scope(q) {
            Some(scope) => scope,
            None => {
                // The owner's one-to-one partners, from a walk of the
                // owner's `relation_history` index prefix.
                let others: Vec<Vec<u8>> =
                    sqlx::query_scalar("SELECT DISTINCT other FROM relation WHERE owner = ?")
                        .bind(q.owner.as_str())
                        .fetch_all(pool)
                        .await?;
                let mut p2p = Vec::with_capacity(others.len());
                for other in others {
                    let other =
                        String::from_utf8(other).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    p2p.push(p2p_conversation(&q.owner, &user_id(other)?));
                }
                full_scope(q, p2p)
            }
        };
        if scope.is_empty() || q.limit.count == 0 {
            return Ok(Page {
                items: Vec::new(),
                more: false,
            });
        }
        let text = fold(&q.text);
        let (from, to) = range(q);
        let mut b = QueryBuilder::<MySql>::new(format!(
            "SELECT {MESSAGE_COLUMNS} FROM search_text s JOIN message m ON m.mid = s.mid WHERE ("
        ));
        for (i, (conversation, first)) in scope.iter().enumerate() {
            if i > 0 {
                b.push(" OR ");
            }
            b.push("(s.conv_id = ")
                .push_bind(conversation.as_str())
                .push(" AND s.conv_seq >= ")
                .push_bind((*first).min(MAX_ID) as i64)
                .push(")");
        }
        b.push(") AND s.mid < ")
            .push_bind(before(q))
            .push(" AND s.created_at >= ")
            .push_bind(from)
            .push(" AND s.created_at <= ")
            .push_bind(to);
        if text.chars().count() >= 2 {
            let all: String = grams(&text).split(' ').map(|g| format!("+{g} ")).collect();
            b.push(" AND MATCH (s.grams) AGAINST (")
                .push_bind(all)
                .push(" IN BOOLEAN MODE)");
        }
        b.push(" AND INSTR(s.body, ")
            .push_bind(text)
            .push(") > 0 ORDER BY s.mid DESC LIMIT ")
            .push_bind(i64::from(q.limit.count));
        let rows = b.build().fetch(pool);
        Page::collect(rows, q.limit, message_from_row, StoredMessage::page_bytes).await
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn bigrams_are_distinct_hex_words() {
            assert_eq!(grams("abab"), "g6162 g6261");
            assert_eq!(grams("天气"), "ge5a4a9e6b094");
            assert_eq!(grams("a"), "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_proto::msg::{
        Audio, Card, Edit, File, Forward, ForwardItem, Location, Notice, Revoke,
    };

    fn body(content: Content) -> MessageBody {
        MessageBody {
            content: Some(content),
        }
    }

    #[test]
    fn searchable_text_takes_the_words_of_each_body() {
        assert_eq!(
            searchable_text(&MessageBody::text("今天天气很好")).as_deref(),
            Some("今天天气很好")
        );
        let notice = body(Content::Notice(Notice {
            title: "Maintenance".into(),
            text: "Tonight".into(),
        }));
        assert_eq!(
            searchable_text(&notice).as_deref(),
            Some("Maintenance\nTonight")
        );
        let file = body(Content::File(File {
            name: "report.pdf".into(),
            url: "https://files/x".into(),
            ..Default::default()
        }));
        assert_eq!(searchable_text(&file).as_deref(), Some("report.pdf"));
        let location = body(Content::Location(Location {
            title: "Office".into(),
            address: "1 Main St".into(),
            ..Default::default()
        }));
        assert_eq!(
            searchable_text(&location).as_deref(),
            Some("Office\n1 Main St")
        );
        let card = body(Content::Card(Card {
            name: "Alice".into(),
            id: "alice".into(),
            ..Default::default()
        }));
        assert_eq!(searchable_text(&card).as_deref(), Some("Alice"));
        let forward = body(Content::Forward(Forward {
            title: "Chat history".into(),
            items: vec![
                ForwardItem {
                    summary: "first".into(),
                    ..Default::default()
                },
                ForwardItem {
                    summary: "second".into(),
                    ..Default::default()
                },
            ],
        }));
        assert_eq!(
            searchable_text(&forward).as_deref(),
            Some("Chat history\nfirst\nsecond")
        );
        for none in [
            body(Content::Audio(Audio {
                url: "https://a".into(),
                ..Default::default()
            })),
            body(Content::Revoke(Revoke { mid: 1 })),
            body(Content::Edit(Edit { mid: 1, text: None })),
            MessageBody::text(""),
            MessageBody { content: None },
        ] {
            assert_eq!(searchable_text(&none), None, "{none:?}");
        }
        assert_eq!(
            indexed_text(&MessageBody::text("Hello World").encode_to_vec()).as_deref(),
            Some("hello world")
        );
    }

    #[test]
    fn queries_are_checked() {
        assert!(check_query("天").is_ok());
        assert!(check_query("").is_err());
        assert!(check_query("   ").is_err());
        assert!(check_query(&"字".repeat(200)).is_ok());
        assert!(check_query(&"字".repeat(201)).is_err());
    }
}
