//! The protobuf bodies of frames. `proto/natter.proto` is the same schema in
//! `.proto` form for clients in other languages; the field numbers here and
//! there must agree (a test in this module checks the file names each of them).

use serde::{Deserialize, Serialize};

use crate::user::check_user_id;

/// Most users one text may mention.
pub const MAX_MENTIONS: usize = 100;

/// `Auth` body: the first frame of every connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthRequest {
    /// The token that names the user (and, for natter's own tokens, the device).
    #[prost(string, tag = "1")]
    pub token: String,
    /// Free-form client name and version, for logs.
    #[prost(string, tag = "2")]
    pub client: String,
    /// The device, when the token names none (a token from the operator's
    /// account service); a token that names a device must name this one.
    #[prost(string, tag = "3")]
    pub device: String,
}

/// `AuthReply` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthReply {
    /// The user the token names.
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(string, tag = "2")]
    pub device: String,
    /// How often the client must send a frame (a heartbeat if nothing else).
    #[prost(uint32, tag = "3")]
    pub heartbeat_interval_ms: u32,
    #[prost(int64, tag = "4")]
    pub server_time_ms: i64,
    /// The largest frame body the server accepts.
    #[prost(uint32, tag = "5")]
    pub max_body: u32,
    /// The server's record of this device's sync cursor (highest `user_seq` acknowledged).
    #[prost(uint64, tag = "6")]
    pub cursor: u64,
}

/// `HeartbeatReply` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatReply {
    #[prost(int64, tag = "1")]
    pub server_time_ms: i64,
}

/// `Message` body: a message from this device to a user.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SendMessage {
    /// Unique per sending device for the device's lifetime; a resend reuses it.
    #[prost(uint64, tag = "1")]
    pub client_seq: u64,
    /// The receiving user; empty when `group` is set.
    #[prost(string, tag = "2")]
    pub receiver: String,
    #[prost(message, optional, tag = "3")]
    pub body: Option<MessageBody>,
    /// The receiving group; 0 for a one-to-one message. Exactly one of
    /// `receiver` and `group` is set.
    #[prost(uint64, tag = "4")]
    pub group: u64,
}

/// `MessageReply` body: the message is durably stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MessageReply {
    #[prost(uint64, tag = "1")]
    pub mid: u64,
    #[prost(int64, tag = "2")]
    pub time_ms: i64,
    /// Position of the message in its conversation, contiguous from 1.
    #[prost(uint64, tag = "3")]
    pub conv_seq: u64,
    /// Position of the message in the sender's own stream, contiguous from 1
    /// (0 for a group message: groups are numbered by `conv_seq` alone).
    #[prost(uint64, tag = "4")]
    pub user_seq: u64,
    /// True when this (sender, device, client_seq) had been stored before.
    #[prost(bool, tag = "5")]
    pub repeat: bool,
    #[prost(string, tag = "6")]
    pub conversation: String,
}

/// A stored message as delivered to one user: the `Push` body and the items
/// of `SyncReply`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Message {
    #[prost(uint64, tag = "1")]
    pub mid: u64,
    /// `p:{a}:{b}` for one-to-one conversations (the two user ids, the
    /// byte-wise smaller first), `g:{group}` for groups.
    #[prost(string, tag = "2")]
    pub conversation: String,
    #[prost(uint64, tag = "3")]
    pub conv_seq: u64,
    /// Position in the receiving user's own stream, contiguous from 1 (the
    /// sync cursor); 0 for group messages, whose position is `conv_seq`.
    #[prost(uint64, tag = "4")]
    pub user_seq: u64,
    #[prost(string, tag = "5")]
    pub sender: String,
    #[prost(string, tag = "6")]
    pub sender_device: String,
    /// The receiving user; empty for a group message.
    #[prost(string, tag = "7")]
    pub receiver: String,
    #[prost(uint64, tag = "8")]
    pub client_seq: u64,
    #[prost(int64, tag = "9")]
    pub time_ms: i64,
    #[prost(message, optional, tag = "10")]
    pub body: Option<MessageBody>,
    /// The group of a group message (then `receiver` is empty); 0 otherwise.
    #[prost(uint64, tag = "11")]
    pub group: u64,
    /// When the message was last edited (Unix ms); 0 if never. `body` is
    /// then the edited text.
    #[prost(int64, tag = "12")]
    pub edited_ms: i64,
    /// When the message was revoked (Unix ms); 0 if it was not. A revoked
    /// message has no `body`: its content is gone from the server.
    #[prost(int64, tag = "13")]
    pub revoked_ms: i64,
}

