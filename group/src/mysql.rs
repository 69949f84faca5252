//! The MySQL / MariaDB implementation of [`GroupStore`], for the
//! distributed shape. It shares its database with the message store; its
//! migrations are numbered from 1001 so the two sets never collide.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions, MySqlRow};
use sqlx::{MySqlConnection, MySqlPool, Row};

use natter_proto::UserId;

use crate::store::*;

/// The migrations, in order. Applied ones are never edited: a database
/// that ran one keeps its checksum.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1001,
        "groups",
        include_str!("../migrations/mysql/1001_groups.sql"),
    ),
    (
        1002,
        "member user ids",
        include_str!("../migrations/mysql/1002_member_user_ids.sql"),
    ),
    (
        1003,
        "application user ids",
        include_str!("../migrations/mysql/1003_application_user_ids.sql"),
    ),
    (
        1004,
        "owner user ids",
        include_str!("../migrations/mysql/1004_owner_user_ids.sql"),
    ),
];

fn migrator() -> Migrator {
    natter_record::migrations::migrator(
        MIGRATIONS, // The message store's migrations live in the same database.
        true,
    )
}

fn id(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn group_from(row: &MySqlRow) -> Result<GroupRecord, GroupStoreError> {
    Ok(GroupRecord {
        id: row.try_get::<i64, _>("gid")? as u64,
        name: row.try_get("name")?,
        avatar: row.try_get("avatar")?,
        owner: user_from_bytes(row.try_get("owner")?)?,
        join_type: join_type_from(row.try_get("join_type")?)?,
        mute_all: row.try_get::<i8, _>("mute_all")? != 0,
        dissolved: row.try_get::<i8, _>("dissolved")? != 0,
        created_ms: row.try_get("created_at")?,
        version: row.try_get::<i64, _>("version")? as u64,
    })
}

fn member_from(row: &MySqlRow) -> Result<MemberRecord, GroupStoreError> {
    Ok(MemberRecord {
        uid: user_from_bytes(row.try_get("uid")?)?,
        role: role_from(row.try_get("role")?)?,
        nickname: row.try_get("nickname")?,
        joined_ms: row.try_get("joined_at")?,
        join_seq: row.try_get::<i64, _>("join_seq")? as u64,
        muted_until_ms: row.try_get("muted_until")?,
    })
}

pub struct MySqlGroupStore {
    pool: MySqlPool,
}

impl MySqlGroupStore {
    /// Connects to `url` and runs the migrations.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<MySqlGroupStore, GroupStoreError> {
        let connect: MySqlConnectOptions = url.parse()?;
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(connect)
            .await?;
        natter_record::mysql::migrate_exclusively(&pool, &migrator())
            .await
            .map_err(|e| match e {
                natter_record::StoreError::Database(e) => GroupStoreError::Database(e),
                natter_record::StoreError::Migrate(e) => GroupStoreError::Migrate(e),
                other => GroupStoreError::Corrupt(other.to_string()),
            })?;
        Ok(MySqlGroupStore { pool })
    }
}

