//! The SQLite implementation of [`GroupStore`], for the embedded shape: its
//! own database file beside the message store's, in WAL mode.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use natter_proto::UserId;
use natter_record::sqlite::{probe_write, HealthCheck, WriteHealth, WriteTx};

use crate::store::*;

/// The migrations, in order. Applied ones are never edited: a database
/// that ran one keeps its checksum.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "groups",
        include_str!("../migrations/sqlite/0001_groups.sql"),
    ),
    (
        2,
        "read cursors",
        include_str!("../migrations/sqlite/0002_read.sql"),
    ),
    (
        3,
        "group versions",
        include_str!("../migrations/sqlite/0003_version.sql"),
    ),
    (
        4,
        "health",
        include_str!("../migrations/sqlite/0004_health.sql"),
    ),
    (
        5,
        "string user ids",
        include_str!("../migrations/sqlite/0005_string_user_ids.sql"),
    ),
];

/// The group store has a database file of its own (`groups.db`), so its
/// migration numbers are its own: they never meet the message store's.
fn migrator() -> Migrator {
    natter_record::migrations::migrator(MIGRATIONS, false)
}

fn group_from(row: &SqliteRow) -> Result<GroupRecord, GroupStoreError> {
    Ok(GroupRecord {
        id: row.try_get::<i64, _>("gid")? as u64,
        name: row.try_get("name")?,
        avatar: row.try_get("avatar")?,
        owner: user_from(row.try_get("owner")?)?,
        join_type: join_type_from(row.try_get("join_type")?)?,
        mute_all: row.try_get("mute_all")?,
        dissolved: row.try_get("dissolved")?,
        created_ms: row.try_get("created_at")?,
        version: row.try_get::<i64, _>("version")? as u64,
    })
}

fn member_from(row: &SqliteRow) -> Result<MemberRecord, GroupStoreError> {
    Ok(MemberRecord {
        uid: user_from(row.try_get("uid")?)?,
        role: role_from(row.try_get("role")?)?,
        nickname: row.try_get("nickname")?,
        joined_ms: row.try_get("joined_at")?,
        join_seq: row.try_get::<i64, _>("join_seq")? as u64,
        muted_until_ms: row.try_get("muted_until")?,
    })
}

pub struct SqliteGroupStore {
    pool: SqlitePool,
    /// Whether writes fail (see `ping`).
    health: WriteHealth,
}

impl SqliteGroupStore {
    /// Opens (creating if needed) the database file and runs the migrations.
    pub async fn open(path: &Path, synchronous: bool) -> Result<SqliteGroupStore, GroupStoreError> {
        // Private to the server's user, like the messages (0600).
        natter_node::private::prepare_private_file(path).map_err(sqlx::Error::Io)?;
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if synchronous {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(connect)
            .await?;
        migrator().run(&pool).await?;
        Ok(SqliteGroupStore {
            pool,
            health: WriteHealth::default(),
        })
    }

    /// An in-memory database, for tests.
    pub async fn memory() -> Result<SqliteGroupStore, GroupStoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::from_str("sqlite::memory:")?)
            .await?;
        migrator().run(&pool).await?;
        Ok(SqliteGroupStore {
            pool,
            health: WriteHealth::default(),
        })
    }
}

