//! Group events: each is stored as a `group_event` message in the group's
//! history (so a member who was offline finds it on sync) and pushed to the
//! audience as a `Notify` whose payload is that message.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use natter_group::Publisher;
use natter_node::ids::MidGenerator;
use natter_proto::msg::{
    Content, GroupEvent, MessageBody, MessageType, Notify, NOTIFY_GROUP_EVENT,
};
use natter_proto::{ErrorCode, Op, UserId};
use natter_record::store::{NewMessage, Outcome, Peer, Write};
use natter_record::Committer;
use natter_roles::Refusal;
use prometheus::{IntCounterVec, Opts, Registry};
use prost::Message as _;

use crate::fanout::{Audience, Fanout};
use crate::Push;

/// The [`Publisher`] of the groups role.
pub struct GroupPublisher {
    committer: Committer,
    ids: Arc<MidGenerator>,
    fanout: Arc<Fanout>,
    events: IntCounterVec,
}

impl GroupPublisher {
    pub fn new(
        committer: Committer,
        ids: Arc<MidGenerator>,
        fanout: Arc<Fanout>,
        registry: &Registry,
    ) -> GroupPublisher {
        let events = natter_node::telemetry::register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "natter_group_events_total",
                    "Group events published, by kind and outcome.",
                ),
                &["kind", "outcome"],
            )
            .expect("valid counter"),
        );
        GroupPublisher {
            committer,
            ids,
            fanout,
            events,
        }
    }
}

/// Event kinds, for metric labels (an unknown kind is counted as `other`).
fn kind_label(kind: &str) -> &'static str {
    const KINDS: &[&str] = &[
        "created",
        "joined",
        "invited",
        "left",
        "kicked",
        "role_changed",
        "owner_transferred",
        "renamed",
        "avatar_changed",
        "join_type_changed",
        "muted",
        "unmuted",
        "mute_all",
        "unmute_all",
        "nickname_changed",
        "dissolved",
    ];
    KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("other")
}

#[async_trait]
impl Publisher for GroupPublisher {
    async fn publish(
        &self,
        group: u64,
        event: GroupEvent,
        audience: Vec<UserId>,
    ) -> Result<(), Refusal> {
        let kind = kind_label(&event.kind);
        let actor = UserId::parse(&event.actor).map_err(|e| {
            self.events.with_label_values(&[kind, "error"]).inc();
            Refusal::new(ErrorCode::Internal, format!("group event actor: {e}"))
        })?;
        let mid = self.ids.next();
        let body = MessageBody {
            content: Some(Content::GroupEvent(event.clone())),
        };
        // System messages have no device; the mid makes their dedupe key unique.
        let new = NewMessage {
            mid,
            time_ms: natter_node::ids::mid_time_ms(mid),
            sender: actor,
            sender_device: String::new(),
            client_seq: mid,
            to: Peer::Group(group),
            msg_type: MessageType::GroupEvent as u32,
            content: body.encode_to_vec(),
        };
        let stored = match self.committer.write(Write::Message(new)).await {
            Ok(Outcome::Stored(stored)) => stored,
            Ok(Outcome::Done | Outcome::Reused | Outcome::Read(_)) => {
                self.events.with_label_values(&[kind, "error"]).inc();
                return Err(Refusal::new(
                    ErrorCode::Internal,
                    "store answered without a message",
                ));
            }
            Err(e) => {
                self.events.with_label_values(&[kind, "error"]).inc();
                return Err(Refusal::new(ErrorCode::Internal, e.to_string()));
            }
        };
        // Users who left no longer count in the group's read receipts.
        if matches!(event.kind.as_str(), "left" | "kicked") {
            for target in &event.targets {
                let Ok(owner) = UserId::parse(target) else {
                    continue;
                };
                let forget = Write::Forget {
                    owner,
                    conversation: natter_record::store::group_conversation(group),
                };
                if let Err(e) = self.committer.write(forget).await {
                    tracing::warn!(error = %e, group, "read cursor of a member who left not removed");
                }
            }
        }
        let message = &stored.message;
        let notify = Notify {
            kind: NOTIFY_GROUP_EVENT.into(),
            payload: message.to_proto(0).encode_to_vec(),
            time_ms: message.time_ms,
        };
        let push = Push {
            op: Op::Notify,
            mid: message.mid,
            group,
            seq: message.conv_seq,
            body: Bytes::from(notify.encode_to_vec()),
            acked_at: Instant::now(),
        };
        self.fanout
            .to_group(group, push, Audience::users(audience), None)
            .await;
        self.events.with_label_values(&[kind, "ok"]).inc();
        Ok(())
    }
}
