//! The one refusal type: a request a role refused or could not serve, with
//! the client-visible code. The WebSocket writes it as an `Error` frame, the
//! HTTP API as a JSON error with the code's status (one adapter each), and
//! `rpc` carries it between roles unchanged.

use natter_proto::ErrorCode;

/// A refused or failed request, with the code and a human-readable reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// With [`ErrorCode::Muted`]: the end of the mute (Unix ms).
    pub until_ms: Option<i64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            until_ms: None,
        }
    }

    /// The caller is muted until `until_ms`.
    pub fn muted(until_ms: i64, message: impl Into<String>) -> Refusal {
        Refusal {
            until_ms: Some(until_ms),
            ..Refusal::new(ErrorCode::Muted, message)
        }
    }
}

impl From<ErrorCode> for Refusal {
    /// A refusal with nothing to add to its code: the code's name is the message.
    fn from(code: ErrorCode) -> Refusal {
        Refusal::new(code, code.as_str())
    }
}
