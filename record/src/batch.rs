//! The part of a write batch every store shares: which rows a batch
//! touches, and the walk through it in memory that assigns sequence numbers,
//! folds repeats and moves device cursors. Stores load the state the walk
//! needs, run it, and write out what it returns.

use std::collections::{BTreeSet, HashMap};

use natter_proto::UserId;

use crate::store::*;

/// The columns of a message, as every store selects them (table alias `m`).
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.mid, m.conv_id, m.conv_seq, m.sender, m.sender_device, m.client_seq, m.receiver, m.msg_type, m.content, m.created_at, m.edited_at, m.revoked_at";

/// The smallest mid made at `time_ms`: every message older than that has a
/// smaller mid, so the expiry scan walks the primary key, not the table.
pub(crate) fn expiry_mid_bound(time_ms: i64) -> i64 {
    let elapsed = (time_ms - natter_node::ids::EPOCH_MS).max(0);
    elapsed.saturating_mul(1 << 22)
}

/// A device's sync position, kept gap-free: everything up to `contiguous` is
/// held by the device; `above` are positions it acknowledged past a gap. Only
/// `contiguous` is stored, so the stored cursor never passes a message the
/// device has not had.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeviceCursor {
    pub(crate) contiguous: u64,
    pub(crate) above: BTreeSet<u64>,
}

impl DeviceCursor {
    pub(crate) fn mark(&mut self, seq: u64) {
        if seq == self.contiguous + 1 && self.above.is_empty() {
            // The common case: the next position, no gap.
            self.contiguous = seq;
        } else if seq > self.contiguous {
            self.above.insert(seq);
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
            // A device that never closes its gap (it keeps acking pushes but
            // does not sync) must not grow this without end. Forgetting the
            // highest positions only holds the cursor back: it never passes
            // a message the device has not had.
            while self.above.len() > MAX_ABOVE {
                self.above.pop_last();
            }
        }
    }

    /// Everything up to `floor` counts as held (positions before a group
    /// member's join point, which are never delivered to it).
    pub(crate) fn raise_to(&mut self, floor: u64) {
        if floor > self.contiguous {
            self.contiguous = floor;
            self.above = self.above.split_off(&(floor + 1));
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        }
    }

    /// The device holds exactly up to `seq`, and vouches for nothing after it.
    pub(crate) fn set(&mut self, seq: u64) {
        self.contiguous = seq;
        self.above.clear();
    }
}

/// Positions past a gap a cursor remembers at most.
const MAX_ABOVE: usize = 1024;

/// A device's cursor of one stream: (owner, device, group), group 0 being
/// the owner's own stream.
pub(crate) type CursorKey = (UserId, String, u64);

/// The cursor a write moves, if any.
pub(crate) fn cursor_key(write: &Write) -> Option<CursorKey> {
    match write {
        // System messages (group events, notices) come from no device.
        Write::Message(m) if m.sender_device.is_empty() => None,
        Write::Message(m) => Some((
            m.sender.clone(),
            m.sender_device.clone(),
            m.to.group().unwrap_or(0),
        )),
        Write::Received {
            owner,
            device,
            group,
            ..
        }
        | Write::SetCursor {
            owner,
            device,
            group,
            ..
        } => Some((owner.clone(), device.clone(), *group)),
        Write::Read { .. } | Write::Forget { .. } => None,
    }
}

/// A dedupe key: (sender, sender device, client seq).
pub(crate) type Key<'a> = (&'a UserId, &'a str, u64);

/// A stored message's dedupe key, owned.
pub(crate) type DedupeKey = (UserId, String, u64);

/// A relation row: a message in one owner's stream.
pub(crate) struct RelationRow {
    pub(crate) owner: UserId,
    pub(crate) user_seq: u64,
    pub(crate) mid: u64,
    pub(crate) other: UserId,
    /// 1 outbox, 2 inbox.
    pub(crate) direction: i64,
    pub(crate) time_ms: i64,
}

