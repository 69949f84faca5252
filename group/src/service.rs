//! The rules of groups: who may do what, limits, mute rules, join points,
//! and the event every change publishes.
//!
//! Changes to one group are serialized in a process (a lock per group, so
//! one busy group does not hold up the others), each reads the group fresh from the store, checks its rules,
//! writes in one transaction, refreshes the cache the message path reads,
//! and then publishes its event while still in order with the next change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use natter_node::config::GroupsConfig;
use natter_node::limit::RateLimiter;
use natter_proto::api::{
    ApplicationView, CreateGroup, GroupView, JoinOutcome, JoinType, MemberPage, MemberView, Role,
    UpdateGroup,
};
use natter_proto::msg::{GroupEvent, MUTED_FOREVER};
use natter_proto::{ErrorCode, UserId};
use natter_record::http::GroupAccess;
use natter_record::store::group_conversation;
use natter_record::MessageStore;
use natter_roles::Refusal;

use crate::store::*;

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::new(code, message))
}

impl From<GroupStoreError> for Refusal {
    fn from(e: GroupStoreError) -> Refusal {
        tracing::error!(error = %e, "group store failed");
        Refusal::new(ErrorCode::Internal, "group storage is unavailable; retry")
    }
}

/// A failure of the message store, as the client sees it. (A function, not
/// a `From`: both types belong to other crates.)
fn message_store_failed(e: natter_record::StoreError) -> Refusal {
    tracing::error!(error = %e, "message store failed");
    Refusal::new(ErrorCode::Internal, "storage is unavailable; retry")
}

/// Where group events go: stored as a system message in the group's history
/// and pushed to `audience` as a notify. Implemented by `logic`.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(
        &self,
        group: u64,
        event: GroupEvent,
        audience: Vec<UserId>,
    ) -> Result<(), Refusal>;
}

/// One group as the message path sees it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub group: GroupRecord,
    /// By uid, byte for byte.
    pub members: BTreeMap<UserId, MemberRecord>,
}

impl Snapshot {
    fn member(&self, uid: &UserId) -> Result<&MemberRecord, Refusal> {
        self.members.get(uid).ok_or_else(|| {
            Refusal::new(
                ErrorCode::NotMember,
                format!("user {uid} is not a member of group {}", self.group.id),
            )
        })
    }

    fn manager(&self, uid: &UserId) -> Result<&MemberRecord, Refusal> {
        let member = self.member(uid)?;
        if !member.role.manages() {
            return refuse(
                ErrorCode::Forbidden,
                "only the owner and admins may do this",
            );
        }
        Ok(member)
    }

    fn admins(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.role == Role::Admin)
            .count()
    }

    /// Everyone a message to the group goes to.
    pub fn member_ids(&self) -> Vec<UserId> {
        self.members.keys().cloned().collect()
    }
}

/// What one change does: rows to write and events to publish (to the
/// members before and after the change, and to `notify`).
#[derive(Default)]
struct Plan {
    changes: Vec<Change>,
    events: Vec<GroupEvent>,
    notify: Vec<UserId>,
}

fn event(kind: &str, actor: &UserId, targets: Vec<UserId>, value: impl Into<String>) -> GroupEvent {
    GroupEvent {
        kind: kind.into(),
        actor: actor.to_string(),
        targets: targets.into_iter().map(String::from).collect(),
        value: value.into(),
        until_ms: 0,
    }
}

fn now_ms() -> i64 {
    natter_node::ids::now_ms()
}

fn muted_now(m: &MemberRecord, now: i64) -> Option<i64> {
    (m.muted_until_ms > now).then_some(m.muted_until_ms)
}

pub fn member_view(m: &MemberRecord, now: i64) -> MemberView {
    MemberView {
        uid: m.uid.clone(),
        role: m.role,
        nickname: m.nickname.clone(),
        joined_ms: m.joined_ms,
        join_seq: m.join_seq,
        muted_until_ms: muted_now(m, now),
    }
}

const MAX_NAME: usize = 64;
const MAX_TEXT: usize = 512;
/// Groups kept in the cache before it is emptied (entries reload on demand).
const CACHE_LIMIT: usize = 10_000;

/// Invisible formatting characters (Unicode category Cf) a name may not
/// hold: bidirectional controls that reorder what follows (U+202E shows
/// "evil.exe" as "exe.live"), zero-width spaces, and the like. The zero-width
/// joiner (inside emoji sequences) and the tag characters (inside flag
/// emoji) are allowed, and so is the zero-width non-joiner (Persian).
fn is_hidden_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
        | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}' | '\u{200B}'
        | '\u{200E}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}'
        | '\u{110CD}' | '\u{13430}'..='\u{1343F}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0001}')
}

/// Bidirectional controls: they reorder the text shown after them.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `c` shows as something: not a space, a control, a hidden format
/// character, a joiner or a variation selector.
fn is_visible(c: char) -> bool {
    !(c.is_whitespace()
        || c.is_control()
        || is_hidden_format(c)
        || matches!(c, '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{E0020}'..='\u{E007F}'))
}

