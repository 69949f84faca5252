//! The logic role: token checks, the sessions directory and the message
//! pipeline (check → dedupe → id → store → ack → route → push).
//!
//! Gateways call logic through [`LogicService`]; logic reaches gateways
//! through [`Gateway`]. Both are traits, so the pipeline does not know whether
//! it runs in one process or across machines. Logic holds no sockets and
//! knows no frame bytes beyond the protobuf bodies it fills in.

pub mod admin;
pub mod auth;
pub mod conversations;
pub mod fanout;
pub mod publish;
pub mod redis_sessions;
pub mod sessions;
pub mod verify;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use natter_group::Groups;
use natter_node::config::{ConversationsConfig, LimitsConfig};
use natter_node::ids::MidGenerator;
use natter_node::telemetry::register;
use natter_proto::msg::{GroupCursor, MessageReply, SendMessage, SyncReply, SyncRequest};
use natter_proto::{ErrorCode, Op, UserId};
use natter_record::store::{GroupAck, NewMessage, Outcome, PageLimit, Peer, Stored, Write, MAX_ID};
use natter_record::{Committer, MessageStore};
use natter_roles::Authenticate;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use prost::Message as _;

pub use auth::Auth;
pub use conversations::Receipts;
pub use fanout::{Audience, Fanout};
pub use natter_roles::{
    Acked, Connected, Gateway, Identity, LogicService, Push, PushBatch, Refusal, Route, Session,
    Target, Tokens,
};
pub use publish::GroupPublisher;
pub use sessions::{MemoryDirectory, SessionDirectory};
pub use verify::{Verified, VerifyError, VerifyUrl};

struct Metrics {
    messages: IntCounterVec,
    auths: IntCounterVec,
    acks_dropped: IntCounter,
}

/// What [`Logic::new`] is built from.
pub struct LogicParts {
    /// Who tokens name (see [`Auth`]).
    pub auth: Arc<dyn Authenticate>,
    pub fanout: Arc<Fanout>,
    pub store: Arc<dyn MessageStore>,
    pub committer: Committer,
    pub ids: Arc<MidGenerator>,
    pub groups: Arc<Groups>,
    /// `[conversations]`: revoke and edit windows, read detail, typing limits.
    pub conversations: ConversationsConfig,
}

/// The logic role.
pub struct Logic {
    auth: Arc<dyn Authenticate>,
    fanout: Arc<Fanout>,
    store: Arc<dyn MessageStore>,
    committer: Committer,
    ids: Arc<MidGenerator>,
    groups: Arc<Groups>,
    limiter: natter_node::limit::RateLimiter,
    /// Typing notices per user.
    typing_limiter: natter_node::limit::RateLimiter,
    conversations: ConversationsConfig,
    /// Stored bytes per sync page at most (`limits.page_bytes`).
    page_bytes: usize,
    metrics: Metrics,
}