/// `PushAck` has an empty body; `ack` in the header carries the push's `seq`.
/// `Sync` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SyncRequest {
    /// Return messages with `user_seq` greater than this; absent means the
    /// server's stored cursor for this device.
    #[prost(uint64, optional, tag = "1")]
    pub after: Option<u64>,
    /// At most this many (1–500; 0 means 100).
    #[prost(uint32, tag = "2")]
    pub limit: u32,
    /// Sync this group's messages instead of the user's stream: `after` is
    /// then a `conv_seq` of the group (absent: the device's stored cursor
    /// for the group).
    #[prost(uint64, tag = "3")]
    pub group: u64,
}

/// `SyncReply` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SyncReply {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<Message>,
    /// More messages follow; sync again after `cursor`.
    #[prost(bool, tag = "2")]
    pub has_more: bool,
    /// The highest `user_seq` (for a group sync, `conv_seq`) covered by this reply.
    #[prost(uint64, tag = "3")]
    pub cursor: u64,
    /// On a sync of the user's stream: the caller's groups that hold messages
    /// past this device's cursor for them. Sync each with `group` set.
    #[prost(message, repeated, tag = "4")]
    pub groups: Vec<GroupCursor>,
    /// The group this reply is for (0: the user's stream).
    #[prost(uint64, tag = "5")]
    pub group: u64,
}

/// A group with messages a device has not received.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupCursor {
    #[prost(uint64, tag = "1")]
    pub group: u64,
    /// The group's newest `conv_seq`.
    #[prost(uint64, tag = "2")]
    pub last_seq: u64,
    /// The device's stored cursor for the group: it holds everything up to here.
    #[prost(uint64, tag = "3")]
    pub cursor: u64,
}

/// The `Notify` kind of a group event; its payload is the encoded [`Message`]
/// (a `group_event` message, also kept in the group's history).
pub const NOTIFY_GROUP_EVENT: &str = "group_event";
/// The `Notify` kind of a read receipt; its payload is a [`ReadReceipt`].
pub const NOTIFY_READ: &str = "read";
/// The `Notify` kind of a typing indicator; its payload is a [`TypingNotice`].
pub const NOTIFY_TYPING: &str = "typing";

/// `Read` body: the user has read `conversation` up to `seq` (a `conv_seq`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadRequest {
    #[prost(string, tag = "1")]
    pub conversation: String,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
}

/// `ReadReply` body: the user's read state in a conversation.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadReply {
    #[prost(string, tag = "1")]
    pub conversation: String,
    /// The user's read cursor: it only moves forward, so it may be past the
    /// `seq` asked for.
    #[prost(uint64, tag = "2")]
    pub read_seq: u64,
    /// Messages from others after the cursor.
    #[prost(uint64, tag = "3")]
    pub unread: u64,
}

/// The payload of a `read` notify: `reader` has read `conversation` up to
/// `seq`. Sent to the other party of a one-to-one conversation, to the
/// reader's other devices, and to the online members of small groups.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadReceipt {
    #[prost(string, tag = "1")]
    pub conversation: String,
    #[prost(string, tag = "2")]
    pub reader: String,
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    #[prost(int64, tag = "4")]
    pub time_ms: i64,
}

/// `Typing` body: the user is typing in `conversation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Typing {
    #[prost(string, tag = "1")]
    pub conversation: String,
}

