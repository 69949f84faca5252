//! The one client-visible error-code enum. Frames carry it in `ErrorReply` and
//! `Disconnect`, WebSocket closes carry `4000 + code`, and the HTTP API maps it
//! to a status in one place ([`ErrorCode::http_status`]).

use serde::Serialize;

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal => $slug:literal, $status:literal,)*) => {
        /// An error or close reason a client can act on.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum ErrorCode {
            $($(#[$doc])* $name = $value,)*
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code for a number, if it is one.
            pub fn from_u32(value: u32) -> Option<ErrorCode> {
                match value {
                    $($value => Some(ErrorCode::$name),)*
                    _ => None,
                }
            }

            /// A stable snake_case name, used in JSON errors and metric labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $slug,)*
                }
            }

            /// The HTTP status this code maps to.
            pub fn http_status(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $status,)*
                }
            }
        }
    };
}

codes! {
    /// The bytes are not a frame: too short, wrong header length, or wrong packet length.
    BadFrame = 1 => "bad_frame", 400,
    /// The frame body is over the server's limit.
    FrameTooLarge = 2 => "frame_too_large", 413,
    /// The header's protocol version is not 2.
    UnsupportedVersion = 3 => "unsupported_version", 400,
    /// The header's operation is unknown, or not one a client may send.
    UnknownOperation = 4 => "unknown_operation", 400,
    /// The body is not the protobuf message the operation declares.
    BadBody = 5 => "bad_body", 400,
    /// The first frame was not `Auth`, or an HTTP call had no token.
    AuthRequired = 6 => "auth_required", 401,
    /// The token's signature or claims are invalid.
    AuthFailed = 7 => "auth_failed", 401,
    /// The token has expired.
    TokenExpired = 8 => "token_expired", 401,
    /// No `Auth` frame arrived within the auth time-out.
    AuthTimeout = 9 => "auth_timeout", 408,
    /// No frame arrived within the heartbeat time-out.
    HeartbeatTimeout = 10 => "heartbeat_timeout", 408,
    /// The connection's outbound queue overflowed: the client does not read fast enough.
    SlowConsumer = 11 => "slow_consumer", 503,
    /// A push was resent up to the retry cap without a push-ack.
    PushAckTimeout = 12 => "push_ack_timeout", 408,
    /// The message envelope is invalid (no body, unknown receiver, empty text, …).
    InvalidMessage = 13 => "invalid_message", 400,
    /// The thing asked for does not exist.
    NotFound = 14 => "not_found", 404,
    /// The caller may not do this (for example, read someone else's conversation).
    Forbidden = 15 => "forbidden", 403,
    /// The server failed; the request may be retried.
    Internal = 16 => "internal", 500,
    /// The server is shutting down; reconnect later.
    ServerShutdown = 17 => "server_shutdown", 503,
    /// Too many requests; slow down.
    RateLimited = 18 => "rate_limited", 429,
    /// The same device logged in on another connection.
    Replaced = 19 => "replaced", 409,
    /// A request parameter is invalid.
    BadRequest = 20 => "bad_request", 400,
    /// Too many malformed frames on one connection.
    TooManyErrors = 21 => "too_many_errors", 400,
    /// The server is at its connection limit.
    Overloaded = 22 => "overloaded", 503,
    /// The sender is muted in this group; `until_ms` says until when.
    Muted = 23 => "muted", 403,
    /// The group is at its member limit.
    MemberLimit = 24 => "member_limit", 409,
    /// The group is at its admin limit.
    AdminLimit = 25 => "admin_limit", 409,
    /// The caller (or the user acted on) is not a member of the group.
    NotMember = 26 => "not_member", 403,
    /// The group was dissolved; it accepts nothing.
    GroupDissolved = 27 => "group_dissolved", 410,
    /// The request conflicts with the current state (already a member, an application pending, …).
    Conflict = 28 => "conflict", 409,
    /// An HTTP request body is over the server's limit.
    PayloadTooLarge = 29 => "payload_too_large", 413,
    /// An HTTP request's body stopped arriving, or the request was not
    /// answered, within the server's time-outs; the connection is closed.
    RequestTimeout = 30 => "request_timeout", 408,
    /// A per-user quota is used up (for example, groups owned).
    QuotaExceeded = 31 => "quota_exceeded", 403,
    /// The operator's account service, which checks tokens, did not answer
    /// in time or failed; retry later (with back-off).
    AuthUnavailable = 32 => "auth_unavailable", 503,
    /// The operator logged the user out: every connection is closed and
    /// tokens issued before the logout are refused.
    LoggedOut = 33 => "logged_out", 401,
}

impl ErrorCode {
    /// The WebSocket close code used when the server closes for this reason.
    pub fn close_code(self) -> u16 {
        4000 + self as u16
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut slugs = std::collections::HashSet::new();
        for &code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u32(code as u32), Some(code));
            assert!(slugs.insert(code.as_str()), "duplicate slug {code}");
            assert!((4001..5000).contains(&code.close_code()));
        }
        assert_eq!(ErrorCode::from_u32(0), None);
    }
}