fn id(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

const PUT_MEMBER_SQL: &str = "INSERT INTO member (gid, uid, role, nickname, joined_at, join_seq, muted_until) \
     VALUES (?, ?, ?, ?, ?, ?, ?) \
     ON CONFLICT (gid, uid) DO UPDATE SET role = excluded.role, nickname = excluded.nickname, \
     joined_at = excluded.joined_at, join_seq = excluded.join_seq, muted_until = excluded.muted_until";

async fn put_member(
    conn: &mut sqlx::SqliteConnection,
    gid: u64,
    m: &MemberRecord,
) -> Result<(), sqlx::Error> {
    sqlx::query(PUT_MEMBER_SQL)
        .bind(id(gid))
        .bind(m.uid.as_str())
        .bind(m.role.as_str())
        .bind(&m.nickname)
        .bind(m.joined_ms)
        .bind(id(m.join_seq))
        .bind(m.muted_until_ms)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl SqliteGroupStore {
    async fn try_create(
        &self,
        group: &GroupRecord,
        members: &[MemberRecord],
    ) -> Result<u64, GroupStoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        let gid: i64 = sqlx::query_scalar(
            "INSERT INTO grp (name, avatar, owner, join_type, mute_all, dissolved, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING gid",
        )
        .bind(&group.name)
        .bind(&group.avatar)
        .bind(group.owner.as_str())
        .bind(group.join_type.as_str())
        .bind(group.mute_all)
        .bind(group.dissolved)
        .bind(group.created_ms)
        .fetch_one(&mut *tx)
        .await?;
        for m in members {
            put_member(&mut tx, gid as u64, m).await?;
        }
        tx.commit().await?;
        Ok(gid as u64)
    }

    async fn try_write(
        &self,
        gid: u64,
        version: u64,
        changes: &[Change],
    ) -> Result<bool, GroupStoreError> {
        let mut tx = WriteTx::begin(&self.pool).await?;
        let bumped =
            sqlx::query("UPDATE grp SET version = version + 1 WHERE gid = ? AND version = ?")
                .bind(id(gid))
                .bind(id(version))
                .execute(&mut *tx)
                .await?;
        if bumped.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for change in changes {
            match change {
                Change::PutMember(m) => put_member(&mut tx, gid, m).await?,
                Change::RemoveMember(uid) => {
                    sqlx::query("DELETE FROM member WHERE gid = ? AND uid = ?")
                        .bind(id(gid))
                        .bind(uid.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Change::PutGroup(g) => {
                    sqlx::query(
                        "UPDATE grp SET name = ?, avatar = ?, owner = ?, join_type = ?, \
                         mute_all = ?, dissolved = ? WHERE gid = ?",
                    )
                    .bind(&g.name)
                    .bind(&g.avatar)
                    .bind(g.owner.as_str())
                    .bind(g.join_type.as_str())
                    .bind(g.mute_all)
                    .bind(g.dissolved)
                    .bind(id(gid))
                    .execute(&mut *tx)
                    .await?;
                }
                Change::PutApplication(a) => {
                    sqlx::query(
                        "INSERT INTO application (gid, uid, message, created_at) VALUES (?, ?, ?, ?) \
                         ON CONFLICT (gid, uid) DO UPDATE SET message = excluded.message, created_at = excluded.created_at",
                    )
                    .bind(id(gid))
                    .bind(a.uid.as_str())
                    .bind(&a.message)
                    .bind(a.time_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::RemoveApplication(uid) => {
                    sqlx::query("DELETE FROM application WHERE gid = ? AND uid = ?")
                        .bind(id(gid))
                        .bind(uid.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl GroupStore for SqliteGroupStore {
    async fn create(
        &self,
        group: &GroupRecord,
        members: &[MemberRecord],
    ) -> Result<u64, GroupStoreError> {
        let created = self.try_create(group, members).await;
        self.health.wrote(created.is_ok());
        created
    }

    async fn write(
        &self,
        gid: u64,
        version: u64,
        changes: &[Change],
    ) -> Result<bool, GroupStoreError> {
        let written = self.try_write(gid, version, changes).await;
        self.health.wrote(written.is_ok());
        written
    }

    async fn group(&self, gid: u64) -> Result<Option<GroupRecord>, GroupStoreError> {
        let row = sqlx::query("SELECT * FROM grp WHERE gid = ?")
            .bind(id(gid))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(group_from).transpose()
    }

    async fn version(&self, gid: u64) -> Result<Option<u64>, GroupStoreError> {
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM grp WHERE gid = ?")
            .bind(id(gid))
            .fetch_optional(&self.pool)
            .await?;
        Ok(version.map(|v| v as u64))
    }

    async fn members(&self, gid: u64) -> Result<Vec<MemberRecord>, GroupStoreError> {
        let rows = sqlx::query("SELECT * FROM member WHERE gid = ? ORDER BY uid")
            .bind(id(gid))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(member_from).collect()
    }

    async fn owned_count(&self, uid: &UserId) -> Result<u64, GroupStoreError> {
        let count: i64 = sqlx::query_scalar(OWNED_COUNT_SQL)
            .bind(uid.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(count as u64)
    }

    async fn groups_of(&self, uid: &UserId) -> Result<Vec<(u64, u64)>, GroupStoreError> {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT gid, join_seq FROM member WHERE uid = ? ORDER BY gid")
                .bind(uid.as_str())
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(g, s)| (g as u64, s as u64))
            .collect())
    }

    async fn applications(&self, gid: u64) -> Result<Vec<ApplicationRecord>, GroupStoreError> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT uid, message, created_at FROM application WHERE gid = ? ORDER BY created_at, uid",
        )
        .bind(id(gid))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(uid, message, time_ms)| {
                Ok(ApplicationRecord {
                    uid: user_from(&uid)?,
                    message,
                    time_ms,
                })
            })
            .collect()
    }

    async fn mark_read(&self, gid: u64, uid: &UserId, seq: u64) -> Result<u64, GroupStoreError> {
        let read: Option<i64> = sqlx::query_scalar(
            "UPDATE member SET read_seq = MAX(read_seq, ?) WHERE gid = ? AND uid = ? RETURNING read_seq",
        )
        .bind(id(seq))
        .bind(id(gid))
        .bind(uid.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(read.unwrap_or(0) as u64)
    }

    async fn legacy_reads(&self, limit: u32) -> Result<Vec<(u64, UserId, u64)>, GroupStoreError> {
        let rows: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT gid, uid, read_seq FROM member WHERE read_seq > 0 LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        let mut reads = Vec::with_capacity(rows.len());
        for (gid, uid, seq) in rows {
            reads.push((gid as u64, user_from(&uid)?, seq as u64));
        }
        Ok(reads)
    }

    async fn clear_legacy_reads(&self, reads: &[(u64, UserId)]) -> Result<(), GroupStoreError> {
        for (gid, uid) in reads {
            sqlx::query("UPDATE member SET read_seq = 0 WHERE gid = ? AND uid = ?")
                .bind(id(*gid))
                .bind(uid.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    async fn read_seq(&self, gid: u64, uid: &UserId) -> Result<u64, GroupStoreError> {
        let read: Option<i64> =
            sqlx::query_scalar("SELECT read_seq FROM member WHERE gid = ? AND uid = ?")
                .bind(id(gid))
                .bind(uid.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(read.unwrap_or(0) as u64)
    }

    /// Down while writes fail, as the message store's: a failed write makes
    /// the store not ready at once, and after a moment each ping tries a
    /// write of its own until one succeeds.
    async fn ping(&self) -> Result<(), GroupStoreError> {
        match self.health.check() {
            HealthCheck::Read => {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
            HealthCheck::Down => Err(GroupStoreError::Unwritable),
            HealthCheck::Probe => {
                let probed = probe_write(&self.pool).await;
                self.health.wrote(probed.is_ok());
                probed.map_err(|e| {
                    tracing::warn!(error = %e, "the group store still cannot write");
                    GroupStoreError::Unwritable
                })
            }
        }
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::{member, uid};
    use natter_proto::api::{JoinType, Role};

    #[tokio::test]
    async fn sqlite_passes_the_group_store_suite() {
        let store = SqliteGroupStore::memory().await.expect("store");
        crate::suite::run_all(&store).await;
    }

    fn record(name: String) -> GroupRecord {
        GroupRecord {
            id: 0,
            name,
            avatar: String::new(),
            owner: uid("u1"),
            join_type: JoinType::Open,
            mute_all: false,
            dissolved: false,
            created_ms: 1,
            version: 0,
        }
    }

    /// A full database (deterministic with `max_page_count` on a store of
    /// one connection): SQLite rolls back the whole transaction by itself,
    /// and once there is room again the store writes without a restart.
    #[tokio::test]
    async fn writing_resumes_after_the_database_was_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let connect = SqliteConnectOptions::new()
            .filename(dir.path().join("groups.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect)
            .await
            .expect("pool");
        migrator().run(&pool).await.expect("migrated");
        let store = SqliteGroupStore {
            pool,
            health: WriteHealth::default(),
        };
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.pool)
            .await
            .expect("page count");
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 1))
            .execute(&store.pool)
            .await
            .expect("limit");
        let mut full = None;
        for n in 0..100 {
            let name = format!("{n}{}", "x".repeat(2000));
            if let Err(e) = store
                .create(&record(name), &[member("u1", Role::Owner)])
                .await
            {
                full = Some(e);
                break;
            }
        }
        let full = full.expect("the database filled up");
        assert!(full.to_string().contains("full"), "{full}");
        assert!(
            matches!(store.ping().await, Err(GroupStoreError::Unwritable)),
            "a store whose last write failed is not ready"
        );
        sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(&store.pool)
            .await
            .expect("lift");
        let gid = store
            .create(&record("after".into()), &[member("u1", Role::Owner)])
            .await
            .expect("writes resume once there is room");
        assert_eq!(
            store.group(gid).await.expect("read").map(|g| g.name),
            Some("after".to_string())
        );
        store.ping().await.expect("ready again");
    }

    /// A database from before string user ids (integer uid columns) keeps
    /// every group, member and application through migration 5, each uid
    /// now the decimal string of the old number; the autoincrement counter
    /// and the index by user come through too.
    #[tokio::test]
    async fn integer_user_ids_migrate_to_their_decimal_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("groups.db");
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(&path)
                    .create_if_missing(true),
            )
            .await
            .expect("pool");
        natter_record::migrations::migrator(&MIGRATIONS[..4], false)
            .run(&pool)
            .await
            .expect("the migrations before string user ids");
        for statement in [
            "INSERT INTO grp (name, avatar, owner, join_type, created_at, version) \
             VALUES ('kept', 'a.png', 1234567890123, 'approval', 10, 7)",
            "INSERT INTO grp (name, avatar, owner, join_type, created_at) VALUES ('second', '', 2, 'open', 11)",
            "INSERT INTO grp (name, avatar, owner, join_type, created_at) VALUES ('deleted', '', 2, 'open', 12)",
            // The newest group's row is gone; its id must still not come back.
            "DELETE FROM grp WHERE gid = 3",
            "INSERT INTO member (gid, uid, role, nickname, joined_at, join_seq, muted_until, read_seq) \
             VALUES (1, 1234567890123, 'owner', 'boss', 20, 1, 0, 4)",
            "INSERT INTO member (gid, uid, role, nickname, joined_at, join_seq, muted_until, read_seq) \
             VALUES (1, 2, 'member', '', 21, 3, 99, 0)",
            "INSERT INTO member (gid, uid, role, joined_at, join_seq) VALUES (2, 2, 'owner', 22, 1)",
            "INSERT INTO application (gid, uid, message, created_at) VALUES (1, 42, 'let me in', 30)",
        ] {
            sqlx::query(statement)
                .execute(&pool)
                .await
                .expect(statement);
        }
        pool.close().await;

        let store = SqliteGroupStore::open(&path, false)
            .await
            .expect("migrated");
        let group = store.group(1).await.expect("read").expect("kept");
        assert_eq!(
            (group.name.as_str(), group.owner.as_str(), group.version),
            ("kept", "1234567890123", 7)
        );
        let members = store.members(1).await.expect("members");
        assert_eq!(
            members,
            vec![
                MemberRecord {
                    uid: uid("1234567890123"),
                    role: Role::Owner,
                    nickname: "boss".into(),
                    joined_ms: 20,
                    join_seq: 1,
                    muted_until_ms: 0,
                },
                MemberRecord {
                    uid: uid("2"),
                    role: Role::Member,
                    nickname: String::new(),
                    joined_ms: 21,
                    join_seq: 3,
                    muted_until_ms: 99,
                },
            ]
        );
        assert_eq!(
            store
                .read_seq(1, &uid("1234567890123"))
                .await
                .expect("read"),
            4
        );
        assert_eq!(
            store.groups_of(&uid("2")).await.expect("mine"),
            vec![(1, 3), (2, 1)]
        );
        assert_eq!(store.owned_count(&uid("2")).await.expect("owned"), 1);
        assert_eq!(
            store
                .owned_count(&uid("1234567890123"))
                .await
                .expect("owned"),
            1
        );
        let applications = store.applications(1).await.expect("apps");
        assert_eq!(
            applications,
            vec![ApplicationRecord {
                uid: uid("42"),
                message: "let me in".into(),
                time_ms: 30,
            }]
        );
        // Every uid is stored as text, so a bound string finds it (and an
        // update replaces the row rather than adding a second one).
        let not_text: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM member WHERE typeof(uid) <> 'text') \
                  + (SELECT COUNT(*) FROM application WHERE typeof(uid) <> 'text') \
                  + (SELECT COUNT(*) FROM grp WHERE typeof(owner) <> 'text')",
        )
        .fetch_one(&store.pool)
        .await
        .expect("count");
        assert_eq!(not_text, 0);
        let mut renamed = members[1].clone();
        renamed.nickname = "two".into();
        assert!(store
            .write(1, 7, &[Change::PutMember(renamed)])
            .await
            .expect("write"));
        assert_eq!(store.members(1).await.expect("members").len(), 2);
        // "My groups" still reads the index by user.
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "EXPLAIN QUERY PLAN SELECT gid, join_seq FROM member WHERE uid = ? ORDER BY gid",
        )
        .bind("2")
        .fetch_all(&store.pool)
        .await
        .expect("plan");
        assert!(
            plan.iter()
                .any(|(_, _, _, detail)| detail.contains("member_by_user")),
            "{plan:?}"
        );
        // Group ids are still never reused.
        let gid = store
            .create(&record("new".into()), &[member("u1", Role::Owner)])
            .await
            .expect("create");
        assert_eq!(gid, 4);
        store.close().await;
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("groups.db");
        let store = SqliteGroupStore::open(&path, true).await.expect("open");
        let gid = store
            .create(&record("kept".into()), &[member("u1", Role::Owner)])
            .await
            .expect("create");
        store.close().await;
        let store = SqliteGroupStore::open(&path, true).await.expect("reopen");
        assert_eq!(
            store.group(gid).await.expect("read").map(|g| g.name),
            Some("kept".to_string())
        );
        store.close().await;
    }
}
