//! The JSON bodies of the HTTP API, shared by the server's handlers and the
//! client SDK so both sides read and write one definition. Every 64-bit
//! integer is a decimal string and bytes are base64 ([`crate::json`]);
//! docs/openapi.json describes each body, and a test checks it against
//! these types.

use serde::{Deserialize, Serialize};

use crate::msg::{Content, MessageType};
use crate::{ErrorCode, UserId};

/// A message in JSON. Like every 64-bit integer in JSON (see
/// [`crate::json`]), `mid` is a decimal string: it does not fit a JSON
/// number exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub mid: String,
    pub conversation: String,
    #[serde(with = "crate::json::int64")]
    pub conv_seq: u64,
    /// Position in the caller's own stream (sync only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub user_seq: Option<u64>,
    pub sender: UserId,
    pub sender_device: String,
    /// The receiving user; absent for a group message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<UserId>,
    /// The group of a group message.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub group: Option<u64>,
    #[serde(with = "crate::json::int64")]
    pub client_seq: u64,
    #[serde(with = "crate::json::int64")]
    pub time_ms: i64,
    #[serde(rename = "type")]
    pub msg_type: Option<MessageType>,
    /// Absent for a revoked message: its content is gone.
    pub body: Option<Content>,
    /// When the message was last edited, Unix ms; absent if never.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub edited_ms: Option<i64>,
    /// When the message was revoked, Unix ms; absent if it was not.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub revoked_ms: Option<i64>,
}

/// A page of conversation history, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub messages: Vec<MessageView>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<String>,
}

impl HistoryPage {
    /// `next_before` as a message id, ready to ask for the next page.
    pub fn next_before_mid(&self) -> Option<u64> {
        self.next_before.as_deref().and_then(|mid| mid.parse().ok())
    }
}

/// What a device has not received.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncPage {
    pub messages: Vec<MessageView>,
    pub has_more: bool,
    /// The highest `user_seq` covered; pass as `after` next time.
    #[serde(with = "crate::json::int64")]
    pub cursor: u64,
}

/// Whether a user is notified of a conversation's messages when offline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushMode {
    #[default]
    All,
    /// Only messages that mention the user.
    Mentions,
    None,
}

/// One conversation in `GET /v1/conversations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConversationView {
    pub conversation: String,
    /// The other user, for a one-to-one conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<UserId>,
    /// The group, for a group conversation.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub group: Option<u64>,
    /// The newest message the caller may see, in its current state.
    pub last_message: Option<MessageView>,
    /// The conversation's newest `conv_seq`.
    #[serde(with = "crate::json::int64")]
    pub last_seq: u64,
    /// The caller's read cursor (a `conv_seq`).
    #[serde(with = "crate::json::int64")]
    pub read_seq: u64,
    /// Messages from others after the read cursor.
    #[serde(with = "crate::json::int64")]
    pub unread: u64,
    /// One-to-one: the other user's read cursor.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub peer_read_seq: Option<u64>,
    pub pinned: bool,
    pub push: PushMode,
}

/// A page of the caller's conversations: pinned first, then newest
/// activity first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConversationPage {
    pub conversations: Vec<ConversationView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<String>,
}

/// `PUT /v1/conversations/{id}/settings`: the settings to change (absent
/// ones stay).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushMode>,
}

/// A user's settings for one conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SettingsView {
    pub pinned: bool,
    pub push: PushMode,
}

/// One reader of a message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReaderView {
    pub uid: UserId,
    #[serde(with = "crate::json::int64")]
    pub read_seq: u64,
}

/// `GET /v1/conversations/{id}/messages/{mid}/receipts`: who has read a message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceiptsView {
    pub conversation: String,
    pub mid: String,
    #[serde(with = "crate::json::int64")]
    pub conv_seq: u64,
    /// Users other than the sender who have read it.
    #[serde(with = "crate::json::int64")]
    pub read_count: u64,
    /// Those users: for one-to-one conversations and groups up to
    /// `conversations.receipt_detail_max_members` members; absent for
    /// larger groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readers: Option<Vec<ReaderView>>,
}

/// The body of every HTTP error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// An [`ErrorCode`] slug, e.g. `forbidden`.
    pub code: String,
    pub message: String,
    /// With `muted`: when the mute ends, Unix ms (9223372036854775807 for never).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub until_ms: Option<i64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.as_str().to_string(),
            message: message.into(),
            until_ms: None,
        }
    }

    /// The code, if it is one this version knows.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == self.code)
    }
}

/// A member's role in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Owners and admins manage a group.
    pub fn manages(self) -> bool {
        self != Role::Member
    }
}

