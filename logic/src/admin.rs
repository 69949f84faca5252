//! What the admin API asks of logic: a message sent on a user's (or the
//! system's) behalf through the ordinary pipeline, and closing every
//! connection of a user.

use std::sync::Arc;
use std::time::Instant;

use natter_proto::msg::{MessageBody, MessageReply, SendMessage};
use natter_proto::{ErrorCode, UserId};
use natter_record::store::{Peer, Write, MAX_ID};

use crate::{Logic, Refusal, Session};

/// The device an admin message is stored as sent from.
pub const ADMIN_DEVICE: &str = "admin";

/// Who an admin message is from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sender {
    /// A user, held to the rules a client of theirs is held to (a group's
    /// membership and mutes), but not to their message rate.
    User(UserId),
    /// The system sender (`admin.system_sender`): a notice, to a group
    /// whether or not it is a member.
    System(UserId),
}

impl Sender {
    fn uid(&self) -> &UserId {
        match self {
            Sender::User(uid) | Sender::System(uid) => uid,
        }
    }
}

impl Logic {
    /// Stores `body` from `from` to `to` and pushes it to every online device
    /// of both sides (a group: of its members), as a message sent from a
    /// client would be; answers once it is durable. The message's device is
    /// [`ADMIN_DEVICE`]; `client_seq` makes a retry store it once (absent:
    /// the message's own id, so each call is a new message).
    pub async fn send_as(
        &self,
        from: &Sender,
        to: Peer,
        body: MessageBody,
        client_seq: Option<u64>,
    ) -> Result<MessageReply, Refusal> {
        let count = |outcome: &str| self.metrics.messages.with_label_values(&[outcome]).inc();
        if client_seq.is_some_and(|seq| seq == 0 || seq > MAX_ID) {
            count("invalid");
            return Err(Refusal::new(
                ErrorCode::InvalidMessage,
                "client_seq must be between 1 and 2^63-1",
            ));
        }
        // A session on no gateway node: no connection is skipped by the push.
        let session = Session {
            uid: from.uid().clone(),
            device: ADMIN_DEVICE.into(),
            node: Arc::from(""),
            conn: 0,
        };
        if let Peer::Group(group) = &to {
            match from {
                Sender::User(uid) => {
                    if let Err(e) = self.groups.check_send(uid, *group).await {
                        count(e.code.as_str());
                        return Err(e);
                    }
                }
                Sender::System(_) => {
                    let snapshot = self.groups.snapshot(*group).await?;
                    if snapshot.group.dissolved {
                        count("group_dissolved");
                        return Err(Refusal::new(
                            ErrorCode::GroupDissolved,
                            format!("group {group} was dissolved"),
                        ));
                    }
                }
            }
        }
        let message = SendMessage {
            client_seq: client_seq.unwrap_or(0),
            body: Some(body),
            ..Default::default()
        };
        let mut new = self.envelope(&session, message, to, &count)?;
        if new.client_seq == 0 {
            new.client_seq = new.mid;
        }
        let stored = self.store_write(Write::Message(new), &count).await?;
        count(if stored.repeat { "repeat" } else { "ok" });
        let acked_at = Instant::now();
        match stored.message.to {
            Peer::User(_) => self.route(&stored, &session, acked_at).await,
            Peer::Group(_) => self.route_group(&stored, &session, acked_at).await,
        }
        let m = &stored.message;
        tracing::debug!(
            mid = m.mid,
            sender = %m.sender,
            repeat = stored.repeat,
            "admin message stored"
        );
        Ok(stored.reply())
    }

    /// Closes every open connection of `uid`, on whichever gateway node
    /// holds it, with `code` and `reason`; returns how many were asked to
    /// close. (A connection opening meanwhile is not seen.)
    pub async fn kick_user(
        &self,
        uid: &UserId,
        code: ErrorCode,
        reason: &str,
    ) -> Result<u32, Refusal> {
        let sessions = self
            .fanout
            .sessions()
            .lookup(uid)
            .await
            .map_err(|e| self.directory_failed(e))?;
        let mut closed = 0;
        for session in sessions {
            match self.gateway(&session.node) {
                Some(gateway) => {
                    gateway.kick(session.conn, code, reason);
                    closed += 1;
                }
                // A node that left: its connections are gone with it.
                None => tracing::warn!(node = %session.node, %uid, "session on an unknown gateway"),
            }
        }
        Ok(closed)
    }
}