/// The payload of a `typing` notify: `user` is typing in `conversation`.
/// Never stored; sent only to devices online at the time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypingNotice {
    #[prost(string, tag = "1")]
    pub conversation: String,
    #[prost(string, tag = "2")]
    pub user: String,
    #[prost(int64, tag = "3")]
    pub time_ms: i64,
}

/// `Notify` body: an event that is not a chat message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Notify {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub time_ms: i64,
}

/// `Disconnect` body: the server is about to close, and why.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Disconnect {
    /// An [`crate::ErrorCode`].
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// `Error` body: a request failed; the connection stays open.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ErrorReply {
    /// An [`crate::ErrorCode`].
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
    /// With `muted`: when the mute ends, Unix ms ([`MUTED_FOREVER`] for never).
    #[prost(int64, tag = "3")]
    pub until_ms: i64,
}

/// `until_ms` of a mute without an end.
pub const MUTED_FOREVER: i64 = i64::MAX;

/// The content of a chat message: exactly one of the typed bodies. The
/// message type is the number of the field that is set.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct MessageBody {
    #[prost(oneof = "Content", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")]
    pub content: Option<Content>,
}

/// The typed bodies; the tag is the message type.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Oneof)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    #[prost(message, tag = "1")]
    Text(Text),
    #[prost(message, tag = "2")]
    Image(Image),
    #[prost(message, tag = "3")]
    Audio(Audio),
    #[prost(message, tag = "4")]
    Video(Video),
    #[prost(message, tag = "5")]
    File(File),
    #[prost(message, tag = "6")]
    Location(Location),
    #[prost(message, tag = "7")]
    Card(Card),
    #[prost(message, tag = "8")]
    Notice(Notice),
    #[prost(message, tag = "9")]
    Forward(Forward),
    #[prost(message, tag = "10")]
    Custom(Custom),
    /// A change to a group, written by the server into the group's history.
    #[prost(message, tag = "11")]
    GroupEvent(GroupEvent),
    /// Revokes an earlier message of the conversation.
    #[prost(message, tag = "12")]
    Revoke(Revoke),
    /// Replaces the text of an earlier text message of the conversation.
    #[prost(message, tag = "13")]
    Edit(Edit),
}

/// Message types, numbered as the fields of [`MessageBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum MessageType {
    Text = 1,
    Image = 2,
    Audio = 3,
    Video = 4,
    File = 5,
    Location = 6,
    Card = 7,
    Notice = 8,
    Forward = 9,
    Custom = 10,
    GroupEvent = 11,
    Revoke = 12,
    Edit = 13,
}

impl MessageType {
    pub const ALL: &'static [MessageType] = &[
        MessageType::Text,
        MessageType::Image,
        MessageType::Audio,
        MessageType::Video,
        MessageType::File,
        MessageType::Location,
        MessageType::Card,
        MessageType::Notice,
        MessageType::Forward,
        MessageType::Custom,
        MessageType::GroupEvent,
        MessageType::Revoke,
        MessageType::Edit,
    ];

    pub fn from_u32(value: u32) -> Option<MessageType> {
        MessageType::ALL
            .iter()
            .copied()
            .find(|t| *t as u32 == value)
    }

    /// The snake_case name used in the HTTP API.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Text => "text",
            MessageType::Image => "image",
            MessageType::Audio => "audio",
            MessageType::Video => "video",
            MessageType::File => "file",
            MessageType::Location => "location",
            MessageType::Card => "card",
            MessageType::Notice => "notice",
            MessageType::Forward => "forward",
            MessageType::Custom => "custom",
            MessageType::GroupEvent => "group_event",
            MessageType::Revoke => "revoke",
            MessageType::Edit => "edit",
        }
    }

    pub fn parse(name: &str) -> Option<MessageType> {
        MessageType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == name)
    }
}