async fn put_member(
    conn: &mut MySqlConnection,
    gid: u64,
    m: &MemberRecord,
) -> Result<(), sqlx::Error> {
    // The read cursor is not part of a member update: it is kept.
    sqlx::query(
        "INSERT INTO member (gid, uid, role, nickname, joined_at, join_seq, muted_until) VALUES (?, ?, ?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE role = VALUES(role), nickname = VALUES(nickname), joined_at = VALUES(joined_at), \
         join_seq = VALUES(join_seq), muted_until = VALUES(muted_until)",
    )
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

#[async_trait]
impl GroupStore for MySqlGroupStore {
    async fn create(
        &self,
        group: &GroupRecord,
        members: &[MemberRecord],
    ) -> Result<u64, GroupStoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "INSERT INTO grp (name, avatar, owner, join_type, mute_all, dissolved, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&group.name)
        .bind(&group.avatar)
        .bind(group.owner.as_str())
        .bind(group.join_type.as_str())
        .bind(group.mute_all)
        .bind(group.dissolved)
        .bind(group.created_ms)
        .execute(&mut *tx)
        .await?;
        let gid = done.last_insert_id();
        for m in members {
            put_member(&mut tx, gid, m).await?;
        }
        tx.commit().await?;
        Ok(gid)
    }

    async fn write(
        &self,
        gid: u64,
        version: u64,
        changes: &[Change],
    ) -> Result<bool, GroupStoreError> {
        let mut tx = self.pool.begin().await?;
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
                        "UPDATE grp SET name = ?, avatar = ?, owner = ?, join_type = ?, mute_all = ?, dissolved = ? WHERE gid = ?",
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
                         ON DUPLICATE KEY UPDATE message = VALUES(message), created_at = VALUES(created_at)",
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
        let rows: Vec<(Vec<u8>, String, i64)> = sqlx::query_as(
            "SELECT uid, message, created_at FROM application WHERE gid = ? ORDER BY created_at, uid",
        )
        .bind(id(gid))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(uid, message, time_ms)| {
                Ok(ApplicationRecord {
                    uid: user_from_bytes(&uid)?,
                    message,
                    time_ms,
                })
            })
            .collect()
    }

    async fn mark_read(&self, gid: u64, uid: &UserId, seq: u64) -> Result<u64, GroupStoreError> {
        sqlx::query("UPDATE member SET read_seq = GREATEST(read_seq, ?) WHERE gid = ? AND uid = ?")
            .bind(id(seq))
            .bind(id(gid))
            .bind(uid.as_str())
            .execute(&self.pool)
            .await?;
        self.read_seq(gid, uid).await
    }

    async fn legacy_reads(&self, limit: u32) -> Result<Vec<(u64, UserId, u64)>, GroupStoreError> {
        let rows: Vec<(i64, Vec<u8>, i64)> =
            sqlx::query_as("SELECT gid, uid, read_seq FROM member WHERE read_seq > 0 LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        let mut reads = Vec::with_capacity(rows.len());
        for (gid, uid, seq) in rows {
            reads.push((gid as u64, user_from_bytes(&uid)?, seq as u64));
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

    async fn ping(&self) -> Result<(), GroupStoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::uid;
    use natter_proto::api::Role;
    use natter_proto::ErrorCode;
    use natter_record::mysql::testing::{drop_database, fresh_database};
    use natter_record::mysql::{MySqlOptions, MySqlStore};
    use std::sync::Arc;

    #[tokio::test]
    async fn mysql_passes_the_group_store_suite_beside_the_message_store() {
        let (url, name) = fresh_database().await;
        // Both stores migrate one database, in either order.
        let messages = MySqlStore::connect(&url, &MySqlOptions::default())
            .await
            .expect("message store");
        let store = MySqlGroupStore::connect(&url, 4, Duration::from_secs(5))
            .await
            .expect("group store");
        let again = MySqlStore::connect(&url, &MySqlOptions::default())
            .await
            .expect("message store again");
        crate::suite::run_all(&store).await;
        store.close().await;
        natter_record::MessageStore::close(&messages).await;
        natter_record::MessageStore::close(&again).await;
        drop_database(&name).await;
    }

    struct Quiet;

    #[async_trait]
    impl crate::Publisher for Quiet {
        async fn publish(
            &self,
            _group: u64,
            _event: natter_proto::msg::GroupEvent,
            _audience: Vec<UserId>,
        ) -> Result<(), natter_roles::Refusal> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn limits_hold_across_processes_sharing_the_database() {
        let (url, name) = fresh_database().await;
        let limits = natter_node::config::GroupsConfig {
            max_members: 10,
            ..Default::default()
        };
        // Two logic nodes: each its own stores, caches and change lock.
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let messages: Arc<dyn natter_record::MessageStore> = Arc::new(
                MySqlStore::connect(&url, &MySqlOptions::default())
                    .await
                    .expect("messages"),
            );
            let store = Arc::new(
                MySqlGroupStore::connect(&url, 4, Duration::from_secs(5))
                    .await
                    .expect("groups"),
            );
            nodes.push(Arc::new(crate::Groups::new(
                store,
                messages,
                Arc::new(Quiet),
                limits.clone(),
            )));
        }
        let owner = uid("owner");
        let group = nodes[0]
            .create(
                &owner,
                natter_proto::api::CreateGroup {
                    name: "race".into(),
                    join_type: natter_proto::api::JoinType::Open,
                    ..Default::default()
                },
            )
            .await
            .expect("group")
            .id;
        let mut joins = Vec::new();
        for n in 100..130usize {
            let node = nodes[n % 2].clone();
            let joiner = uid(&format!("u{n}"));
            joins.push(tokio::spawn(async move {
                node.join(&joiner, group, String::new()).await
            }));
        }
        let mut joined = 0;
        for join in joins {
            match join.await.expect("task") {
                Ok(outcome) => {
                    assert!(outcome.joined);
                    joined += 1;
                }
                Err(e) => assert!(
                    matches!(e.code, ErrorCode::MemberLimit | ErrorCode::Conflict),
                    "{e}"
                ),
            }
        }
        // Never past the limit, and every success is a member. (A join that
        // kept losing races may give up with `conflict`; most fill the group.)
        let members = nodes[1]
            .members(&owner, group, None, 100)
            .await
            .expect("members")
            .members;
        assert!((5..=9).contains(&joined), "{joined} joined");
        assert_eq!(members.len(), 1 + joined);

        // A kick through one node stops sends through the other within a
        // second (its cached group is checked against the store's version).
        let member = members[1].uid.clone();
        nodes[1]
            .check_send(&member, group)
            .await
            .expect("a member sends");
        nodes[0].kick(&owner, group, &member).await.expect("kicked");
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            match nodes[1].check_send(&member, group).await {
                Err(e) if e.code == ErrorCode::NotMember => break,
                _ => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "still a member on node 1"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop_database(&name).await;
    }

    /// A database from before string user ids (BIGINT uid columns, beside
    /// the message store) keeps every group, member and application through
    /// migrations 1002-1004, each uid now the decimal string of the old
    /// number, in columns that compare byte for byte.
    #[tokio::test]
    async fn integer_user_ids_migrate_to_their_decimal_strings() {
        let (url, name) = fresh_database().await;
        let messages = MySqlStore::connect(&url, &MySqlOptions::default())
            .await
            .expect("message store");
        // Two connections: one holds the migration lock while the other migrates.
        let pool = MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await
            .expect("pool");
        natter_record::mysql::migrate_exclusively(
            &pool,
            &natter_record::migrations::migrator(&MIGRATIONS[..1], true),
        )
        .await
        .expect("the migrations before string user ids");
        for statement in [
            "INSERT INTO grp (gid, name, avatar, owner, join_type, created_at, version) \
             VALUES (1, 'kept', 'a.png', 1234567890123, 'approval', 10, 7)",
            "INSERT INTO grp (gid, name, avatar, owner, join_type, created_at) VALUES (2, 'second', '', 2, 'open', 11)",
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

        let store = MySqlGroupStore::connect(&url, 4, Duration::from_secs(5))
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
            store.applications(1).await.expect("apps"),
            vec![ApplicationRecord {
                uid: uid("42"),
                message: "let me in".into(),
                time_ms: 30,
            }]
        );
        // Each uid column is 64 ASCII bytes, compared byte for byte.
        let columns: Vec<(String, String, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), \
                    CAST(COLLATION_NAME AS CHAR), CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED) \
             FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND ((TABLE_NAME IN ('member', 'application') \
                   AND COLUMN_NAME = 'uid') OR (TABLE_NAME = 'grp' AND COLUMN_NAME = 'owner')) \
             ORDER BY TABLE_NAME",
        )
        .fetch_all(&pool)
        .await
        .expect("columns");
        assert_eq!(
            columns,
            [("application", "uid"), ("grp", "owner"), ("member", "uid")].map(|(t, c)| (
                t.to_string(),
                c.to_string(),
                Some("ascii_bin".to_string()),
                Some(64)
            ))
        );
        // A bound id can use the index by user (the comparison is made in
        // the column's collation, not the connection's).
        let explained = sqlx::query("EXPLAIN SELECT gid, join_seq FROM member WHERE uid = ?")
            .bind("2")
            .fetch_all(&pool)
            .await
            .expect("explain");
        let possible: Vec<Option<String>> = explained
            .iter()
            .map(|row| row.try_get::<Option<String>, _>("possible_keys"))
            .collect::<Result<_, _>>()
            .expect("possible keys");
        assert!(
            possible
                .iter()
                .flatten()
                .any(|keys| keys.contains("member_by_user")),
            "{possible:?}"
        );
        // The message store still starts on the shared database.
        let again = MySqlStore::connect(&url, &MySqlOptions::default())
            .await
            .expect("message store after");
        pool.close().await;
        store.close().await;
        natter_record::MessageStore::close(&messages).await;
        natter_record::MessageStore::close(&again).await;
        drop_database(&name).await;
    }
}