/// A name (of a group, or a member's nickname): 1 to [`MAX_NAME`]
/// characters, at least one of them visible, no control characters and no
/// hidden formatting characters.
fn check_name_of(what: &str, name: &str) -> Result<(), Refusal> {
    if !name.chars().any(is_visible) || name.chars().count() > MAX_NAME {
        return refuse(
            ErrorCode::BadRequest,
            format!("{what} is 1 to {MAX_NAME} characters, at least one of them visible"),
        );
    }
    if name.chars().any(|c| c.is_control() || is_hidden_format(c)) {
        return refuse(
            ErrorCode::BadRequest,
            format!("{what} may not hold control characters or invisible formatting (such as U+202E or U+200B)"),
        );
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), Refusal> {
    check_name_of("a group name", name)
}

/// Free text (an application's message, an avatar URL): at most
/// [`MAX_TEXT`] characters; line breaks and tabs are allowed, other
/// control characters and bidirectional controls are not.
fn check_text(what: &str, text: &str) -> Result<(), Refusal> {
    if text.chars().count() > MAX_TEXT {
        return refuse(
            ErrorCode::BadRequest,
            format!("{what} is at most {MAX_TEXT} characters"),
        );
    }
    if text
        .chars()
        .any(|c| (c.is_control() && c != '\n' && c != '\t') || is_bidi_control(c))
    {
        return refuse(
            ErrorCode::BadRequest,
            format!("{what} may not hold control characters other than line breaks and tabs, or bidirectional controls"),
        );
    }
    Ok(())
}

/// How long a group read from the store serves the message path before its
/// version is checked again (when other processes change groups too).
/// Changes made in this process replace it at once; changes made by others
/// are seen within this time.
const SNAPSHOT_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Times a change is made again after losing a race with another change.
const CHANGE_ATTEMPTS: u32 = 10;

/// Groups as last read, and a count of this process's changes per group.
#[derive(Default)]
struct Cache {
    entries: HashMap<u64, (Arc<Snapshot>, std::time::Instant)>,
    generations: HashMap<u64, u64>,
}

impl Cache {
    fn generation(&self, gid: u64) -> u64 {
        self.generations.get(&gid).copied().unwrap_or(0)
    }

    fn bump(&mut self, gid: u64) {
        if self.generations.len() >= CACHE_LIMIT {
            self.generations.clear();
        }
        *self.generations.entry(gid).or_default() += 1;
        self.entries.remove(&gid);
    }
}

/// The groups role.
pub struct Groups {
    store: Arc<dyn GroupStore>,
    messages: Arc<dyn MessageStore>,
    publisher: Arc<dyn Publisher>,
    limits: GroupsConfig,
    cache: Mutex<Cache>,
    /// Other processes change these groups too (the distributed shape):
    /// cached groups are checked against the store's version once they are
    /// [`SNAPSHOT_TTL`] old.
    shared: bool,
    /// Changes of one group are made one at a time (their events and
    /// versions are in order); changes of different groups do not wait for
    /// each other, but for the rare two groups sharing a shard.
    changes: Vec<tokio::sync::Mutex<()>>,
    /// Groups each user may create, and users each user may add to groups,
    /// per hour.
    creations: RateLimiter,
    invitations: RateLimiter,
}

/// Shards of the per-group change lock.
const CHANGE_SHARDS: usize = 256;

impl Groups {
    pub fn new(
        store: Arc<dyn GroupStore>,
        messages: Arc<dyn MessageStore>,
        publisher: Arc<dyn Publisher>,
        limits: GroupsConfig,
    ) -> Groups {
        Groups {
            store,
            messages,
            publisher,
            cache: Mutex::new(Cache::default()),
            shared: true,
            changes: (0..CHANGE_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            creations: RateLimiter::new(
                f64::from(limits.creates_per_hour) / 3600.0,
                limits.creates_per_hour,
            ),
            invitations: RateLimiter::new(
                f64::from(limits.invites_per_hour) / 3600.0,
                limits.invites_per_hour,
            ),
            limits,
        }
    }

    async fn load(&self, gid: u64) -> Result<Arc<Snapshot>, Refusal> {
        // A load that raced a change of this process must not put the older
        // state back: it is cached only if no change came meanwhile.
        let generation = self.cache().generation(gid);
        let Some(group) = self.store.group(gid).await? else {
            return refuse(ErrorCode::NotFound, format!("no group {gid}"));
        };
        let members = self
            .store
            .members(gid)
            .await?
            .into_iter()
            .map(|m| (m.uid.clone(), m))
            .collect();
        let snapshot = Arc::new(Snapshot { group, members });
        let mut cache = self.cache();
        if cache.generation(gid) == generation {
            if cache.entries.len() >= CACHE_LIMIT {
                cache.entries.clear();
            }
            cache
                .entries
                .insert(gid, (snapshot.clone(), std::time::Instant::now()));
        }
        Ok(snapshot)
    }

    /// The change lock of `gid`.
    async fn lock(&self, gid: u64) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes[(gid % CHANGE_SHARDS as u64) as usize]
            .lock()
            .await
    }

    /// Takes `users` from the actor's hourly allowance of users added to
    /// groups.
    fn may_add(&self, actor: &UserId, users: usize) -> Result<(), Refusal> {
        let n = u32::try_from(users).unwrap_or(u32::MAX);
        if n > 0 && !self.invitations.allow_n(actor.as_str(), n) {
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "a user may add at most {} users to groups per hour; try later",
                    self.limits.invites_per_hour
                ),
            );
        }
        Ok(())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The group as of its last change in this process, or at most
    /// [`SNAPSHOT_TTL`] old (changes made by other processes).
    pub async fn snapshot(&self, gid: u64) -> Result<Arc<Snapshot>, Refusal> {
        if gid == 0 || gid > i64::MAX as u64 {
            return refuse(ErrorCode::NotFound, format!("no group {gid}"));
        }
        let cached = self
            .cache()
            .entries
            .get(&gid)
            .map(|(snapshot, at)| (snapshot.clone(), at.elapsed()));
        match cached {
            None => self.load(gid).await,
            Some((snapshot, age)) if age < SNAPSHOT_TTL || !self.shared => Ok(snapshot),
            Some((snapshot, _)) => {
                // Past its age: one small read says whether another process
                // changed the group; only then are the members read again.
                if self.store.version(gid).await? == Some(snapshot.group.version) {
                    let mut cache = self.cache();
                    if let Some(entry) = cache.entries.get_mut(&gid) {
                        entry.1 = std::time::Instant::now();
                    }
                    Ok(snapshot)
                } else {
                    self.load(gid).await
                }
            }
        }
    }

    /// This process is the only one that changes groups (the embedded
    /// shape): cached groups never need checking against the store.
    pub fn sole_writer(mut self) -> Groups {
        self.shared = false;
        self
    }

    /// A member's join point, if the group is in the cache (never loads).
    pub fn cached_join_seq(&self, gid: u64, uid: &UserId) -> Option<u64> {
        let cache = self.cache();
        let (snapshot, _) = cache.entries.get(&gid)?;
        snapshot.members.get(uid).map(|m| m.join_seq)
    }

    /// May `uid` send to `gid` now? Returns the group for fan-out.
    pub async fn check_send(&self, uid: &UserId, gid: u64) -> Result<Arc<Snapshot>, Refusal> {
        let snapshot = self.snapshot(gid).await?;
        if snapshot.group.dissolved {
            return refuse(
                ErrorCode::GroupDissolved,
                format!("group {gid} was dissolved"),
            );
        }
        let member = snapshot.member(uid)?;
        let now = now_ms();
        if let Some(until) = muted_now(member, now) {
            return Err(Refusal::muted(until, "you are muted in this group"));
        }
        if snapshot.group.mute_all && member.role == Role::Member {
            return Err(Refusal::muted(
                MUTED_FOREVER,
                "the group is muted for everyone but the owner and admins",
            ));
        }
        Ok(snapshot)
    }

    /// The groups of `uid`, each with the member's join point.
    pub async fn groups_of(&self, uid: &UserId) -> Result<Vec<(u64, u64)>, Refusal> {
        Ok(self.store.groups_of(uid).await?)
    }

    async fn view(&self, snapshot: &Snapshot, actor: &UserId) -> Result<GroupView, Refusal> {
        let g = &snapshot.group;
        let member = snapshot.member(actor)?;
        // The caller's read cursor is the conversation's (the message store's).
        let read = self
            .messages
            .read_state(
                actor,
                &group_conversation(g.id),
                member.join_seq.saturating_sub(1),
            )
            .await
            .map_err(message_store_failed)?;
        let last_seq = read.last_seq;
        Ok(GroupView {
            role: member.role,
            read_seq: read.read_seq,
            unread: read.unread,
            id: g.id,
            name: g.name.clone(),
            avatar: g.avatar.clone(),
            owner: g.owner.clone(),
            join_type: g.join_type,
            mute_all: g.mute_all,
            member_count: snapshot.members.len() as u32,
            created_ms: g.created_ms,
            dissolved: g.dissolved,
            last_seq,
        })
    }

    /// Runs one change: fresh state, rules, one transaction written only if
    /// no other change (of any process) came first — else all again from the
    /// new state — then cache refresh and events.
    async fn change(
        &self,
        gid: u64,
        mut plan: impl FnMut(&Snapshot, u64, i64) -> Result<Plan, Refusal>,
    ) -> Result<Arc<Snapshot>, Refusal> {
        self.change_with(gid, false, |s, _, next_seq, now| plan(s, next_seq, now))
            .await
    }

    /// [`Groups::change`] whose rules also see the group's pending
    /// applications, read fresh with the group (under its lock, and checked
    /// by the same version as the group).
    async fn change_with(
        &self,
        gid: u64,
        with_applications: bool,
        mut plan: impl FnMut(&Snapshot, &[ApplicationRecord], u64, i64) -> Result<Plan, Refusal>,
    ) -> Result<Arc<Snapshot>, Refusal> {
        if gid == 0 || gid > i64::MAX as u64 {
            return refuse(ErrorCode::NotFound, format!("no group {gid}"));
        }
        let _serial = self.lock(gid).await;
        let mut attempt = 0;
        let (before, plan) = loop {
            let before = self.load(gid).await?;
            if before.group.dissolved {
                return refuse(
                    ErrorCode::GroupDissolved,
                    format!("group {gid} was dissolved"),
                );
            }
            // Who joins now may read from the next message on.
            let next_seq = self
                .messages
                .group_seqs(&[gid])
                .await
                .map_err(message_store_failed)?
                .first()
                .copied()
                .unwrap_or(0)
                + 1;
            let applications = if with_applications {
                self.store.applications(gid).await?
            } else {
                Vec::new()
            };
            let plan = plan(&before, &applications, next_seq, now_ms())?;
            if plan.changes.is_empty()
                || self
                    .store
                    .write(gid, before.group.version, &plan.changes)
                    .await?
            {
                break (before, plan);
            }
            attempt += 1;
            if attempt >= CHANGE_ATTEMPTS {
                return refuse(
                    ErrorCode::Conflict,
                    "the group is being changed by others; retry",
                );
            }
        };
        self.cache().bump(gid);
        let after = self.load(gid).await?;
        if !plan.events.is_empty() {
            let audience: BTreeSet<UserId> = before
                .members
                .keys()
                .chain(after.members.keys())
                .chain(plan.notify.iter())
                .cloned()
                .collect();
            let audience: Vec<UserId> = audience.into_iter().collect();
            for event in plan.events {
                // The change is made; a failure here loses only the notice,
                // and is logged and counted by the publisher.
                if let Err(e) = self.publisher.publish(gid, event, audience.clone()).await {
                    tracing::error!(group = gid, error = %e, "group event not published");
                }
            }
        }
        Ok(after)
    }

    fn new_member(&self, uid: UserId, role: Role, join_seq: u64, now: i64) -> MemberRecord {
        MemberRecord {
            uid,
            role,
            nickname: String::new(),
            joined_ms: now,
            join_seq,
            muted_until_ms: 0,
        }
    }

    fn room_for(&self, snapshot: &Snapshot, adding: usize) -> Result<(), Refusal> {
        if snapshot.members.len() + adding > self.limits.max_members as usize {
            return refuse(
                ErrorCode::MemberLimit,
                format!("a group has at most {} members", self.limits.max_members),
            );
        }
        Ok(())
    }

    pub async fn create(&self, actor: &UserId, req: CreateGroup) -> Result<GroupView, Refusal> {
        check_name(&req.name)?;
        check_text("avatar", &req.avatar)?;
        let mut others: Vec<UserId> = req.members.clone();
        others.sort_unstable();
        others.dedup();
        others.retain(|u| u != actor);
        if others.len() + 1 > self.limits.max_members as usize {
            return refuse(
                ErrorCode::MemberLimit,
                format!("a group has at most {} members", self.limits.max_members),
            );
        }
        let now = now_ms();
        let group = GroupRecord {
            id: 0,
            name: req.name.trim().to_string(),
            avatar: req.avatar,
            owner: actor.clone(),
            join_type: req.join_type,
            mute_all: false,
            dissolved: false,
            created_ms: now,
            version: 0,
        };
        let mut members = vec![self.new_member(actor.clone(), Role::Owner, 1, now)];
        members.extend(
            others
                .iter()
                .map(|u| self.new_member(u.clone(), Role::Member, 1, now)),
        );
        if self.store.owned_count(actor).await? >= u64::from(self.limits.max_owned) {
            return refuse(
                ErrorCode::QuotaExceeded,
                format!(
                    "a user owns at most {} groups; dissolve or hand over one first",
                    self.limits.max_owned
                ),
            );
        }
        if !self.creations.allow(actor.as_str()) {
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "a user may create at most {} groups per hour; try later",
                    self.limits.creates_per_hour
                ),
            );
        }
        self.may_add(actor, others.len())?;
        let gid = {
            let gid = self.store.create(&group, &members).await?;
            // Nothing else knows the new id yet: its "created" event is the
            // group's first.
            let _serial = self.lock(gid).await;
            let snapshot = self.load(gid).await?;
            let created = event("created", actor, others, group.name.clone());
            if let Err(e) = self
                .publisher
                .publish(gid, created, snapshot.member_ids())
                .await
            {
                tracing::error!(group = gid, error = %e, "group event not published");
            }
            gid
        };
        self.info(actor, gid).await
    }

    pub async fn info(&self, actor: &UserId, gid: u64) -> Result<GroupView, Refusal> {
        let snapshot = self.snapshot(gid).await?;
        self.view(&snapshot, actor).await
    }

    pub async fn mine(&self, actor: &UserId) -> Result<Vec<GroupView>, Refusal> {
        let mut views = Vec::new();
        for (gid, _) in self.store.groups_of(actor).await? {
            let snapshot = self.snapshot(gid).await?;
            // A member row removed since the list was read is skipped.
            if snapshot.members.contains_key(actor) {
                views.push(self.view(&snapshot, actor).await?);
            }
        }
        Ok(views)
    }

    pub async fn members(
        &self,
        actor: &UserId,
        gid: u64,
        after: Option<&UserId>,
        limit: u32,
    ) -> Result<MemberPage, Refusal> {
        if !(1..=500).contains(&limit) {
            return refuse(ErrorCode::BadRequest, "limit must be between 1 and 500");
        }
        let snapshot = self.snapshot(gid).await?;
        snapshot.member(actor)?;
        let now = now_ms();
        // Members after `after`, byte for byte (so "B" comes before "a").
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let members: Vec<MemberView> = snapshot
            .members
            .range::<UserId, _>((from, Bound::Unbounded))
            .take(limit as usize)
            .map(|(_, m)| member_view(m, now))
            .collect();
        let next_after = (members.len() == limit as usize)
            .then(|| members.last().map(|m| m.uid.clone()))
            .flatten()
            .filter(|last| {
                snapshot
                    .members
                    .range::<UserId, _>((Bound::Excluded(last), Bound::Unbounded))
                    .next()
                    .is_some()
            });
        Ok(MemberPage {
            members,
            next_after,
        })
    }

    pub async fn member(
        &self,
        actor: &UserId,
        gid: u64,
        uid: &UserId,
    ) -> Result<MemberView, Refusal> {
        let snapshot = self.snapshot(gid).await?;
        snapshot.member(actor)?;
        Ok(member_view(snapshot.member(uid)?, now_ms()))
    }

    /// Adds users invited by a member; returns those added (already-members
    /// are skipped).
    pub async fn invite(
        &self,
        actor: &UserId,
        gid: u64,
        users: Vec<UserId>,
    ) -> Result<Vec<UserId>, Refusal> {
        let mut distinct = users.clone();
        distinct.sort_unstable();
        distinct.dedup();
        self.may_add(actor, distinct.len())?;
        let mut added = Vec::new();
        self.change(gid, |s, next_seq, now| {
            let inviter = s.member(actor)?;
            if s.group.join_type == JoinType::InviteOnly && !inviter.role.manages() {
                return refuse(
                    ErrorCode::Forbidden,
                    "in an invite-only group only the owner and admins invite",
                );
            }
            let mut new: Vec<UserId> = users
                .iter()
                .filter(|u| !s.members.contains_key(*u))
                .cloned()
                .collect();
            new.sort_unstable();
            new.dedup();
            if new.is_empty() {
                return refuse(ErrorCode::Conflict, "everyone invited is a member already");
            }
            self.room_for(s, new.len())?;
            let mut plan = Plan::default();
            for uid in &new {
                plan.changes.push(Change::PutMember(self.new_member(
                    uid.clone(),
                    Role::Member,
                    next_seq,
                    now,
                )));
                plan.changes.push(Change::RemoveApplication(uid.clone()));
            }
            plan.events.push(event("invited", actor, new.clone(), ""));
            added = new;
            Ok(plan)
        })
        .await?;
        Ok(added)
    }

    /// Joins an open group, or applies to one that needs approval.
    pub async fn join(
        &self,
        actor: &UserId,
        gid: u64,
        message: String,
    ) -> Result<JoinOutcome, Refusal> {
        check_text("message", &message)?;
        let mut joined = false;
        self.change(gid, |s, next_seq, now| {
            if s.members.contains_key(actor) {
                return refuse(ErrorCode::Conflict, "already a member");
            }
            let mut plan = Plan::default();
            match s.group.join_type {
                JoinType::InviteOnly => {
                    return refuse(
                        ErrorCode::Forbidden,
                        "this group is joined by invitation only",
                    )
                }
                JoinType::Open => {
                    self.room_for(s, 1)?;
                    plan.changes.push(Change::PutMember(self.new_member(
                        actor.clone(),
                        Role::Member,
                        next_seq,
                        now,
                    )));
                    plan.events
                        .push(event("joined", actor, vec![actor.clone()], ""));
                    joined = true;
                }
                JoinType::Approval => {
                    plan.changes.push(Change::PutApplication(ApplicationRecord {
                        uid: actor.clone(),
                        message: message.clone(),
                        time_ms: now,
                    }));
                }
            }
            Ok(plan)
        })
        .await?;
        Ok(JoinOutcome { joined })
    }

    pub async fn applications(
        &self,
        actor: &UserId,
        gid: u64,
    ) -> Result<Vec<ApplicationView>, Refusal> {
        let snapshot = self.snapshot(gid).await?;
        snapshot.manager(actor)?;
        Ok(self
            .store
            .applications(gid)
            .await?
            .into_iter()
            .map(|a| ApplicationView {
                uid: a.uid,
                message: a.message,
                time_ms: a.time_ms,
            })
            .collect())
    }

    pub async fn decide(
        &self,
        actor: &UserId,
        gid: u64,
        uid: &UserId,
        approve: bool,
    ) -> Result<(), Refusal> {
        self.change_with(gid, true, |s, pending, next_seq, now| {
            s.manager(actor)?;
            if !pending.iter().any(|a| a.uid == *uid) {
                return refuse(
                    ErrorCode::NotFound,
                    format!("no application from user {uid}"),
                );
            }
            let mut plan = Plan::default();
            plan.changes.push(Change::RemoveApplication(uid.clone()));
            if approve && !s.members.contains_key(uid) {
                self.room_for(s, 1)?;
                plan.changes.push(Change::PutMember(self.new_member(
                    uid.clone(),
                    Role::Member,
                    next_seq,
                    now,
                )));
                plan.events
                    .push(event("joined", actor, vec![uid.clone()], ""));
            }
            Ok(plan)
        })
        .await?;
        Ok(())
    }

    pub async fn quit(&self, actor: &UserId, gid: u64) -> Result<(), Refusal> {
        self.change(gid, |s, _, _| {
            let me = s.member(actor)?;
            if me.role == Role::Owner {
                return refuse(
                    ErrorCode::Forbidden,
                    "the owner transfers ownership or dissolves the group instead of leaving",
                );
            }
            Ok(Plan {
                changes: vec![Change::RemoveMember(actor.clone())],
                events: vec![event("left", actor, vec![actor.clone()], "")],
                notify: vec![],
            })
        })
        .await?;
        Ok(())
    }

    pub async fn kick(&self, actor: &UserId, gid: u64, uid: &UserId) -> Result<(), Refusal> {
        self.change(gid, |s, _, _| {
            let me = s.manager(actor)?;
            let target = s.member(uid)?;
            if uid == actor {
                return refuse(
                    ErrorCode::BadRequest,
                    "leave the group instead of kicking yourself",
                );
            }
            if target.role >= me.role {
                return refuse(
                    ErrorCode::Forbidden,
                    "only the owner removes admins, and nobody removes the owner",
                );
            }
            Ok(Plan {
                changes: vec![Change::RemoveMember(uid.clone())],
                events: vec![event("kicked", actor, vec![uid.clone()], "")],
                notify: vec![uid.clone()],
            })
        })
        .await?;
        Ok(())
    }

    pub async fn dissolve(&self, actor: &UserId, gid: u64) -> Result<(), Refusal> {
        self.change(gid, |s, _, _| {
            if s.member(actor)?.role != Role::Owner {
                return refuse(ErrorCode::Forbidden, "only the owner dissolves the group");
            }
            Ok(Plan {
                changes: vec![Change::PutGroup(GroupRecord {
                    dissolved: true,
                    ..s.group.clone()
                })],
                events: vec![event("dissolved", actor, vec![], "")],
                notify: vec![],
            })
        })
        .await?;
        Ok(())
    }

    pub async fn update(
        &self,
        actor: &UserId,
        gid: u64,
        req: UpdateGroup,
    ) -> Result<GroupView, Refusal> {
        if let Some(name) = &req.name {
            check_name(name)?;
        }
        if let Some(avatar) = &req.avatar {
            check_text("avatar", avatar)?;
        }
        let after = self
            .change(gid, |s, _, _| {
                s.manager(actor)?;
                let mut group = s.group.clone();
                let mut plan = Plan::default();
                if let Some(name) = &req.name {
                    let name = name.trim();
                    if name != group.name {
                        group.name = name.to_string();
                        plan.events.push(event("renamed", actor, vec![], name));
                    }
                }
                if let Some(avatar) = &req.avatar {
                    if *avatar != group.avatar {
                        group.avatar = avatar.clone();
                        plan.events
                            .push(event("avatar_changed", actor, vec![], avatar.clone()));
                    }
                }
                if let Some(join_type) = req.join_type {
                    if join_type != group.join_type {
                        group.join_type = join_type;
                        plan.events.push(event(
                            "join_type_changed",
                            actor,
                            vec![],
                            join_type.as_str(),
                        ));
                    }
                }
                if let Some(mute_all) = req.mute_all {
                    if mute_all != group.mute_all {
                        group.mute_all = mute_all;
                        let kind = if mute_all { "mute_all" } else { "unmute_all" };
                        plan.events.push(event(kind, actor, vec![], ""));
                    }
                }
                if !plan.events.is_empty() {
                    plan.changes.push(Change::PutGroup(group));
                }
                Ok(plan)
            })
            .await?;
        self.view(&after, actor).await
    }

    /// Makes a member an admin or an admin a member (owner only).
    pub async fn set_role(
        &self,
        actor: &UserId,
        gid: u64,
        uid: &UserId,
        role: Role,
    ) -> Result<MemberView, Refusal> {
        if role == Role::Owner {
            return refuse(ErrorCode::BadRequest, "ownership moves with transfer");
        }
        let after = self
            .change(gid, |s, _, _| {
                if s.member(actor)?.role != Role::Owner {
                    return refuse(ErrorCode::Forbidden, "only the owner changes roles");
                }
                let target = s.member(uid)?;
                if target.role == Role::Owner {
                    return refuse(
                        ErrorCode::BadRequest,
                        "the owner's role moves with transfer",
                    );
                }
                if target.role == role {
                    return Ok(Plan::default());
                }
                if role == Role::Admin && s.admins() >= self.limits.max_admins as usize {
                    return refuse(
                        ErrorCode::AdminLimit,
                        format!("a group has at most {} admins", self.limits.max_admins),
                    );
                }
                let mut member = target.clone();
                member.role = role;
                if role == Role::Admin {
                    // Admins cannot be muted: the grant lifts a mute.
                    member.muted_until_ms = 0;
                }
                Ok(Plan {
                    changes: vec![Change::PutMember(member)],
                    events: vec![event(
                        "role_changed",
                        actor,
                        vec![uid.clone()],
                        role.as_str(),
                    )],
                    notify: vec![],
                })
            })
            .await?;
        Ok(member_view(after.member(uid)?, now_ms()))
    }

    /// Hands ownership to another member; the old owner becomes a member.
    pub async fn transfer(
        &self,
        actor: &UserId,
        gid: u64,
        to: &UserId,
    ) -> Result<GroupView, Refusal> {
        let after = self
            .change(gid, |s, _, _| {
                let me = s.member(actor)?;
                if me.role != Role::Owner {
                    return refuse(ErrorCode::Forbidden, "only the owner transfers ownership");
                }
                if to == actor {
                    return refuse(ErrorCode::BadRequest, "already the owner");
                }
                let mut heir = s.member(to)?.clone();
                heir.role = Role::Owner;
                heir.muted_until_ms = 0;
                let mut old = me.clone();
                old.role = Role::Member;
                Ok(Plan {
                    changes: vec![
                        Change::PutMember(heir),
                        Change::PutMember(old),
                        Change::PutGroup(GroupRecord {
                            owner: to.clone(),
                            ..s.group.clone()
                        }),
                    ],
                    events: vec![event("owner_transferred", actor, vec![to.clone()], "")],
                    notify: vec![],
                })
            })
            .await?;
        self.view(&after, actor).await
    }

    /// Mutes a member for `duration_secs` (0 unmutes, -1 until unmuted).
    pub async fn mute(
        &self,
        actor: &UserId,
        gid: u64,
        uid: &UserId,
        duration_secs: i64,
    ) -> Result<MemberView, Refusal> {
        let max = self.limits.max_mute_secs;
        if duration_secs < -1 || duration_secs as i128 > max as i128 {
            return refuse(
                ErrorCode::BadRequest,
                format!("duration_secs is -1 (forever), 0 (unmute) or up to {max}"),
            );
        }
        let after = self
            .change(gid, |s, _, now| {
                s.manager(actor)?;
                let target = s.member(uid)?;
                if target.role.manages() {
                    return refuse(ErrorCode::Forbidden, "admins and the owner cannot be muted");
                }
                let mut member = target.clone();
                let mut e = match duration_secs {
                    0 => {
                        if muted_now(target, now).is_none() {
                            return Ok(Plan::default());
                        }
                        member.muted_until_ms = 0;
                        event("unmuted", actor, vec![uid.clone()], "")
                    }
                    -1 => {
                        member.muted_until_ms = MUTED_FOREVER;
                        event("muted", actor, vec![uid.clone()], "")
                    }
                    secs => {
                        member.muted_until_ms = now.saturating_add(secs.saturating_mul(1000));
                        event("muted", actor, vec![uid.clone()], "")
                    }
                };
                e.until_ms = member.muted_until_ms;
                Ok(Plan {
                    changes: vec![Change::PutMember(member)],
                    events: vec![e],
                    notify: vec![],
                })
            })
            .await?;
        Ok(member_view(after.member(uid)?, now_ms()))
    }

    /// Members muted now (owner and admins only).
    pub async fn muted(&self, actor: &UserId, gid: u64) -> Result<Vec<MemberView>, Refusal> {
        let snapshot = self.snapshot(gid).await?;
        snapshot.manager(actor)?;
        let now = now_ms();
        Ok(snapshot
            .members
            .values()
            .filter(|m| muted_now(m, now).is_some())
            .map(|m| member_view(m, now))
            .collect())
    }

    /// Sets a member's nickname in the group: one's own, or anyone's for
    /// the owner and admins.
    pub async fn nickname(
        &self,
        actor: &UserId,
        gid: u64,
        uid: &UserId,
        nickname: String,
    ) -> Result<MemberView, Refusal> {
        // An empty nickname clears it.
        if !nickname.is_empty() {
            check_name_of("a nickname", &nickname)?;
        }
        let after = self
            .change(gid, |s, _, _| {
                let me = s.member(actor)?;
                if uid != actor && !me.role.manages() {
                    return refuse(ErrorCode::Forbidden, "only admins set others' nicknames");
                }
                let target = s.member(uid)?;
                if target.nickname == nickname {
                    return Ok(Plan::default());
                }
                let mut member = target.clone();
                member.nickname = nickname.clone();
                Ok(Plan {
                    changes: vec![Change::PutMember(member)],
                    events: vec![event(
                        "nickname_changed",
                        actor,
                        vec![uid.clone()],
                        nickname.clone(),
                    )],
                    notify: vec![],
                })
            })
            .await?;
        Ok(member_view(after.member(uid)?, now_ms()))
    }

    pub async fn ping(&self) -> Result<(), Refusal> {
        Ok(self.store.ping().await?)
    }

    pub async fn close(&self) {
        self.store.close().await;
    }
}