/// How users get into a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinType {
    /// Anyone may join.
    Open,
    /// Anyone may apply; an owner or admin approves.
    #[default]
    Approval,
    /// Only invited by a member.
    InviteOnly,
}

impl JoinType {
    pub fn as_str(self) -> &'static str {
        match self {
            JoinType::Open => "open",
            JoinType::Approval => "approval",
            JoinType::InviteOnly => "invite_only",
        }
    }
}

/// A group as its members see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupView {
    #[serde(with = "crate::json::int64")]
    pub id: u64,
    pub name: String,
    pub avatar: String,
    pub owner: UserId,
    pub join_type: JoinType,
    /// Everyone but the owner and admins is muted.
    pub mute_all: bool,
    pub member_count: u32,
    #[serde(with = "crate::json::int64")]
    pub created_ms: i64,
    pub dissolved: bool,
    /// The group's newest `conv_seq`.
    #[serde(with = "crate::json::int64")]
    pub last_seq: u64,
    /// The caller's role.
    pub role: Role,
    /// The highest `conv_seq` the caller marked read (on any device).
    #[serde(with = "crate::json::int64")]
    pub read_seq: u64,
    /// Messages after the caller's read cursor (and join point).
    #[serde(with = "crate::json::int64")]
    pub unread: u64,
}

/// `POST /v1/conversations/{id}/read` (and `PUT /v1/groups/{id}/read`):
/// the caller has read up to `seq`, a `conv_seq`. Answered with
/// [`ReadState`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarkRead {
    #[serde(with = "crate::json::int64")]
    pub seq: u64,
}

/// The caller's read state in a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadState {
    #[serde(with = "crate::json::int64")]
    pub read_seq: u64,
    #[serde(with = "crate::json::int64")]
    pub unread: u64,
}

/// One member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub uid: UserId,
    pub role: Role,
    pub nickname: String,
    #[serde(with = "crate::json::int64")]
    pub joined_ms: i64,
    /// The first `conv_seq` of the group's history this member may read.
    #[serde(with = "crate::json::int64")]
    pub join_seq: u64,
    /// The end of the member's mute, Unix ms (9223372036854775807 for never);
    /// absent when not muted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub muted_until_ms: Option<i64>,
}

/// A page of members, ordered by uid (byte-wise).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberPage {
    pub members: Vec<MemberView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(default)]
    pub next_after: Option<UserId>,
}

/// An application to join a group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplicationView {
    pub uid: UserId,
    pub message: String,
    #[serde(with = "crate::json::int64")]
    pub time_ms: i64,
}

/// `POST /v1/groups`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateGroup {
    pub name: String,
    #[serde(default)]
    pub avatar: String,
    #[serde(default)]
    pub join_type: JoinType,
    /// Initial members besides the creator, who becomes the owner.
    #[serde(default)]
    pub members: Vec<UserId>,
}

/// `PATCH /v1/groups/{id}`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateGroup {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_type: Option<JoinType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mute_all: Option<bool>,
}

/// A list of users (invite).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Users {
    pub users: Vec<UserId>,
}

/// `POST /v1/groups/{id}/join`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    #[serde(default)]
    pub message: String,
}

/// What a join did: joined at once, or applied for approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinOutcome {
    pub joined: bool,
}

/// `POST /v1/groups/{id}/applications/{uid}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub approve: bool,
}

/// `PUT /v1/groups/{id}/members/{uid}/role`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetRole {
    /// `admin` or `member`; ownership moves with `transfer`.
    pub role: Role,
}

/// `POST /v1/groups/{id}/transfer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub to: UserId,
}

/// `PUT /v1/groups/{id}/members/{uid}/mute`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mute {
    /// Seconds from now; 0 unmutes; -1 mutes until unmuted.
    #[serde(with = "crate::json::int64")]
    pub duration_secs: i64,
}

/// `PUT /v1/groups/{id}/members/{uid}/nickname`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nickname {
    pub nickname: String,
}

/// `POST /v1/admin/tokens`: a token for one device of a user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminTokenRequest {
    pub uid: UserId,
    /// The device the token is for (1-64 printable characters, no spaces).
    pub device: String,
    /// The token's life in seconds; absent: `auth.token_ttl_secs`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub ttl_secs: Option<u64>,
}

/// A token minted by the admin API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminToken {
    pub token: String,
    /// When it stops working, Unix seconds.
    #[serde(with = "crate::json::int64")]
    pub expires_at: i64,
}

/// `POST /v1/admin/messages`: a message sent as a user (`from`) or as the
/// system (`from` null or absent: the configured `admin.system_sender`), to
/// a user (`to`) or a group (`group`), one of the two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminMessage {
    #[serde(default)]
    pub from: Option<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<UserId>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub group: Option<u64>,
    /// The body, as in [`MessageView::body`]: `{"text": {"text": "hi"}}`.
    pub body: Content,
    /// Makes a retry idempotent: the same `from`, `client_seq` and peer
    /// store the message once. Absent: every request is a new message.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::json::opt_int64"
    )]
    pub client_seq: Option<u64>,
}