impl Logic {
    pub fn new(parts: LogicParts, limits: &LimitsConfig, registry: &Registry) -> Logic {
        let LogicParts {
            auth,
            fanout,
            store,
            committer,
            ids,
            groups,
            conversations,
        } = parts;
        let metrics = Metrics {
            messages: register(
                registry,
                IntCounterVec::new(
                    Opts::new("natter_messages_total", "Messages received, by outcome."),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
            auths: register(
                registry,
                IntCounterVec::new(
                    Opts::new("natter_auth_total", "Authentications, by outcome."),
                    &["outcome"],
                )
                .expect("valid counter"),
            ),
            acks_dropped: register(
                registry,
                IntCounter::new(
                    "natter_push_acks_dropped_total",
                    "Push-acks not recorded because the write queue was full.",
                )
                .expect("valid counter"),
            ),
        };
        Logic {
            auth,
            fanout,
            store,
            committer,
            ids,
            groups,
            limiter: natter_node::limit::RateLimiter::new(
                limits.messages_per_sec,
                limits.message_burst,
            ),
            typing_limiter: natter_node::limit::RateLimiter::new(
                conversations.typing_per_sec,
                conversations.typing_burst,
            ),
            conversations,
            page_bytes: limits.page_bytes,
            metrics,
        }
    }

    /// Makes a gateway node reachable for pushes.
    pub fn attach_gateway(&self, node: &str, gateway: Arc<dyn Gateway>) {
        self.fanout.attach_gateway(node, gateway);
    }

    /// Forgets a gateway node that left.
    pub fn detach_gateway(&self, node: &str) {
        self.fanout.detach_gateway(node);
    }

    fn gateway(&self, node: &str) -> Option<Arc<dyn Gateway>> {
        self.fanout.gateway(node)
    }

    fn directory_failed(&self, e: sessions::DirectoryError) -> Refusal {
        self.fanout.directory_failed();
        tracing::error!(error = %e, "sessions directory failed");
        Refusal::new(ErrorCode::Internal, "sessions directory unavailable")
    }

    /// Pushes a stored message to every online device of the receiver and
    /// to the sender's devices other than the one it came from.
    async fn route(&self, stored: &Stored, from: &Session, acked_at: Instant) {
        let m = &stored.message;
        let Peer::User(receiver) = &m.to else {
            return;
        };
        let sessions = self.fanout.sessions();
        let mut targets = match sessions.lookup(receiver).await {
            Ok(sessions) => sessions
                .into_iter()
                .map(|s| (s, stored.receiver_seq))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.fanout.directory_failed();
                // The receiver syncs on reconnect; nothing acked is lost.
                tracing::warn!(error = %e, mid = m.mid, "receiver lookup failed; relying on sync");
                Vec::new()
            }
        };
        if *receiver != m.sender {
            match sessions.lookup(&m.sender).await {
                Ok(sessions) => {
                    targets.extend(sessions.into_iter().map(|s| (s, stored.sender_seq)))
                }
                Err(e) => {
                    self.fanout.directory_failed();
                    tracing::warn!(error = %e, mid = m.mid, "sender lookup failed; relying on sync")
                }
            }
        }
        targets.retain(|(s, _)| !(s.node == from.node && s.conn == from.conn));
        // One body per stream position (the receiver's and the sender's).
        let mut pushes: Vec<Push> = Vec::with_capacity(2);
        let mut ranged = Vec::with_capacity(targets.len());
        for (session, user_seq) in targets {
            let index = match pushes.iter().position(|p| p.seq == user_seq) {
                Some(index) => index,
                None => {
                    pushes.push(Push {
                        op: Op::Push,
                        mid: m.mid,
                        group: 0,
                        seq: user_seq,
                        body: Bytes::from(m.to_proto(user_seq).encode_to_vec()),
                        acked_at,
                    });
                    pushes.len() - 1
                }
            } as u32;
            ranged.push((Route::from(session), index, index + 1));
        }
        self.fanout.push(pushes, ranged);
    }

    /// Queues a stored group message for every online device of the group's
    /// members as they are now (one body for all), except the sending
    /// connection; it leaves with the group's next batch.
    async fn route_group(&self, stored: &Stored, from: &Session, acked_at: Instant) {
        let m = &stored.message;
        let Peer::Group(group) = m.to else {
            return;
        };
        // Read after the commit: a member removed meanwhile gets nothing.
        let snapshot = match self.groups.snapshot(group).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(error = %e, group, mid = m.mid, "group look-up failed; members will sync");
                return;
            }
        };
        let push = Push {
            op: Op::Push,
            mid: m.mid,
            group,
            seq: m.conv_seq,
            body: Bytes::from(m.to_proto(0).encode_to_vec()),
            acked_at,
        };
        self.fanout
            .to_group(group, push, Audience::Members(snapshot), Some(from))
            .await;
    }

    /// The sending half of a group message: rules, then store, then fan-out.
    async fn send_group(
        &self,
        from: &Session,
        message: SendMessage,
    ) -> Result<MessageReply, Refusal> {
        let count = |outcome: &str| self.metrics.messages.with_label_values(&[outcome]).inc();
        let group = message.group;
        if !message.receiver.is_empty() {
            count("invalid");
            return Err(Refusal::new(
                ErrorCode::InvalidMessage,
                "set receiver or group, not both",
            ));
        }
        if let Err(e) = self.groups.check_send(&from.uid, group).await {
            count(e.code.as_str());
            return Err(e);
        }
        if let Err(e) = self
            .check_change(from, &Peer::Group(group), message.body.as_ref())
            .await
        {
            count(e.code.as_str());
            return Err(e);
        }
        let new = self.new_message(from, message, Peer::Group(group), &count)?;
        let stored = self.store_write(Write::Message(new), &count).await?;
        count(if stored.repeat { "repeat" } else { "ok" });
        let acked_at = Instant::now();
        self.route_group(&stored, from, acked_at).await;
        let m = &stored.message;
        tracing::debug!(
            mid = m.mid,
            sender = %m.sender,
            group,
            repeat = stored.repeat,
            "group message stored"
        );
        Ok(stored.reply())
    }

    /// The steps every message takes before it is stored: the sender's rate
    /// limit, the envelope's check, and its time-ordered id.
    fn new_message(
        &self,
        from: &Session,
        message: SendMessage,
        to: Peer,
        count: &(dyn Fn(&str) + Sync),
    ) -> Result<NewMessage, Refusal> {
        if !self.limiter.allow(&from.uid) {
            count("rate_limited");
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many messages; slow down",
            ));
        }
        self.envelope(from, message, to, count)
    }

    /// The envelope's check and the message's time-ordered id.
    fn envelope(
        &self,
        from: &Session,
        message: SendMessage,
        to: Peer,
        count: &(dyn Fn(&str) + Sync),
    ) -> Result<NewMessage, Refusal> {
        let body = message.body.unwrap_or_default();
        let msg_type = body.validate().map_err(|reason| {
            count("invalid");
            Refusal::new(ErrorCode::InvalidMessage, reason)
        })?;
        let mid = self.ids.next();
        Ok(NewMessage {
            mid,
            time_ms: natter_node::ids::mid_time_ms(mid),
            sender: from.uid.clone(),
            sender_device: from.device.clone(),
            client_seq: message.client_seq,
            to,
            msg_type: msg_type as u32,
            content: body.encode_to_vec(),
        })
    }

    /// Commits one message write and waits for its outcome.
    async fn store_write(
        &self,
        write: Write,
        count: &(dyn Fn(&str) + Sync),
    ) -> Result<Stored, Refusal> {
        match self.committer.write(write).await {
            Ok(Outcome::Stored(stored)) => Ok(stored),
            Ok(Outcome::Reused) => {
                count("invalid");
                Err(Refusal::new(
                    ErrorCode::InvalidMessage,
                    "client_seq was already used for a message to someone else",
                ))
            }
            Ok(Outcome::Done | Outcome::Read(_)) => {
                count("error");
                Err(Refusal::new(
                    ErrorCode::Internal,
                    "store answered without a message",
                ))
            }
            Err(e) => {
                count("error");
                Err(e.into())
            }
        }
    }

    fn storage(e: natter_record::StoreError) -> Refusal {
        tracing::error!(error = %e, "sync failed");
        Refusal::new(ErrorCode::Internal, "storage unavailable")
    }

    /// One page of a group's messages after the device's position.
    async fn sync_group(
        &self,
        uid: &UserId,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Refusal> {
        let group = request.group;
        let snapshot = self.groups.snapshot(group).await?;
        let Some(member) = snapshot.members.get(uid) else {
            return Err(Refusal::new(
                ErrorCode::NotMember,
                format!("not a member of group {group}"),
            ));
        };
        let after = match request.after {
            Some(after) if after > MAX_ID => {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "after must be at most 2^63-1",
                ));
            }
            Some(after) => {
                // Nothing before the member's join point: the stored cursor
                // starts there, so acks of later pushes can advance it.
                let after = after.max(member.join_seq.saturating_sub(1));
                let write = Write::SetCursor {
                    owner: uid.clone(),
                    device: device.into(),
                    group,
                    cursor: after,
                };
                self.committer.enqueue(write).await?;
                after
            }
            None => self
                .store
                .cursor(uid, device, group)
                .await
                .map_err(Logic::storage)?,
        };
        let after = after.max(member.join_seq.saturating_sub(1));
        let page = self
            .store
            .group_sync(group, after, self.page_limit(request.limit))
            .await
            .map_err(Logic::storage)?;
        Ok(SyncReply {
            has_more: page.more,
            cursor: page.items.last().map(|m| m.conv_seq).unwrap_or(after),
            messages: page.items.iter().map(|m| m.to_proto(0)).collect(),
            groups: Vec::new(),
            group,
        })
    }

    /// The caller's groups with messages past this device's cursor for them.
    async fn unreceived_groups(
        &self,
        uid: &UserId,
        device: &str,
    ) -> Result<Vec<GroupCursor>, Refusal> {
        let mine = self.groups.groups_of(uid).await?;
        if mine.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<u64> = mine.iter().map(|(g, _)| *g).collect();
        let seqs = self.store.group_seqs(&ids).await.map_err(Logic::storage)?;
        let cursors = self
            .store
            .group_cursors(uid, device, &ids)
            .await
            .map_err(Logic::storage)?;
        let mut out = Vec::new();
        for (((group, join_seq), last_seq), cursor) in mine.into_iter().zip(seqs).zip(cursors) {
            if last_seq < join_seq {
                continue;
            }
            // A device holds nothing from before its user joined.
            let cursor = cursor.max(join_seq.saturating_sub(1));
            if last_seq > cursor {
                out.push(GroupCursor {
                    group,
                    last_seq,
                    cursor,
                });
            }
        }
        Ok(out)
    }
}