#[async_trait]
impl GroupAccess for Groups {
    async fn readable_from(&self, uid: &UserId, group: u64) -> Result<u64, Refusal> {
        let snapshot = self.snapshot(group).await?;
        Ok(snapshot.member(uid)?.join_seq)
    }

    async fn groups_of(&self, uid: &UserId) -> Result<Vec<(u64, u64)>, Refusal> {
        Groups::groups_of(self, uid).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteGroupStore;
    use natter_record::sqlite::SqliteStore;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// Publishes nothing; holds events of `hold` until released, to keep a
    /// change in progress (its group's lock taken).
    #[derive(Default)]
    struct Held {
        hold: std::sync::Mutex<Option<u64>>,
        entered: Notify,
        release: Notify,
    }

    #[async_trait]
    impl Publisher for Held {
        async fn publish(&self, group: u64, _: GroupEvent, _: Vec<UserId>) -> Result<(), Refusal> {
            let held = *self.hold.lock().expect("lock") == Some(group);
            if held {
                self.entered.notify_one();
                self.release.notified().await;
            }
            Ok(())
        }
    }

    async fn groups(limits: GroupsConfig) -> (Arc<Groups>, Arc<Held>, Arc<SqliteGroupStore>) {
        let store = Arc::new(SqliteGroupStore::memory().await.expect("group store"));
        let messages = Arc::new(SqliteStore::memory().await.expect("message store"));
        let held = Arc::new(Held::default());
        let groups = Groups::new(store.clone(), messages, held.clone(), limits);
        (Arc::new(groups), held, store)
    }

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("a valid user id")
    }

