//! Conversations: who may act on one, read cursors and their receipts,
//! revoke and edit rules, typing notices, the conversation list and
//! settings.
//!
//! A conversation is `p:{a}:{b}` (its two users) or `g:{group}` (the
//! group's members, each from its join point). Every operation here first
//! finds the caller's place in it ([`Place`]); someone outside gets
//! `forbidden` (one-to-one) or `not_member` (groups), and nothing happens.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use natter_group::Snapshot;
use natter_proto::api::Role;
use natter_proto::msg::{
    Content, MessageBody, MessageType, Notify, ReadReceipt, ReadReply, TypingNotice, NOTIFY_READ,
    NOTIFY_TYPING,
};
use natter_proto::{ErrorCode, Op, UserId};
use natter_record::store::{
    group_conversation, parse_group_conversation, parse_p2p_conversation, ConversationEntry,
    ConversationQuery, ListKey, Outcome, Page, Peer, ReadState, Reader, Settings, SettingsChange,
    StoredMessage, Write, MAX_ID,
};
use prost::Message as _;

use crate::{Logic, Push, Refusal, Route, Session};

/// The caller's place in a conversation.
pub(crate) enum Place {
    /// One of the two users of a one-to-one conversation; `peer` is the other.
    Pair { peer: UserId },
    /// A member of a group.
    Member {
        snapshot: Arc<Snapshot>,
        join_seq: u64,
        role: Role,
    },
}

impl Place {
    /// Positions that count as read already: a member's join point minus one.
    fn floor(&self) -> u64 {
        match self {
            Place::Pair { .. } => 0,
            Place::Member { join_seq, .. } => join_seq.saturating_sub(1),
        }
    }
}

/// Users in the read detail of a group message, at most.
const MAX_READERS: u32 = 100_000;

/// Who has read one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipts {
    pub conversation: String,
    pub mid: u64,
    pub conv_seq: u64,
    /// Users other than the sender whose read cursor is at the message or past it.
    pub read_count: u64,
    /// Those users, with their cursors: for one-to-one conversations and
    /// groups of up to `conversations.receipt_detail_max_members` members;
    /// `None` for larger groups (counts only).
    pub readers: Option<Vec<Reader>>,
}