impl Logic {
    /// A sync page: the messages asked for (0 means 100, at most 500), and
    /// at most `limits.page_bytes` of them, so one `SyncReply` (which waits
    /// in the connection's send queue) stays small whatever the messages.
    fn page_limit(&self, requested: u32) -> PageLimit {
        let count = match requested {
            0 => 100,
            n => n.min(500),
        };
        PageLimit::new(count, self.page_bytes)
    }
}

#[async_trait]
impl LogicService for Logic {
    async fn read(
        &self,
        from: &Session,
        conversation: &str,
        seq: u64,
    ) -> Result<natter_proto::msg::ReadReply, Refusal> {
        self.mark_read(from, conversation, seq).await
    }

    async fn typing(&self, from: &Session, conversation: &str) -> Result<(), Refusal> {
        self.send_typing(from, conversation).await
    }

    async fn connect(
        &self,
        token: &str,
        device: &str,
        node: &str,
        conn: u64,
    ) -> Result<Connected, Refusal> {
        let device = (!device.is_empty()).then_some(device);
        let identity = match self.auth.authenticate(token, device).await {
            Ok(identity) => identity,
            Err(refusal) => {
                self.metrics
                    .auths
                    .with_label_values(&[refusal.code.as_str()])
                    .inc();
                return Err(refusal);
            }
        };
        let cursor = self
            .store
            .cursor(&identity.uid, &identity.device, 0)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cursor lookup failed");
                Refusal::new(ErrorCode::Internal, "storage unavailable")
            })?;
        let session = Session {
            uid: identity.uid.clone(),
            device: identity.device.clone(),
            node: Arc::from(node),
            conn,
        };
        let replaced = self
            .fanout
            .sessions()
            .register(session)
            .await
            .map_err(|e| self.directory_failed(e))?;
        if let Some(old) = replaced.filter(|old| !(&*old.node == node && old.conn == conn)) {
            if let Some(gateway) = self.gateway(&old.node) {
                gateway.kick(
                    old.conn,
                    ErrorCode::Replaced,
                    "the same device connected again",
                );
            }
        }
        self.metrics.auths.with_label_values(&["ok"]).inc();
        Ok(Connected { identity, cursor })
    }

    async fn disconnect(&self, session: &Session) {
        if let Err(e) = self.fanout.sessions().unregister(session).await {
            self.fanout.directory_failed();
            tracing::warn!(error = %e, uid = %session.uid, "unregister failed");
        }
    }

    async fn heartbeat(&self, sessions: &[Session]) {
        if let Err(e) = self.fanout.sessions().renew(sessions).await {
            self.fanout.directory_failed();
            tracing::warn!(error = %e, sessions = sessions.len(), "session renewal failed");
        }
    }

    async fn send(&self, from: &Session, message: SendMessage) -> Result<MessageReply, Refusal> {
        let count = |outcome: &str| self.metrics.messages.with_label_values(&[outcome]).inc();
        if message.client_seq == 0 || message.client_seq > MAX_ID {
            count("invalid");
            return Err(Refusal::new(
                ErrorCode::InvalidMessage,
                "client_seq must be between 1 and 2^63-1",
            ));
        }
        if message.group != 0 {
            return self.send_group(from, message).await;
        }
        let receiver = match UserId::parse(&message.receiver) {
            Ok(receiver) => receiver,
            Err(e) => {
                count("invalid");
                return Err(Refusal::new(
                    ErrorCode::InvalidMessage,
                    format!("receiver: {e}"),
                ));
            }
        };
        let to = Peer::User(receiver);
        if let Err(e) = self.check_change(from, &to, message.body.as_ref()).await {
            count(e.code.as_str());
            return Err(e);
        }
        let new = self.new_message(from, message, to, &count)?;
        let stored = self.store_write(Write::Message(new), &count).await?;
        count(if stored.repeat { "repeat" } else { "ok" });
        let acked_at = Instant::now();
        // A repeat is pushed again: the first attempt may have stopped between
        // store and push, and receivers drop duplicates by mid.
        self.route(&stored, from, acked_at).await;
        let m = &stored.message;
        tracing::debug!(
            mid = m.mid,
            sender = %m.sender,
            receiver = ?m.to.user(),
            repeat = stored.repeat,
            "message stored"
        );
        Ok(stored.reply())
    }

    async fn push_acked(&self, uid: &UserId, device: &str, acked: &[Acked]) {
        // In a group, the positions before the member's join point count as
        // held (from the cached group only: this must not wait on storage).
        // An ack usually covers a run of pushes of one stream.
        let mut floor = (u64::MAX, 0);
        let mut group_acks = Vec::with_capacity(acked.len());
        let mut writes = Vec::new();
        let received = |group, seq, floor| Write::Received {
            owner: uid.clone(),
            device: device.into(),
            group,
            seq,
            floor,
        };
        for a in acked {
            // Transient notifies (read receipts, typing) hold no position.
            if a.seq == 0 {
                continue;
            }
            if a.group == 0 {
                writes.push(received(0, a.seq, 0));
                continue;
            }
            if floor.0 != a.group {
                let join = self.groups.cached_join_seq(a.group, uid);
                floor = (a.group, join.map(|j| j.saturating_sub(1)).unwrap_or(0));
            }
            group_acks.push(GroupAck {
                group: a.group,
                seq: a.seq,
                floor: floor.1,
            });
        }
        // Most group acks only move cursors the store keeps in memory: done
        // here, all at once, without waking the committer. (One that
        // overtakes a queued `SetCursor` of the same device can only leave
        // the cursor lower than it could be: the device is sent a message
        // again, never skipped.)
        if !group_acks.is_empty() && !self.store.received_now(uid, device, &group_acks) {
            writes.extend(group_acks.iter().map(|a| received(a.group, a.seq, a.floor)));
        }
        // Never wait on storage here: the caller is a connection's control
        // loop. A dropped ack costs only a cursor update; the device's next
        // sync sets its cursor anyway.
        for write in writes {
            if let Err(e) = self.committer.try_enqueue(write) {
                self.metrics.acks_dropped.inc();
                tracing::debug!(error = %e, "push ack not recorded");
            }
        }
    }

    async fn sync(
        &self,
        uid: &UserId,
        device: &str,
        request: SyncRequest,
    ) -> Result<SyncReply, Refusal> {
        if request.group != 0 {
            return self.sync_group(uid, device, request).await;
        }
        let storage = Logic::storage;
        let after = match request.after {
            Some(after) if after > MAX_ID => {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "after must be at most 2^63-1",
                ));
            }
            Some(after) => {
                // The device vouches for everything up to `after`.
                let write = Write::SetCursor {
                    owner: uid.clone(),
                    device: device.into(),
                    group: 0,
                    cursor: after,
                };
                self.committer.enqueue(write).await?;
                after
            }
            None => self.store.cursor(uid, device, 0).await.map_err(storage)?,
        };
        let page = self
            .store
            .sync(uid, after, self.page_limit(request.limit))
            .await
            .map_err(storage)?;
        let has_more = page.more;
        // With the last page of the stream: which groups to sync next.
        let groups = if has_more {
            Vec::new()
        } else {
            // A group problem must not fail the one-to-one stream: the
            // groups are listed again on the next sync.
            match self.unreceived_groups(uid, device).await {
                Ok(groups) => groups,
                Err(e) => {
                    tracing::warn!(%uid, error = %e.message, "groups not listed in sync");
                    Vec::new()
                }
            }
        };
        Ok(SyncReply {
            groups,
            group: 0,
            has_more,
            cursor: page.items.last().map(|i| i.user_seq).unwrap_or(after),
            messages: page
                .items
                .iter()
                .map(|i| i.message.to_proto(i.user_seq))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests;
