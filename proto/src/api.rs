//! The JSON bodies of the HTTP API, shared by the server's handlers and the
//! client SDK so both sides read and write one definition.

use serde::{Deserialize, Serialize};

use crate::msg::{Content, MessageType};
use crate::ErrorCode;

/// A message in JSON. `mid` is a string because it does not fit a JSON
/// number exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub mid: String,
    pub conversation: String,
    pub conv_seq: u64,
    /// Position in the caller's own stream (sync only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_seq: Option<u64>,
    pub sender: u64,
    pub sender_device: String,
    pub receiver: u64,
    pub client_seq: u64,
    pub time_ms: i64,
    #[serde(rename = "type")]
    pub msg_type: Option<MessageType>,
    pub body: Option<Content>,
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
    pub cursor: u64,
}

/// The body of every HTTP error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// An [`ErrorCode`] slug, e.g. `forbidden`.
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.as_str().to_string(),
            message: message.into(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Text;

    #[test]
    fn views_round_trip_through_json() {
        let view = MessageView {
            mid: "384002140781150208".into(),
            conversation: "p:1:2".into(),
            conv_seq: 1,
            user_seq: None,
            sender: 1,
            sender_device: "phone".into(),
            receiver: 2,
            client_seq: 9,
            time_ms: 5,
            msg_type: Some(MessageType::Text),
            body: Some(Content::Text(Text {
                text: "hi".into(),
                mentions: vec![],
            })),
        };
        let json = serde_json_like(&view);
        assert!(
            json.contains("\"type\":\"text\"")
                && json.contains("\"body\":{\"text\":{\"text\":\"hi\""),
            "{json}"
        );
        assert!(!json.contains("user_seq"));
        let error = ErrorBody::new(ErrorCode::Forbidden, "no");
        assert_eq!(error.error_code(), Some(ErrorCode::Forbidden));
        assert_eq!(
            ErrorBody {
                code: "nope".into(),
                message: String::new()
            }
            .error_code(),
            None
        );
    }

    fn serde_json_like(view: &MessageView) -> String {
        serde_json::to_string(view).expect("serializes")
    }
}