impl Content {
    pub fn message_type(&self) -> MessageType {
        match self {
            Content::Text(_) => MessageType::Text,
            Content::Image(_) => MessageType::Image,
            Content::Audio(_) => MessageType::Audio,
            Content::Video(_) => MessageType::Video,
            Content::File(_) => MessageType::File,
            Content::Location(_) => MessageType::Location,
            Content::Card(_) => MessageType::Card,
            Content::Notice(_) => MessageType::Notice,
            Content::Forward(_) => MessageType::Forward,
            Content::Custom(_) => MessageType::Custom,
            Content::GroupEvent(_) => MessageType::GroupEvent,
            Content::Revoke(_) => MessageType::Revoke,
            Content::Edit(_) => MessageType::Edit,
        }
    }
}

impl MessageBody {
    pub fn text(text: impl Into<String>) -> MessageBody {
        MessageBody {
            content: Some(Content::Text(Text {
                text: text.into(),
                mentions: vec![],
            })),
        }
    }

    pub fn custom(kind: impl Into<String>, data: Vec<u8>) -> MessageBody {
        MessageBody {
            content: Some(Content::Custom(Custom {
                kind: kind.into(),
                data,
            })),
        }
    }

    pub fn message_type(&self) -> Option<MessageType> {
        self.content.as_ref().map(Content::message_type)
    }

    /// Checks the envelope: a body is present and its required fields are set.
    /// The media behind URLs is not inspected.
    pub fn validate(&self) -> Result<MessageType, &'static str> {
        let content = self.content.as_ref().ok_or("message body has no content")?;
        let ok = match content {
            Content::Text(t) => {
                !t.text.is_empty()
                    && t.mentions.len() <= MAX_MENTIONS
                    && t.mentions.iter().all(|m| check_user_id(m).is_ok())
            }
            Content::Image(m) => !m.url.is_empty(),
            Content::Audio(m) => !m.url.is_empty(),
            Content::Video(m) => !m.url.is_empty(),
            Content::File(m) => !m.url.is_empty() && !m.name.is_empty(),
            Content::Location(l) => {
                (-90.0..=90.0).contains(&l.latitude) && (-180.0..=180.0).contains(&l.longitude)
            }
            Content::Card(c) => !c.kind.is_empty() && !c.id.is_empty() && c.id.len() <= 64,
            Content::Notice(n) => !n.text.is_empty(),
            Content::Forward(f) => {
                !f.items.is_empty() && f.items.iter().all(|i| check_user_id(&i.sender).is_ok())
            }
            Content::Custom(c) => !c.kind.is_empty(),
            Content::GroupEvent(_) => false,
            Content::Revoke(r) => r.mid != 0,
            Content::Edit(e) => {
                e.mid != 0
                    && e.text.as_ref().is_some_and(|t| {
                        !t.text.is_empty()
                            && t.mentions.len() <= MAX_MENTIONS
                            && t.mentions.iter().all(|m| check_user_id(m).is_ok())
                    })
            }
        };
        if ok {
            Ok(content.message_type())
        } else {
            Err(match content {
                Content::Text(t) if t.text.is_empty() => "text message is empty",
                Content::Text(_) => "mentions must be at most 100 valid user ids",
                Content::Image(_) | Content::Audio(_) | Content::Video(_) => {
                    "media message has no url"
                }
                Content::File(_) => "file message needs a url and a name",
                Content::Location(_) => "location is out of range",
                Content::Card(_) => "card needs a kind and an id",
                Content::Notice(_) => "notice text is empty",
                Content::Forward(_) => "forward needs items, each with a valid sender",
                Content::Custom(_) => "custom message needs a kind",
                Content::GroupEvent(_) => "group events are written by the server",
                Content::Revoke(_) => "revoke needs the mid of the message",
                Content::Edit(_) => "edit needs the mid of the message and a valid new text",
            })
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Text {
    #[prost(string, tag = "1")]
    pub text: String,
    /// Users mentioned in the text.
    #[prost(string, repeated, tag = "2")]
    pub mentions: Vec<String>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(uint32, tag = "2")]
    pub width: u32,
    #[prost(uint32, tag = "3")]
    pub height: u32,
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "4")]
    pub size: u64,
    #[prost(string, tag = "5")]
    pub thumbnail_url: String,
    #[prost(string, tag = "6")]
    pub format: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Audio {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(uint32, tag = "2")]
    pub duration_ms: u32,
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(string, tag = "4")]
    pub format: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Video {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(uint32, tag = "2")]
    pub duration_ms: u32,
    #[prost(uint32, tag = "3")]
    pub width: u32,
    #[prost(uint32, tag = "4")]
    pub height: u32,
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "5")]
    pub size: u64,
    #[prost(string, tag = "6")]
    pub cover_url: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct File {
    #[prost(string, tag = "1")]
    pub url: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "3")]
    pub size: u64,
    #[prost(string, tag = "4")]
    pub mime: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Location {
    #[prost(double, tag = "1")]
    pub latitude: f64,
    #[prost(double, tag = "2")]
    pub longitude: f64,
    #[prost(string, tag = "3")]
    pub title: String,
    #[prost(string, tag = "4")]
    pub address: String,
}

