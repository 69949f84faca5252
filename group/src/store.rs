//! The storage trait for groups and the records that cross it.

use async_trait::async_trait;
use natter_proto::api::{JoinType, Role};
use natter_proto::UserId;

/// A storage failure; the caller answers `internal` and the client retries.
#[derive(Debug, thiserror::Error)]
pub enum GroupStoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error("the store cannot write (its last write failed)")]
    Unwritable,
}

/// A user id as stored: valid when it was written, so anything else is a
/// corrupt row (never a panic).
pub(crate) fn user_from(stored: &str) -> Result<UserId, GroupStoreError> {
    UserId::parse(stored).map_err(|e| GroupStoreError::Corrupt(format!("user id {stored:?}: {e}")))
}

/// A user id column read as bytes: MySQL reports a column that compares
/// byte for byte (`ascii_bin`) as `VARBINARY`.
pub(crate) fn user_from_bytes(stored: &[u8]) -> Result<UserId, GroupStoreError> {
    let text = std::str::from_utf8(stored)
        .map_err(|_| GroupStoreError::Corrupt(format!("user id {stored:?} is not text")))?;
    user_from(text)
}

/// How many groups, not dissolved, a user owns (the same SQL in both
/// dialects): through the member index by user, a user's own rows, not all
/// groups.
pub(crate) const OWNED_COUNT_SQL: &str =
    "SELECT COUNT(*) FROM member m JOIN grp g ON g.gid = m.gid \
     WHERE m.uid = ? AND g.owner = m.uid AND g.dissolved = 0";

/// A group as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecord {
    pub id: u64,
    pub name: String,
    pub avatar: String,
    pub owner: UserId,
    pub join_type: JoinType,
    pub mute_all: bool,
    pub dissolved: bool,
    pub created_ms: i64,
    /// Bumped by every change: a change written against an older version
    /// is refused, so changes made by different processes never interleave.
    pub version: u64,
}

/// A member as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    pub uid: UserId,
    pub role: Role,
    pub nickname: String,
    pub joined_ms: i64,
    /// The first `conv_seq` of the group this member may read.
    pub join_seq: u64,
    /// End of the mute, Unix ms; 0 when not muted.
    pub muted_until_ms: i64,
}

/// A pending application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplicationRecord {
    pub uid: UserId,
    pub message: String,
    pub time_ms: i64,
}

/// One change inside a [`GroupStore::write`] transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Inserts or replaces a member row.
    PutMember(MemberRecord),
    RemoveMember(UserId),
    /// Replaces the group row (name, avatar, owner, join type, flags).
    PutGroup(GroupRecord),
    PutApplication(ApplicationRecord),
    RemoveApplication(UserId),
}

/// Group storage. Implementations: SQLite ([`crate::sqlite::SqliteGroupStore`])
/// and MySQL ([`crate::mysql::MySqlGroupStore`]). User ids are stored as
/// they are given and compared byte for byte in both.
/// The rules (who may do what, limits) live in [`crate::Groups`], not here.
#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    /// Stores a new group with its first members; returns its id (the
    /// record's `id` is ignored).
    async fn create(
        &self,
        group: &GroupRecord,
        members: &[MemberRecord],
    ) -> Result<u64, GroupStoreError>;
    /// Applies `changes` to group `id` in one transaction, if the group is
    /// still at `version` (then bumped); false, with nothing written, if
    /// another change came first.
    async fn write(
        &self,
        id: u64,
        version: u64,
        changes: &[Change],
    ) -> Result<bool, GroupStoreError>;
    async fn group(&self, id: u64) -> Result<Option<GroupRecord>, GroupStoreError>;
    /// The group's version alone (a cheap check that it is unchanged).
    async fn version(&self, id: u64) -> Result<Option<u64>, GroupStoreError>;
    /// Every member of the group, by uid (byte for byte).
    async fn members(&self, id: u64) -> Result<Vec<MemberRecord>, GroupStoreError>;
    /// The groups `uid` is a member of, with the member's join point, by id.
    async fn groups_of(&self, uid: &UserId) -> Result<Vec<(u64, u64)>, GroupStoreError>;
    /// How many groups, not dissolved, `uid` owns.
    async fn owned_count(&self, uid: &UserId) -> Result<u64, GroupStoreError>;
    /// Pending applications, oldest first.
    async fn applications(&self, id: u64) -> Result<Vec<ApplicationRecord>, GroupStoreError>;
    /// Moves a member's read cursor forward to `seq` (never back); returns
    /// the cursor now (0 for a non-member).
    async fn mark_read(&self, id: u64, uid: &UserId, seq: u64) -> Result<u64, GroupStoreError>;
    /// A member's read cursor (0 for a non-member or nothing read).
    async fn read_seq(&self, id: u64, uid: &UserId) -> Result<u64, GroupStoreError>;
    /// Read cursors this store kept before the message store kept every
    /// conversation's (protocol version 2): up to `limit` of them above 0,
    /// as (group, member, cursor), for importing there once.
    async fn legacy_reads(&self, limit: u32) -> Result<Vec<(u64, UserId, u64)>, GroupStoreError>;
    /// Sets these members' cursors to 0: they were imported.
    async fn clear_legacy_reads(&self, reads: &[(u64, UserId)]) -> Result<(), GroupStoreError>;
    /// Whether the store answers; used by `/readyz`.
    async fn ping(&self) -> Result<(), GroupStoreError>;
    async fn close(&self);
}

/// A role as stored (`owner`, `admin`, `member`).
pub(crate) fn role_from(s: &str) -> Result<Role, GroupStoreError> {
    match s {
        "owner" => Ok(Role::Owner),
        "admin" => Ok(Role::Admin),
        "member" => Ok(Role::Member),
        other => Err(GroupStoreError::Corrupt(format!("role {other:?}"))),
    }
}

/// A join type as stored (`open`, `approval`, `invite_only`).
pub(crate) fn join_type_from(s: &str) -> Result<JoinType, GroupStoreError> {
    match s {
        "open" => Ok(JoinType::Open),
        "approval" => Ok(JoinType::Approval),
        "invite_only" => Ok(JoinType::InviteOnly),
        other => Err(GroupStoreError::Corrupt(format!("join type {other:?}"))),
    }
}