    fn uids(ids: &[&str]) -> Vec<UserId> {
        ids.iter().map(|s| uid(s)).collect()
    }

    fn create(name: &str, members: &[&str], join_type: JoinType) -> CreateGroup {
        CreateGroup {
            name: name.into(),
            avatar: String::new(),
            join_type,
            members: uids(members),
        }
    }

    fn rename(name: &str) -> UpdateGroup {
        UpdateGroup {
            name: Some(name.into()),
            ..UpdateGroup::default()
        }
    }

    #[tokio::test]
    async fn a_change_in_progress_holds_up_its_own_group_only() {
        let (groups, held, _) = groups(GroupsConfig::default()).await;
        let owner = uid("owner");
        let a = groups
            .create(&owner, create("a", &["bob"], JoinType::Open))
            .await
            .expect("a");
        let b = groups
            .create(&owner, create("b", &["bob"], JoinType::Open))
            .await
            .expect("b");
        *held.hold.lock().expect("lock") = Some(a.id);
        let busy = {
            let (groups, owner) = (groups.clone(), owner.clone());
            tokio::spawn(async move { groups.update(&owner, a.id, rename("a2")).await })
        };
        held.entered.notified().await;
        // Group a's change is between its write and its event.
        tokio::time::timeout(
            Duration::from_secs(5),
            groups.update(&owner, b.id, rename("b2")),
        )
        .await
        .expect("another group's change does not wait for it")
        .expect("renamed");
        let waiting = {
            let (groups, owner) = (groups.clone(), owner.clone());
            tokio::spawn(async move { groups.update(&owner, a.id, rename("a3")).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "a's next change waits for the one in progress"
        );
        held.release.notify_one();
        busy.await.expect("task").expect("a2");
        *held.hold.lock().expect("lock") = None;
        let after = waiting.await.expect("task").expect("a3");
        assert_eq!(after.name, "a3", "changes of one group stay in order");
    }

    #[tokio::test]
    async fn creations_are_limited_per_hour_and_by_groups_owned() {
        let limits = GroupsConfig {
            max_owned: 2,
            creates_per_hour: 3,
            ..GroupsConfig::default()
        };
        let (groups, _, _) = groups(limits).await;
        let me = uid("me");
        let first = groups
            .create(&me, create("1", &[], JoinType::Open))
            .await
            .expect("1");
        groups
            .create(&me, create("2", &[], JoinType::Open))
            .await
            .expect("2");
        let owned = groups.create(&me, create("3", &[], JoinType::Open)).await;
        assert_eq!(
            owned.map(|_| ()).map_err(|e| e.code),
            Err(ErrorCode::QuotaExceeded)
        );
        groups
            .create(&uid("ME"), create("other", &[], JoinType::Open))
            .await
            .expect("others are not affected, even with the same letters in another case");
        groups.dissolve(&me, first.id).await.expect("dissolved");
        let third = groups
            .create(&me, create("3", &[], JoinType::Open))
            .await
            .expect("room again");
        // Owning fewer again, but three creations within the hour.
        groups.dissolve(&me, third.id).await.expect("dissolved");
        let hourly = groups.create(&me, create("4", &[], JoinType::Open)).await;
        assert_eq!(
            hourly.map(|_| ()).map_err(|e| e.code),
            Err(ErrorCode::RateLimited)
        );
    }

    #[tokio::test]
    async fn users_added_to_groups_are_limited_per_hour() {
        let limits = GroupsConfig {
            invites_per_hour: 5,
            ..GroupsConfig::default()
        };
        let (groups, _, _) = groups(limits).await;
        let me = uid("me");
        let g = groups
            .create(&me, create("g", &["u2", "u3", "u3"], JoinType::Open))
            .await
            .expect("2 added");
        let too_many = groups
            .invite(&me, g.id, uids(&["u4", "u5", "u6", "u6", "u7"]))
            .await;
        assert_eq!(too_many.map_err(|e| e.code), Err(ErrorCode::RateLimited));
        assert_eq!(
            groups
                .invite(&me, g.id, uids(&["u6", "u4", "u5"]))
                .await
                .expect("3 left"),
            uids(&["u4", "u5", "u6"])
        );
        let none_left = groups.invite(&uid("u2"), g.id, uids(&["u8"])).await;
        assert!(
            none_left.is_ok(),
            "another member has an allowance of its own"
        );
        let mine = groups.invite(&me, g.id, uids(&["u9"])).await;
        assert_eq!(mine.map_err(|e| e.code), Err(ErrorCode::RateLimited));
    }

    /// An approval decides on the applications as they are when the change
    /// is made, not as they were before it waited for the group's lock: an
    /// application withdrawn meanwhile (here by another node, straight in the
    /// store) admits nobody.
    #[tokio::test]
    async fn an_approval_reads_the_applications_with_the_group() {
        let (groups, held, store) = groups(GroupsConfig::default()).await;
        let owner = uid("owner");
        let g = groups
            .create(&owner, create("g", &[], JoinType::Approval))
            .await
            .expect("g");
        assert!(
            !groups
                .join(&uid("u7"), g.id, "me".into())
                .await
                .expect("applied")
                .joined
        );
        *held.hold.lock().expect("lock") = Some(g.id);
        let busy = {
            let (groups, owner) = (groups.clone(), owner.clone());
            tokio::spawn(async move { groups.update(&owner, g.id, rename("g2")).await })
        };
        held.entered.notified().await;
        let decide = {
            let (groups, owner) = (groups.clone(), owner.clone());
            tokio::spawn(async move { groups.decide(&owner, g.id, &uid("u7"), true).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let version = store.version(g.id).await.expect("read").expect("group");
        assert!(store
            .write(g.id, version, &[Change::RemoveApplication(uid("u7"))])
            .await
            .expect("withdrawn"));
        *held.hold.lock().expect("lock") = None;
        held.release.notify_one();
        busy.await.expect("task").expect("renamed");
        let decided = decide.await.expect("task");
        assert_eq!(decided.map_err(|e| e.code), Err(ErrorCode::NotFound));
        let members = store.members(g.id).await.expect("members");
        assert!(members.iter().all(|m| m.uid != "u7"), "nobody was admitted");
    }

    /// Ids that differ only in case are two users: both join, each is a
    /// member in its own right, and removing one leaves the other.
    #[tokio::test]
    async fn ids_differing_only_in_case_are_two_members() {
        let (groups, _, _) = groups(GroupsConfig::default()).await;
        let owner = uid("owner");
        let g = groups
            .create(&owner, create("g", &["alice"], JoinType::Open))
            .await
            .expect("g");
        assert!(
            groups
                .join(&uid("Alice"), g.id, String::new())
                .await
                .expect("Alice is not alice")
                .joined
        );
        let page = groups
            .members(&owner, g.id, None, 10)
            .await
            .expect("members");
        let listed: Vec<&str> = page.members.iter().map(|m| m.uid.as_str()).collect();
        assert_eq!(listed, ["Alice", "alice", "owner"]);
        groups
            .kick(&owner, g.id, &uid("alice"))
            .await
            .expect("kicked");
        groups
            .check_send(&uid("Alice"), g.id)
            .await
            .expect("Alice is still a member");
        let gone = groups.check_send(&uid("alice"), g.id).await;
        assert_eq!(
            gone.map(|_| ()).map_err(|e| e.code),
            Err(ErrorCode::NotMember)
        );
    }

    /// Member pages follow the uids byte for byte ("B" before "a"), and each
    /// page's `next_after` resumes exactly where it stopped.
    #[tokio::test]
    async fn member_pages_are_ordered_by_uid_byte_for_byte() {
        let (groups, _, _) = groups(GroupsConfig::default()).await;
        let owner = uid("Z");
        let g = groups
            .create(
                &owner,
                create("g", &["a", "B", "b", "A", "_", "0"], JoinType::Open),
            )
            .await
            .expect("g");
        let mut seen = Vec::new();
        let mut after: Option<UserId> = None;
        loop {
            let page = groups
                .members(&owner, g.id, after.as_ref(), 2)
                .await
                .expect("page");
            assert!(page.members.len() <= 2);
            seen.extend(page.members.iter().map(|m| m.uid.to_string()));
            match page.next_after {
                Some(next) => {
                    assert_eq!(Some(&next), page.members.last().map(|m| &m.uid));
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, ["0", "A", "B", "Z", "_", "a", "b"]);
        // A cursor that is no member's uid still pages from its place.
        let page = groups
            .members(&owner, g.id, Some(&uid("C")), 2)
            .await
            .expect("page");
        let listed: Vec<&str> = page.members.iter().map(|m| m.uid.as_str()).collect();
        assert_eq!(listed, ["Z", "_"]);
        assert_eq!(page.next_after, Some(uid("_")));
        // The last page, exactly full, says so.
        let last = groups
            .members(&owner, g.id, Some(&uid("_")), 2)
            .await
            .expect("page");
        assert_eq!(last.members.len(), 2);
        assert_eq!(last.next_after, None);
    }

    /// Events name users by their ids as given.
    #[tokio::test]
    async fn events_name_users_as_strings() {
        #[derive(Default)]
        struct Record(std::sync::Mutex<Vec<(GroupEvent, Vec<UserId>)>>);
        #[async_trait]
        impl Publisher for Record {
            async fn publish(
                &self,
                _: u64,
                event: GroupEvent,
                audience: Vec<UserId>,
            ) -> Result<(), Refusal> {
                self.0.lock().expect("lock").push((event, audience));
                Ok(())
            }
        }
        let store = Arc::new(SqliteGroupStore::memory().await.expect("group store"));
        let messages = Arc::new(SqliteStore::memory().await.expect("message store"));
        let record = Arc::new(Record::default());
        let groups = Groups::new(store, messages, record.clone(), GroupsConfig::default());
        let owner = uid("first.last@example.com");
        let g = groups
            .create(&owner, create("g", &["Bob"], JoinType::Open))
            .await
            .expect("g");
        groups
            .kick(&owner, g.id, &uid("Bob"))
            .await
            .expect("kicked");
        let events = record.0.lock().expect("lock").clone();
        let kinds: Vec<(&str, &str, Vec<String>)> = events
            .iter()
            .map(|(e, _)| (e.kind.as_str(), e.actor.as_str(), e.targets.clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("created", "first.last@example.com", vec!["Bob".to_string()]),
                ("kicked", "first.last@example.com", vec!["Bob".to_string()]),
            ]
        );
        assert_eq!(
            events[1].1,
            uids(&["Bob", "first.last@example.com"]),
            "the kicked member hears of it too"
        );
    }

    #[test]
    fn names_must_show_something_and_hide_nothing() {
        for bad in [
            "",
            "   ",
            "\u{200B}",
            "\u{200B}\u{200D}",
            "a\u{202E}b",
            "a\u{0}b",
            "a\nb",
            "a\u{2066}b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} refused");
        }
        for good in [
            "team",
            "チーム",
            "a b",
            "👨\u{200D}👩\u{200D}👧",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
            "می\u{200C}خواهم",
        ] {
            assert!(check_name(good).is_ok(), "{good:?} accepted");
        }
        assert!(check_text("message", "line one\nline two\tend").is_ok());
        assert!(check_text("message", "a\u{202E}b").is_err());
        assert!(check_text("message", "a\u{7}b").is_err());
    }
}