/// Everything a batch touches, sorted and without repeats: conversations,
/// users' streams, and device cursors.
pub(crate) struct Touched {
    pub(crate) convs: Vec<String>,
    pub(crate) users: Vec<UserId>,
    pub(crate) devices: Vec<CursorKey>,
    /// The dedupe keys of the batch's messages.
    pub(crate) keys: Vec<DedupeKey>,
}

pub(crate) fn touched(writes: &[Write]) -> Touched {
    let mut convs = Vec::new();
    let mut users = Vec::new();
    let mut keys = Vec::new();
    let mut devices: Vec<CursorKey> = writes.iter().filter_map(cursor_key).collect();
    for w in writes {
        match w {
            Write::Message(m) => {
                match &m.to {
                    Peer::User(receiver) => {
                        convs.push(p2p_conversation(&m.sender, receiver));
                        users.extend([m.sender.clone(), receiver.clone()]);
                    }
                    Peer::Group(group) => convs.push(group_conversation(*group)),
                }
                keys.push((m.sender.clone(), m.sender_device.clone(), m.client_seq));
            }
            Write::Read { conversation, .. } => convs.push(conversation.clone()),
            Write::Received { .. } | Write::SetCursor { .. } | Write::Forget { .. } => {}
        }
    }
    convs.sort_unstable();
    convs.dedup();
    users.sort_unstable();
    users.dedup();
    devices.sort_unstable();
    devices.dedup();
    keys.sort_unstable();
    keys.dedup();
    Touched {
        convs,
        users,
        devices,
        keys,
    }
}

/// The outcome of a message whose dedupe key was seen before (earlier in
/// the batch or in the store): the earlier message again, or
/// [`Outcome::Reused`] when that one went to another conversation.
fn repeat(
    outcomes: &[Outcome],
    in_batch: &HashMap<Key<'_>, usize>,
    existing: &HashMap<DedupeKey, Stored>,
    key: &Key<'_>,
    conversation: &str,
) -> Option<Outcome> {
    let earlier = match in_batch.get(key) {
        Some(&i) => match &outcomes[i] {
            Outcome::Stored(earlier) => Stored {
                repeat: true,
                ..earlier.clone()
            },
            _ => unreachable!("index of a stored message"),
        },
        None => existing
            .get(&(key.0.clone(), key.1.to_string(), key.2))?
            .clone(),
    };
    Some(if earlier.message.conversation == conversation {
        Outcome::Stored(earlier)
    } else {
        Outcome::Reused
    })
}

/// A user's row of a conversation, as a batch moves it: the read cursor
/// (never back) and, for one-to-one conversations, the newest mid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChatRow {
    pub(crate) owner: UserId,
    pub(crate) conversation: String,
    /// The other user of a one-to-one conversation; `None` for a group.
    pub(crate) peer: Option<UserId>,
    pub(crate) read_seq: u64,
    /// 0 for groups (their newest mid is the conversation's).
    pub(crate) last_mid: u64,
}

/// What a revoke or an edit does to its target message, which must be in
/// the same conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// The content goes (and the text of every edit of it); `at` is the
    /// revoke's time.
    Revoke {
        conversation: String,
        target: u64,
        at: i64,
    },
    /// A text message's content becomes `content` (an encoded text body),
    /// unless it was revoked.
    Edit {
        conversation: String,
        target: u64,
        content: Vec<u8>,
        at: i64,
    },
}

/// A position of a conversation that holds no new message, and the message
/// it applies to (0 for none).
pub(crate) type Marker = (String, u64, u64);