/// A shared contact or group card.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Card {
    /// `user` or `group`.
    #[prost(string, tag = "1")]
    pub kind: String,
    /// A user id, or a group id in decimal.
    #[prost(string, tag = "2")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub avatar_url: String,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Notice {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(string, tag = "2")]
    pub text: String,
}

/// Several messages forwarded as one ("merged forward").
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Forward {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(message, repeated, tag = "2")]
    pub items: Vec<ForwardItem>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct ForwardItem {
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "1")]
    pub mid: u64,
    #[prost(string, tag = "2")]
    pub sender: String,
    #[serde(with = "crate::json::int64")]
    #[prost(int64, tag = "3")]
    pub time_ms: i64,
    #[prost(string, tag = "4")]
    pub summary: String,
}

/// An application-defined message; `data` is opaque to the server.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Custom {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[serde(with = "crate::json::bytes")]
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

/// A change to a group. `kind` names it; the other fields are set as the
/// kind needs (see docs/protocol.md for the table).
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct GroupEvent {
    /// `created`, `joined`, `invited`, `left`, `kicked`, `role_changed`,
    /// `owner_transferred`, `renamed`, `avatar_changed`, `join_type_changed`,
    /// `muted`, `unmuted`, `mute_all`, `unmute_all`, `nickname_changed`, `dissolved`.
    #[prost(string, tag = "1")]
    pub kind: String,
    /// The user who made the change.
    #[prost(string, tag = "2")]
    pub actor: String,
    /// The users it applies to.
    #[prost(string, repeated, tag = "3")]
    pub targets: Vec<String>,
    /// A new name, avatar URL, role, join type or nickname.
    #[prost(string, tag = "4")]
    pub value: String,
    /// For `muted`: the end of the mute, Unix ms ([`MUTED_FOREVER`] for never).
    #[serde(with = "crate::json::int64")]
    #[prost(int64, tag = "5")]
    pub until_ms: i64,
}

/// Revokes message `mid` of the same conversation: its content is deleted
/// from the server, and every device sees it as revoked.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Revoke {
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "1")]
    pub mid: u64,
}

/// Replaces the text of text message `mid` of the same conversation.
#[derive(Clone, PartialEq, Serialize, Deserialize, prost::Message)]
#[serde(default)]
pub struct Edit {
    #[serde(with = "crate::json::int64")]
    #[prost(uint64, tag = "1")]
    pub mid: u64,
    /// The new text (and mentions).
    #[prost(message, optional, tag = "2")]
    pub text: Option<Text>,
}