impl Logic {
    /// The caller's place in `conversation`, or why it has none.
    pub(crate) async fn place(&self, uid: &UserId, conversation: &str) -> Result<Place, Refusal> {
        if let Some(group) = parse_group_conversation(conversation) {
            let snapshot = self.groups.snapshot(group).await?;
            let Some(member) = snapshot.members.get(uid) else {
                return Err(Refusal::new(
                    ErrorCode::NotMember,
                    format!("not a member of group {group}"),
                ));
            };
            let (join_seq, role) = (member.join_seq, member.role);
            return Ok(Place::Member {
                snapshot,
                join_seq,
                role,
            });
        }
        let Some((a, b)) = parse_p2p_conversation(conversation) else {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("{conversation:?} is not a conversation id"),
            ));
        };
        match uid {
            uid if *uid == a => Ok(Place::Pair { peer: b }),
            uid if *uid == b => Ok(Place::Pair { peer: a }),
            _ => Err(Refusal::new(
                ErrorCode::Forbidden,
                "not a member of this conversation",
            )),
        }
    }

    /// Checks a revoke or an edit before it is stored: the target is a
    /// message of the same conversation, in a state that allows it, and
    /// the caller may change it now. `to` is where the change is sent.
    pub(crate) async fn check_change(
        &self,
        from: &Session,
        to: &Peer,
        body: Option<&MessageBody>,
    ) -> Result<(), Refusal> {
        let (target, edit) = match body.and_then(|b| b.content.as_ref()) {
            Some(Content::Revoke(r)) => (r.mid, false),
            Some(Content::Edit(e)) => (e.mid, true),
            _ => return Ok(()),
        };
        let conversation = match to {
            Peer::User(receiver) => from.uid.conversation_with(receiver),
            Peer::Group(group) => group_conversation(*group),
        };
        let missing = || {
            Refusal::new(
                ErrorCode::NotFound,
                format!("no message {target} in {conversation}"),
            )
        };
        if target > MAX_ID {
            return Err(missing());
        }
        let message: StoredMessage = self
            .store
            .message(target)
            .await
            .map_err(Logic::storage)?
            .filter(|m| m.conversation == conversation)
            .ok_or_else(missing)?;
        // A group member who joined later never saw the message.
        let place = self.place(&from.uid, &conversation).await?;
        if message.conv_seq <= place.floor() {
            return Err(missing());
        }
        let kind = MessageType::from_u32(message.msg_type);
        if !kind.is_some_and(MessageType::counts_as_unread) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "group events, revokes and edits cannot be revoked or edited",
            ));
        }
        // Revoking again changes nothing and is accepted: a client resending
        // a revoke it sent before must get the same answer (the store finds
        // it by its client_seq). An edit of a revoked message is refused.
        if edit && message.revoked_ms != 0 {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!("message {target} was revoked"),
            ));
        }
        let own = message.sender == from.uid;
        let age_ms = natter_node::ids::now_ms().saturating_sub(message.time_ms);
        let within = |secs: u64| secs == 0 || age_ms <= (secs as i64).saturating_mul(1000);
        if edit {
            if !own {
                return Err(Refusal::new(
                    ErrorCode::Forbidden,
                    "only the sender may edit a message",
                ));
            }
            if kind != Some(MessageType::Text) {
                return Err(Refusal::new(
                    ErrorCode::BadRequest,
                    "only text messages can be edited",
                ));
            }
            if !within(self.conversations.edit_window_secs) {
                return Err(Refusal::new(
                    ErrorCode::Forbidden,
                    format!(
                        "messages can be edited for {} s after sending",
                        self.conversations.edit_window_secs
                    ),
                ));
            }
            return Ok(());
        }
        // Group owners and admins revoke any message, at any time: they
        // moderate. Everyone else revokes their own, within the window.
        if let Place::Member { role, .. } = &place {
            if matches!(role, Role::Owner | Role::Admin) {
                return Ok(());
            }
        }
        if !own {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "only the sender (or a group's owner or admins) may revoke a message",
            ));
        }
        if !within(self.conversations.revoke_window_secs) {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!(
                    "messages can be revoked for {} s after sending",
                    self.conversations.revoke_window_secs
                ),
            ));
        }
        Ok(())
    }

    /// Moves the caller's read cursor of `conversation` to `seq` (never
    /// back); if it moved, tells the other party (one-to-one), the members
    /// (groups with read detail), and the caller's other devices.
    pub async fn mark_read(
        &self,
        from: &Session,
        conversation: &str,
        seq: u64,
    ) -> Result<ReadReply, Refusal> {
        if seq > MAX_ID {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "seq must be at most 2^63-1",
            ));
        }
        let place = self.place(&from.uid, conversation).await?;
        let write = Write::Read {
            owner: from.uid.clone(),
            conversation: conversation.to_string(),
            seq,
            floor: place.floor(),
        };
        let state: ReadState = match self.committer.write(write).await? {
            Outcome::Read(state) => state,
            _ => {
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    "store answered without a read state",
                ))
            }
        };
        if seq > state.last_seq {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "seq {seq} is past the conversation's newest message ({})",
                    state.last_seq
                ),
            ));
        }
        if state.moved {
            let receipt = ReadReceipt {
                conversation: conversation.to_string(),
                reader: from.uid.to_string(),
                seq: state.read_seq,
                time_ms: natter_node::ids::now_ms(),
            };
            let mut users = vec![from.uid.clone()];
            match &place {
                Place::Pair { peer } => users.push(peer.clone()),
                Place::Member { snapshot, .. }
                    if snapshot.members.len()
                        <= self.conversations.receipt_detail_max_members as usize =>
                {
                    users.extend(snapshot.members.keys().cloned())
                }
                Place::Member { .. } => {}
            }
            let notify = Notify {
                kind: NOTIFY_READ.into(),
                payload: receipt.encode_to_vec(),
                time_ms: receipt.time_ms,
            };
            self.notify(users, from, notify).await;
        }
        Ok(ReadReply {
            conversation: conversation.to_string(),
            read_seq: state.read_seq,
            unread: state.unread,
        })
    }

    /// Tells the other party, or the group's online members, that the
    /// caller is typing. Never stored; devices offline miss it.
    pub async fn send_typing(&self, from: &Session, conversation: &str) -> Result<(), Refusal> {
        if !self.typing_limiter.allow(from.uid.as_str()) {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many typing notices; slow down",
            ));
        }
        let users: Vec<UserId> = match self.place(&from.uid, conversation).await? {
            Place::Pair { peer } => vec![peer],
            Place::Member { snapshot, .. } => snapshot
                .members
                .keys()
                .filter(|u| **u != from.uid)
                .cloned()
                .collect(),
        };
        let notice = TypingNotice {
            conversation: conversation.to_string(),
            user: from.uid.to_string(),
            time_ms: natter_node::ids::now_ms(),
        };
        let notify = Notify {
            kind: NOTIFY_TYPING.into(),
            payload: notice.encode_to_vec(),
            time_ms: notice.time_ms,
        };
        self.notify(users, from, notify).await;
        Ok(())
    }

    /// Pushes a transient notify to the online devices of `users`, except
    /// the connection it came from. It has no place in any stream: its
    /// push-ack moves no cursor.
    async fn notify(&self, users: Vec<UserId>, from: &Session, notify: Notify) {
        let routes = match self.fanout.sessions().routes_of(&users).await {
            Ok(routes) => routes,
            Err(e) => {
                self.fanout.directory_failed();
                tracing::warn!(error = %e, kind = %notify.kind, "notify not sent");
                return;
            }
        };
        let targets: Vec<(Route, u32, u32)> = routes
            .into_iter()
            .filter(|r| !(r.node == from.node && r.conn == from.conn))
            .map(|r| (r, 0, 1))
            .collect();
        if targets.is_empty() {
            return;
        }
        let push = Push {
            op: Op::Notify,
            mid: 0,
            group: 0,
            seq: 0,
            body: Bytes::from(notify.encode_to_vec()),
            acked_at: Instant::now(),
        };
        self.fanout.push(vec![push], targets);
    }

    /// A page of the user's conversations, pinned first, then newest
    /// activity first.
    pub async fn conversations(
        &self,
        uid: &UserId,
        after: Option<ListKey>,
        limit: u32,
    ) -> Result<Page<ConversationEntry>, Refusal> {
        let groups = self.groups.groups_of(uid).await?;
        let query = ConversationQuery {
            owner: uid.clone(),
            groups,
            after,
            limit,
        };
        self.store
            .conversations(&query)
            .await
            .map_err(Logic::storage)
    }

    /// Changes the user's settings for a conversation the user is in.
    pub async fn set_settings(
        &self,
        uid: &UserId,
        conversation: &str,
        change: SettingsChange,
    ) -> Result<Settings, Refusal> {
        self.place(uid, conversation).await?;
        self.store
            .set_settings(uid, conversation, change)
            .await
            .map_err(Logic::storage)
    }

    /// The user's read state in a conversation the user is in.
    pub async fn read_state(&self, uid: &UserId, conversation: &str) -> Result<ReadState, Refusal> {
        let place = self.place(uid, conversation).await?;
        self.store
            .read_state(uid, conversation, place.floor())
            .await
            .map_err(Logic::storage)
    }

    /// Who has read message `mid` of `conversation`.
    pub async fn receipts(
        &self,
        uid: &UserId,
        conversation: &str,
        mid: u64,
    ) -> Result<Receipts, Refusal> {
        let place = self.place(uid, conversation).await?;
        let missing = || {
            Refusal::new(
                ErrorCode::NotFound,
                format!("no message {mid} in {conversation}"),
            )
        };
        let message = match mid {
            0..=MAX_ID => self.store.message(mid).await.map_err(Logic::storage)?,
            _ => None,
        }
        .filter(|m| m.conversation == conversation && m.conv_seq > place.floor())
        .ok_or_else(missing)?;
        let seq = message.conv_seq;
        let (read_count, readers) = match &place {
            Place::Pair { peer } => {
                let state = self
                    .store
                    .read_state(peer, conversation, 0)
                    .await
                    .map_err(Logic::storage)?;
                let other = if message.sender == *peer {
                    uid.clone()
                } else {
                    peer.clone()
                };
                let other_seq = if other == *peer {
                    state.read_seq
                } else {
                    self.store
                        .read_state(uid, conversation, 0)
                        .await
                        .map_err(Logic::storage)?
                        .read_seq
                };
                let readers: Vec<Reader> = (other_seq >= seq)
                    .then_some(Reader {
                        uid: other,
                        read_seq: other_seq,
                    })
                    .into_iter()
                    .collect();
                (readers.len() as u64, Some(readers))
            }
            Place::Member { snapshot, .. }
                if snapshot.members.len()
                    <= self.conversations.receipt_detail_max_members as usize =>
            {
                let readers: Vec<Reader> = self
                    .store
                    .readers(conversation, seq, MAX_READERS)
                    .await
                    .map_err(Logic::storage)?
                    .into_iter()
                    .filter(|r| r.uid != message.sender && snapshot.members.contains_key(&r.uid))
                    .collect();
                (readers.len() as u64, Some(readers))
            }
            Place::Member { .. } => {
                let count = self
                    .store
                    .read_count(conversation, seq)
                    .await
                    .map_err(Logic::storage)?;
                // The sender's cursor moved past its message when it sent it.
                let sender = self
                    .store
                    .read_state(&message.sender, conversation, 0)
                    .await
                    .map_err(Logic::storage)?;
                let sender_counted = u64::from(sender.read_seq >= seq);
                (count.saturating_sub(sender_counted), None)
            }
        };
        Ok(Receipts {
            conversation: conversation.to_string(),
            mid: message.mid,
            conv_seq: seq,
            read_count,
            readers,
        })
    }
}

/// Moves the read cursors the group store kept before version 2 into the
/// message store, where every conversation's cursor lives now: each is a
/// `Read` (which only moves a cursor forward, so a repeat after a crash
/// changes nothing), cleared in the group store once committed. Returns
/// how many moved; after the first run there are none.
pub async fn import_legacy_reads(
    groups: &dyn natter_group::GroupStore,
    committer: &natter_record::Committer,
) -> Result<u64, Refusal> {
    let mut moved = 0;
    loop {
        let reads = groups.legacy_reads(500).await?;
        if reads.is_empty() {
            return Ok(moved);
        }
        for (group, uid, seq) in &reads {
            let write = Write::Read {
                owner: uid.clone(),
                conversation: group_conversation(*group),
                seq: *seq,
                floor: 0,
            };
            committer.write(write).await?;
        }
        let done: Vec<(u64, UserId)> = reads.into_iter().map(|(g, u, _)| (g, u)).collect();
        groups.clear_legacy_reads(&done).await?;
        moved += done.len() as u64;
    }
}