/// The effect and marker of a stored message, if it has any.
fn effect_of(m: &StoredMessage) -> (Option<Effect>, Option<Marker>) {
    use natter_proto::msg::{Content, MessageBody, MessageType};
    use prost::Message as _;
    let counts = MessageType::from_u32(m.msg_type).is_none_or(MessageType::counts_as_unread);
    if counts {
        return (None, None);
    }
    let content = MessageBody::decode(m.content.as_slice())
        .ok()
        .and_then(|b| b.content);
    let (effect, target) = match content {
        Some(Content::Revoke(r)) => (
            Some(Effect::Revoke {
                conversation: m.conversation.clone(),
                target: r.mid,
                at: m.time_ms,
            }),
            r.mid,
        ),
        Some(Content::Edit(e)) => {
            let body = MessageBody {
                content: e.text.map(Content::Text),
            };
            (
                Some(Effect::Edit {
                    conversation: m.conversation.clone(),
                    target: e.mid,
                    content: body.encode_to_vec(),
                    at: m.time_ms,
                }),
                e.mid,
            )
        }
        _ => (None, 0),
    };
    (effect, Some((m.conversation.clone(), m.conv_seq, target)))
}

/// The content of an edit of a revoked message: the edit without its text.
pub(crate) fn revoked_edit(target: u64) -> Vec<u8> {
    use natter_proto::msg::{Content, Edit, MessageBody};
    use prost::Message as _;
    MessageBody {
        content: Some(Content::Edit(Edit {
            mid: target,
            text: None,
        })),
    }
    .encode_to_vec()
}

/// A user's read cursor of a conversation.
pub(crate) type ReadKey = (UserId, String);

/// What a walk decided: one outcome per write, and the rows to write.
pub(crate) struct Walk {
    pub(crate) outcomes: Vec<Outcome>,
    pub(crate) messages: Vec<StoredMessage>,
    pub(crate) relations: Vec<RelationRow>,
    /// (owner, user_seq) positions acknowledged in owners' streams.
    pub(crate) received: Vec<(UserId, u64)>,
    pub(crate) touched_convs: Vec<String>,
    pub(crate) touched_users: Vec<UserId>,
    /// Users' conversation rows, one per (owner, conversation).
    pub(crate) chats: Vec<ChatRow>,
    /// The newest mid of each conversation the batch stored messages in.
    pub(crate) last_mids: Vec<(String, u64)>,
    pub(crate) markers: Vec<Marker>,
    pub(crate) effects: Vec<Effect>,
    /// Rows to delete: users who left a group.
    pub(crate) forget: Vec<ReadKey>,
    /// The outcomes (by index) of reads, whose `unread` the store fills in
    /// once the batch's rows are written.
    pub(crate) reads: Vec<(usize, ReadKey, u64)>,
}

/// Collects users' conversation rows, one per (owner, conversation).
#[derive(Default)]
struct Chats {
    rows: Vec<ChatRow>,
    index: HashMap<ReadKey, usize>,
}

impl Chats {
    fn touch(
        &mut self,
        owner: &UserId,
        conversation: &str,
        peer: Option<&UserId>,
        read_seq: u64,
        last_mid: u64,
    ) {
        let key = (owner.clone(), conversation.to_string());
        match self.index.get(&key) {
            Some(&i) => {
                let row = &mut self.rows[i];
                row.read_seq = row.read_seq.max(read_seq);
                row.last_mid = row.last_mid.max(last_mid);
            }
            None => {
                self.index.insert(key, self.rows.len());
                self.rows.push(ChatRow {
                    owner: owner.clone(),
                    conversation: conversation.to_string(),
                    peer: peer.cloned(),
                    read_seq,
                    last_mid,
                });
            }
        }
    }
}