impl MessageType {
    /// Whether a message of this type counts as unread: group events,
    /// revokes and edits change the conversation but are not new messages.
    pub fn counts_as_unread(self) -> bool {
        !matches!(
            self,
            MessageType::GroupEvent | MessageType::Revoke | MessageType::Edit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_checks_the_envelope() {
        assert_eq!(MessageBody::text("hi").validate(), Ok(MessageType::Text));
        assert!(MessageBody::text("").validate().is_err());
        assert!(MessageBody::default().validate().is_err());
        let file = MessageBody {
            content: Some(Content::File(File {
                url: "u".into(),
                ..Default::default()
            })),
        };
        assert_eq!(file.validate(), Err("file message needs a url and a name"));
        assert_eq!(
            MessageBody::custom("k", vec![]).validate(),
            Ok(MessageType::Custom)
        );
    }

    #[test]
    fn bodies_in_json_keep_64_bit_ids_exact_and_bytes_as_base64() {
        let custom = Content::Custom(Custom {
            kind: "k".into(),
            data: vec![1, 2, 3, 255],
        });
        let json = serde_json::to_string(&custom).expect("serializes");
        assert_eq!(json, r#"{"custom":{"kind":"k","data":"AQID/w=="}}"#);
        let forward = Content::Forward(Forward {
            title: "t".into(),
            items: vec![ForwardItem {
                mid: u64::MAX,
                sender: "u-1".into(),
                time_ms: 5,
                summary: "s".into(),
            }],
        });
        let json = serde_json::to_string(&forward).expect("serializes");
        assert_eq!(
            json,
            r#"{"forward":{"title":"t","items":[{"mid":"18446744073709551615","sender":"u-1","time_ms":"5","summary":"s"}]}}"#
        );
        let card = Content::Card(Card {
            kind: "user".into(),
            id: "alice".into(),
            ..Default::default()
        });
        let event = Content::GroupEvent(GroupEvent {
            kind: "muted".into(),
            actor: "a".into(),
            targets: vec!["b".into()],
            value: String::new(),
            until_ms: MUTED_FOREVER,
        });
        for content in [custom, forward, card, event] {
            let json = serde_json::to_string(&content).expect("serializes");
            let back: Content = serde_json::from_str(&json).expect("parses");
            assert!(back == content, "{json}");
        }
        // Input may leave fields at their defaults and give ids as numbers.
        let text: Content =
            serde_json::from_str(r#"{"text":{"text":"hi","mentions":["u-1","B"]}}"#)
                .expect("parses");
        assert!(
            text == Content::Text(Text {
                text: "hi".into(),
                mentions: vec!["u-1".into(), "B".into()],
            })
        );
        let image: Content = serde_json::from_str(r#"{"image":{"url":"u"}}"#).expect("parses");
        assert!(matches!(image, Content::Image(Image { size: 0, .. })));
    }

    #[test]
    fn message_types_round_trip() {
        for &t in MessageType::ALL {
            assert_eq!(MessageType::from_u32(t as u32), Some(t));
            assert_eq!(MessageType::parse(t.as_str()), Some(t));
        }
    }

    #[test]
    fn proto_file_matches_the_structs() {
        // The .proto file is the contract for other languages: every message
        // defined here must be there too.
        let schema = include_str!("../natter.proto");
        for name in [
            "AuthRequest",
            "AuthReply",
            "HeartbeatReply",
            "SendMessage",
            "MessageReply",
            "Message",
            "SyncRequest",
            "SyncReply",
            "Notify",
            "Disconnect",
            "ErrorReply",
            "MessageBody",
            "Text",
            "Image",
            "Audio",
            "Video",
            "File",
            "Location",
            "Card",
            "Notice",
            "Forward",
            "ForwardItem",
            "Custom",
            "GroupEvent",
            "GroupCursor",
            "Revoke",
            "Edit",
            "ReadRequest",
            "ReadReply",
            "ReadReceipt",
            "Typing",
            "TypingNotice",
        ] {
            assert!(
                schema.contains(&format!("message {name} {{")),
                "{name} missing from natter.proto"
            );
        }
        let body = MessageBody::text("x").encode_to_vec();
        assert_eq!(body, vec![0x0a, 0x03, 0x0a, 0x01, b'x']);
    }

    use prost::Message as _;
}