/// A message the admin API stored (and pushed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminSent {
    #[serde(with = "crate::json::int64")]
    pub mid: u64,
    pub conversation: String,
    #[serde(with = "crate::json::int64")]
    pub conv_seq: u64,
}

/// `POST /v1/admin/users/{uid}/logout`: the connections it closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedOut {
    pub closed: u32,
}

/// `POST /v1/admin/groups`: a group created on `owner`'s behalf.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminCreateGroup {
    pub owner: UserId,
    #[serde(flatten)]
    pub group: CreateGroup,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Text;

    #[test]
    fn admin_bodies_read_their_documented_json() {
        let send: AdminMessage = serde_json::from_str(
            r#"{"from": null, "group": "7", "body": {"text": {"text": "hi"}}}"#,
        )
        .expect("a system notice to a group");
        assert_eq!((send.from, send.to, send.group), (None, None, Some(7)));
        assert!(matches!(send.body, Content::Text(ref t) if t.text == "hi"));
        let send: AdminMessage = serde_json::from_str(
            r#"{"from": "alice", "to": "Bob", "client_seq": 3, "body": {"notice": {"text": "x"}}}"#,
        )
        .expect("a user's message");
        assert_eq!(send.from, Some(UserId::parse("alice").unwrap()));
        assert_eq!(send.to, Some(UserId::parse("Bob").unwrap()));
        assert_eq!(send.client_seq, Some(3));
        assert!(
            serde_json::from_str::<AdminMessage>(r#"{"from": "a b", "to": "b", "body": {}}"#)
                .is_err()
        );
        let sent = serde_json::to_string(&AdminSent {
            mid: u64::MAX,
            conversation: "p:a:b".into(),
            conv_seq: 2,
        })
        .expect("serializes");
        assert_eq!(
            sent,
            r#"{"mid":"18446744073709551615","conversation":"p:a:b","conv_seq":"2"}"#
        );
        let create: AdminCreateGroup =
            serde_json::from_str(r#"{"owner": "alice", "name": "g", "members": ["bob"]}"#)
                .expect("a group");
        assert_eq!(create.owner, UserId::parse("alice").unwrap());
        assert_eq!(create.group.name, "g");
        assert_eq!(create.group.members, vec![UserId::parse("bob").unwrap()]);
        let token: AdminTokenRequest =
            serde_json::from_str(r#"{"uid": "alice", "device": "phone"}"#).expect("token");
        assert_eq!(token.ttl_secs, None);
    }

    #[test]
    fn views_round_trip_through_json() {
        let view = MessageView {
            mid: "384002140781150208".into(),
            conversation: "p:Bob:alice".into(),
            conv_seq: 1,
            user_seq: None,
            sender: UserId::parse("alice").unwrap(),
            sender_device: "phone".into(),
            receiver: Some(UserId::parse("Bob").unwrap()),
            group: None,
            client_seq: 9,
            time_ms: 5,
            msg_type: Some(MessageType::Text),
            body: Some(Content::Text(Text {
                text: "hi".into(),
                mentions: vec![],
            })),
            edited_ms: Some(7),
            revoked_ms: None,
        };
        let json = serde_json_like(&view);
        assert!(
            json.contains("\"type\":\"text\"")
                && json.contains("\"body\":{\"text\":{\"text\":\"hi\""),
            "{json}"
        );
        assert!(!json.contains("user_seq") && !json.contains("revoked_ms"));
        assert!(json.contains("\"edited_ms\":\"7\""), "{json}");
        // 64-bit integers are strings; they come back exact.
        assert!(
            json.contains("\"conv_seq\":\"1\"")
                && json.contains("\"client_seq\":\"9\"")
                && json.contains("\"time_ms\":\"5\""),
            "{json}"
        );
        let big = MessageView {
            sender: UserId::parse(&"x".repeat(64)).unwrap(),
            user_seq: Some(u64::MAX),
            ..view.clone()
        };
        let back: MessageView = serde_json::from_str(&serde_json_like(&big)).expect("parses");
        assert_eq!(back, big);
        let error = ErrorBody::new(ErrorCode::Forbidden, "no");
        assert_eq!(error.error_code(), Some(ErrorCode::Forbidden));
        assert_eq!(
            ErrorBody {
                code: "nope".into(),
                message: String::new(),
                until_ms: None,
            }
            .error_code(),
            None
        );
    }

    fn serde_json_like(view: &MessageView) -> String {
        serde_json::to_string(view).expect("serializes")
    }
}