/// Walks a batch in order with the last sequence numbers of every
/// conversation and user it touches (`conv`, `user`) and the cursors of
/// every device it touches (`devices`), all loaded; updates them in place.
/// `existing` holds the messages already stored under the batch's dedupe keys.
pub(crate) fn walk(
    writes: &[Write],
    existing: &HashMap<DedupeKey, Stored>,
    conv: &mut HashMap<String, u64>,
    user: &mut HashMap<UserId, u64>,
    devices: &mut HashMap<CursorKey, DeviceCursor>,
    read_cursors: &HashMap<ReadKey, u64>,
) -> Walk {
    let mut chats = Chats::default();
    let mut last_mids: HashMap<String, (u64, u64)> = HashMap::new();
    let mut markers = Vec::new();
    let mut effects = Vec::new();
    let mut forget = Vec::new();
    let mut reads = Vec::new();
    // Read cursors as the batch moves them (loaded for every `Read`).
    let mut read_now: HashMap<ReadKey, u64> = HashMap::new();
    let mut outcomes = Vec::with_capacity(writes.len());
    let mut in_batch: HashMap<Key<'_>, usize> = HashMap::new();
    let mut messages: Vec<StoredMessage> = Vec::new();
    let mut relations: Vec<RelationRow> = Vec::new();
    let mut received: Vec<(UserId, u64)> = Vec::new();
    let mut touched_convs: Vec<String> = Vec::new();
    let mut touched_users: Vec<UserId> = Vec::new();
    for write in writes {
        match write {
            Write::Message(
                m @ NewMessage {
                    to: Peer::User(receiver),
                    ..
                },
            ) => {
                let key = (&m.sender, m.sender_device.as_str(), m.client_seq);
                let conversation = p2p_conversation(&m.sender, receiver);
                if let Some(outcome) = repeat(&outcomes, &in_batch, existing, &key, &conversation) {
                    outcomes.push(outcome);
                    continue;
                }
                let conv_seq = conv.get(&conversation).copied().unwrap_or(0) + 1;
                conv.insert(conversation.clone(), conv_seq);
                let mut next_user = |owner: &UserId| {
                    let seq = user.get(owner).copied().unwrap_or(0) + 1;
                    user.insert(owner.clone(), seq);
                    seq
                };
                let sender_seq = next_user(&m.sender);
                let receiver_seq = if *receiver == m.sender {
                    sender_seq
                } else {
                    next_user(receiver)
                };
                let stored = m.stored(conversation.clone(), conv_seq);
                let row = |owner: &UserId, user_seq, other: &UserId, direction| RelationRow {
                    owner: owner.clone(),
                    user_seq,
                    mid: m.mid,
                    other: other.clone(),
                    direction,
                    time_ms: m.time_ms,
                };
                relations.push(row(&m.sender, sender_seq, receiver, 1));
                if *receiver != m.sender {
                    relations.push(row(receiver, receiver_seq, &m.sender, 2));
                }
                // The sending device holds its own message once it has the ack.
                if !m.sender_device.is_empty() {
                    devices
                        .entry((m.sender.clone(), m.sender_device.clone(), 0))
                        .or_default()
                        .mark(sender_seq);
                }
                // The sender has read up to its own message; both see it
                // as the conversation's newest.
                chats.touch(&m.sender, &conversation, Some(receiver), conv_seq, m.mid);
                if *receiver != m.sender {
                    chats.touch(receiver, &conversation, Some(&m.sender), 0, m.mid);
                }
                let (effect, marker) = effect_of(&stored);
                effects.extend(effect);
                markers.extend(marker);
                last_mids.insert(conversation.clone(), (conv_seq, m.mid));
                touched_convs.push(conversation);
                touched_users.extend([m.sender.clone(), receiver.clone()]);
                in_batch.insert(key, outcomes.len());
                messages.push(stored.clone());
                outcomes.push(Outcome::Stored(Stored {
                    message: stored,
                    sender_seq,
                    receiver_seq,
                    repeat: false,
                }));
            }
            Write::Message(
                m @ NewMessage {
                    to: Peer::Group(group),
                    ..
                },
            ) => {
                let key = (&m.sender, m.sender_device.as_str(), m.client_seq);
                let conversation = group_conversation(*group);
                if let Some(outcome) = repeat(&outcomes, &in_batch, existing, &key, &conversation) {
                    outcomes.push(outcome);
                    continue;
                }
                let conv_seq = conv.get(&conversation).copied().unwrap_or(0) + 1;
                conv.insert(conversation.clone(), conv_seq);
                let stored = m.stored(conversation.clone(), conv_seq);
                if !m.sender_device.is_empty() {
                    devices
                        .entry((m.sender.clone(), m.sender_device.clone(), *group))
                        .or_default()
                        .mark(conv_seq);
                }
                chats.touch(&m.sender, &conversation, None, conv_seq, 0);
                let (effect, marker) = effect_of(&stored);
                effects.extend(effect);
                markers.extend(marker);
                last_mids.insert(conversation.clone(), (conv_seq, m.mid));
                touched_convs.push(conversation);
                in_batch.insert(key, outcomes.len());
                messages.push(stored.clone());
                outcomes.push(Outcome::Stored(Stored {
                    message: stored,
                    sender_seq: 0,
                    receiver_seq: 0,
                    repeat: false,
                }));
            }
            Write::Received {
                owner,
                device,
                group,
                seq,
                floor,
            } => {
                if *group == 0 {
                    received.push((owner.clone(), *seq));
                }
                let cursor = devices
                    .entry((owner.clone(), device.clone(), *group))
                    .or_default();
                cursor.raise_to(*floor);
                cursor.mark(*seq);
                outcomes.push(Outcome::Done);
            }
            Write::SetCursor {
                owner,
                device,
                group,
                cursor,
            } => {
                devices
                    .entry((owner.clone(), device.clone(), *group))
                    .or_default()
                    .set(*cursor);
                outcomes.push(Outcome::Done);
            }
            Write::Read {
                owner,
                conversation,
                seq,
                floor,
            } => {
                let key = (owner.clone(), conversation.clone());
                let last_seq = conv.get(conversation).copied().unwrap_or(0);
                // Messages of this batch may have moved it already.
                let chat_seq = chats.index.get(&key).map_or(0, |&i| chats.rows[i].read_seq);
                let before = read_now
                    .get(&key)
                    .or_else(|| read_cursors.get(&key))
                    .copied()
                    .unwrap_or(0)
                    .max(chat_seq)
                    .max(*floor);
                let target = (*seq).min(last_seq);
                let read_seq = before.max(target);
                let moved = read_seq > before;
                read_now.insert(key.clone(), read_seq);
                if moved {
                    let peer =
                        parse_p2p_conversation(conversation).map(
                            |(a, b)| {
                                if a == *owner {
                                    b
                                } else {
                                    a
                                }
                            },
                        );
                    chats.touch(owner, conversation, peer.as_ref(), read_seq, 0);
                }
                reads.push((outcomes.len(), key, *floor));
                outcomes.push(Outcome::Read(ReadState {
                    last_seq,
                    read_seq,
                    unread: 0,
                    moved,
                }));
            }
            Write::Forget {
                owner,
                conversation,
            } => {
                forget.push((owner.clone(), conversation.clone()));
                outcomes.push(Outcome::Done);
            }
        }
    }

    touched_convs.sort_unstable();
    touched_convs.dedup();
    touched_users.sort_unstable();
    touched_users.dedup();
    let mut last_mids: Vec<(String, u64)> = last_mids
        .into_iter()
        .map(|(conv, (_, mid))| (conv, mid))
        .collect();
    last_mids.sort_unstable();
    Walk {
        outcomes,
        messages,
        relations,
        received,
        touched_convs,
        touched_users,
        chats: chats.rows,
        last_mids,
        markers,
        effects,
        forget,
        reads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_starts_at_its_floor_and_remembers_a_bounded_number_of_positions() {
        let mut c = DeviceCursor::default();
        // A member who joined at 41 acks 41 and 43: held up to 41.
        c.raise_to(40);
        c.mark(41);
        c.mark(43);
        assert_eq!(c.contiguous, 41);
        c.mark(42);
        assert_eq!(c.contiguous, 43);
        // A floor below the cursor changes nothing.
        c.raise_to(10);
        assert_eq!(c.contiguous, 43);
        // A gap that never closes keeps the cursor back, with bounded memory.
        for seq in 45..45 + 3 * MAX_ABOVE as u64 {
            c.mark(seq);
        }
        assert_eq!(c.contiguous, 43);
        assert_eq!(c.above.len(), MAX_ABOVE);
        c.mark(44);
        assert_eq!(
            c.contiguous,
            44 + MAX_ABOVE as u64,
            "up to what it remembers"
        );
    }
}
