//! The frame: a fixed 20-byte big-endian header followed by a protobuf body.
//!
//! ```text
//! offset  size  field
//!      0     4  packet length (header + body), u32
//!      4     2  header length, always 20, u16
//!      6     2  protocol version, always 2, u16
//!      8     4  operation, u32 (see [`Op`])
//!     12     4  seq, u32
//!     16     4  ack, u32
//!     20     …  body: one protobuf message, as the operation says
//! ```
//!
//! One WebSocket binary message carries exactly one frame, so the packet length
//! must equal the WebSocket message length. Decoding checks the header before it
//! looks at the body, and every failure names the [`ErrorCode`] the peer is sent.

use bytes::{BufMut, Bytes, BytesMut};

use crate::ErrorCode;

/// Length of the fixed header in bytes.
pub const HEADER_LEN: usize = 20;
/// The only protocol version this codec speaks.
pub const VERSION: u16 = 2;
/// Default upper bound of a frame body (64 KiB); servers make it configurable.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// The operation carried in a frame header.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Op {
            $($(#[$doc])* $name = $value,)*
        }

        impl Op {
            /// Every operation, in numeric order.
            pub const ALL: &'static [Op] = &[$(Op::$name,)*];

            /// The operation for a header value, if it is one.
            pub fn from_u32(value: u32) -> Option<Op> {
                match value {
                    $($value => Some(Op::$name),)*
                    _ => None,
                }
            }

            /// The operation's name as used in logs and metrics.
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$name => stringify!($name),)*
                }
            }
        }
    };
}

ops! {
    /// Client → server, first frame: `AuthRequest`.
    Auth = 1,
    /// Server → client: `AuthReply`.
    AuthReply = 2,
    /// Client → server keep-alive, empty body.
    Heartbeat = 3,
    /// Server → client: `HeartbeatReply`.
    HeartbeatReply = 4,
    /// Client → server: `SendMessage`.
    Message = 5,
    /// Server → client, the durable ack of a message: `MessageReply`.
    MessageReply = 6,
    /// Server → client: a `Message` delivered to this device.
    Push = 7,
    /// Client → server: receipt of a push; `ack` carries the push's `seq`, empty body.
    PushAck = 8,
    /// Client → server: `SyncRequest`.
    Sync = 9,
    /// Server → client: `SyncReply`.
    SyncReply = 10,
    /// Server → client: `Notify` (group events, call signals, session events).
    Notify = 11,
    /// Server → client, just before the server closes: `Disconnect`.
    Disconnect = 12,
    /// Server → client: `ErrorReply` for a request that failed; `seq` echoes the request.
    Error = 13,
    /// Client → server: `ReadRequest`, the user has read a conversation up to a `conv_seq`.
    Read = 14,
    /// Server → client: `ReadReply`, the user's read state after a `Read`.
    ReadReply = 15,
    /// Client → server: `Typing`, the user is typing in a conversation; no reply.
    Typing = 16,
}

/// A decoded frame. The body is still protobuf bytes; see [`Frame::message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub op: Op,
    pub seq: u32,
    pub ack: u32,
    pub body: Bytes,
}

/// Why a byte string is not a frame this codec accepts.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("header length is {0}, expected {HEADER_LEN}")]
    BadHeaderLength(u16),
    #[error("packet length {declared} does not match the {actual} bytes received")]
    LengthMismatch { declared: u32, actual: usize },
    #[error("protocol version {version} is not supported (expected {VERSION})")]
    UnsupportedVersion { version: u16, seq: u32 },
    #[error("body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize, seq: u32 },
    #[error("unknown operation {op}")]
    UnknownOp { op: u32, seq: u32 },
}

impl FrameError {
    /// The error code sent to the peer for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooShort { .. }
            | FrameError::BadHeaderLength(_)
            | FrameError::LengthMismatch { .. } => ErrorCode::BadFrame,
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::UnknownOp { .. } => ErrorCode::UnknownOperation,
        }
    }

    /// The request's seq when the header was readable enough to trust it.
    pub fn seq(&self) -> u32 {
        match self {
            FrameError::UnsupportedVersion { seq, .. }
            | FrameError::TooLarge { seq, .. }
            | FrameError::UnknownOp { seq, .. } => *seq,
            _ => 0,
        }
    }
}

/// The body of a frame is not the protobuf message its operation declares.
#[derive(Debug, thiserror::Error)]
#[error("body of {op:?} is not a valid {expected}: {source}")]
pub struct BodyError {
    pub op: Op,
    pub expected: &'static str,
    #[source]
    pub source: prost::DecodeError,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Frame {
    /// A frame with an already-encoded body.
    pub fn raw(op: Op, seq: u32, ack: u32, body: impl Into<Bytes>) -> Frame {
        Frame {
            op,
            seq,
            ack,
            body: body.into(),
        }
    }

    /// A frame whose body is the given protobuf message.
    pub fn new(op: Op, seq: u32, ack: u32, message: &impl prost::Message) -> Frame {
        Frame::raw(op, seq, ack, message.encode_to_vec())
    }

    /// A frame with an empty body.
    pub fn empty(op: Op, seq: u32, ack: u32) -> Frame {
        Frame::raw(op, seq, ack, Bytes::new())
    }

    /// Decodes one frame from one WebSocket message, checking the header
    /// before the body: length, header length, version, body limit, operation.
    pub fn decode(buf: &[u8], max_body: usize) -> Result<Frame, FrameError> {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::TooShort { len: buf.len() });
        }
        let packet_len = be_u32(buf, 0);
        let header_len = be_u16(buf, 4);
        let version = be_u16(buf, 6);
        let op = be_u32(buf, 8);
        let seq = be_u32(buf, 12);
        let ack = be_u32(buf, 16);
        if usize::from(header_len) != HEADER_LEN {
            return Err(FrameError::BadHeaderLength(header_len));
        }
        if packet_len as usize != buf.len() {
            return Err(FrameError::LengthMismatch {
                declared: packet_len,
                actual: buf.len(),
            });
        }
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion { version, seq });
        }
        let body_len = buf.len() - HEADER_LEN;
        if body_len > max_body {
            return Err(FrameError::TooLarge {
                len: body_len,
                max: max_body,
                seq,
            });
        }
        let op = Op::from_u32(op).ok_or(FrameError::UnknownOp { op, seq })?;
        Ok(Frame {
            op,
            seq,
            ack,
            body: Bytes::copy_from_slice(&buf[HEADER_LEN..]),
        })
    }

    /// The frame's length on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends the frame's wire bytes to `dst`.
    pub fn encode_to(&self, dst: &mut BytesMut) {
        Frame::encode_parts(dst, self.op, self.seq, self.ack, &self.body);
    }

    /// Appends the wire bytes of a frame made of these parts, without
    /// building the frame.
    pub fn encode_parts(dst: &mut BytesMut, op: Op, seq: u32, ack: u32, body: &[u8]) {
        let len = HEADER_LEN + body.len();
        dst.reserve(len);
        dst.put_u32(len as u32);
        dst.put_u16(HEADER_LEN as u16);
        dst.put_u16(VERSION);
        dst.put_u32(op as u32);
        dst.put_u32(seq);
        dst.put_u32(ack);
        dst.put_slice(body);
    }

    /// The frame's wire bytes.
    pub fn encode(&self) -> Bytes {
        let mut dst = BytesMut::with_capacity(self.wire_len());
        self.encode_to(&mut dst);
        dst.freeze()
    }

    /// Decodes the body as the protobuf message `M`.
    pub fn message<M: prost::Message + Default>(&self) -> Result<M, BodyError> {
        M::decode(self.body.as_ref()).map_err(|source| BodyError {
            op: self.op,
            expected: std::any::type_name::<M>()
                .rsplit("::")
                .next()
                .unwrap_or("message"),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{AuthRequest, ErrorReply};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_heartbeat() {
        let frame = Frame::empty(Op::Heartbeat, 7, 0);
        assert_eq!(
            hex(&frame.encode()),
            "0000001400140002000000030000000700000000"
        );
    }

    #[test]
    fn golden_auth() {
        let body = AuthRequest {
            token: "abc".into(),
            client: String::new(),
            device: String::new(),
        };
        let frame = Frame::new(Op::Auth, 1, 0, &body);
        // body: field 1 (token), wire type 2, length 3, "abc"
        assert_eq!(
            hex(&frame.encode()),
            "00000019001400020000000100000001000000000a03616263"
        );
        let back = Frame::decode(&frame.encode(), DEFAULT_MAX_BODY).expect("decodes");
        assert_eq!(back.message::<AuthRequest>().expect("body").token, "abc");
    }

    #[test]
    fn golden_push_ack_carries_ack() {
        let frame = Frame::empty(Op::PushAck, 0, 0x0102_0304);
        assert_eq!(
            hex(&frame.encode()),
            "0000001400140002000000080000000001020304"
        );
    }

    #[test]
    fn rejects_short_frames() {
        assert_eq!(
            Frame::decode(&[0; 19], 100),
            Err(FrameError::TooShort { len: 19 })
        );
        assert_eq!(
            Frame::decode(&[], 100),
            Err(FrameError::TooShort { len: 0 })
        );
    }

    #[test]
    fn rejects_wrong_header_length() {
        let mut bytes = Frame::empty(Op::Heartbeat, 1, 0).encode().to_vec();
        bytes[5] = 16;
        assert_eq!(
            Frame::decode(&bytes, 100),
            Err(FrameError::BadHeaderLength(16))
        );
        assert_eq!(
            Frame::decode(&bytes, 100).unwrap_err().code(),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn rejects_length_mismatch() {
        let mut bytes = Frame::raw(Op::Heartbeat, 1, 0, vec![1, 2, 3])
            .encode()
            .to_vec();
        bytes.pop();
        assert_eq!(
            Frame::decode(&bytes, 100),
            Err(FrameError::LengthMismatch {
                declared: 23,
                actual: 22
            })
        );
    }

    #[test]
    fn rejects_unknown_version_and_op_with_seq() {
        let mut bytes = Frame::empty(Op::Heartbeat, 9, 0).encode().to_vec();
        // Version 1 (integer user ids) is refused as any other.
        bytes[7] = 1;
        let err = Frame::decode(&bytes, 100).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion { version: 1, seq: 9 });
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);

        let mut bytes = Frame::empty(Op::Heartbeat, 9, 0).encode().to_vec();
        bytes[11] = 99;
        let err = Frame::decode(&bytes, 100).unwrap_err();
        assert_eq!(err, FrameError::UnknownOp { op: 99, seq: 9 });
        assert_eq!(err.seq(), 9);
        assert_eq!(err.code(), ErrorCode::UnknownOperation);
    }

    #[test]
    fn rejects_oversized_body() {
        let bytes = Frame::raw(Op::Message, 3, 0, vec![0u8; 101]).encode();
        let err = Frame::decode(&bytes, 100).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: 101,
                max: 100,
                seq: 3
            }
        );
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert!(Frame::decode(&bytes, 101).is_ok());
    }

    #[test]
    fn body_that_is_not_the_declared_message_is_an_error() {
        // A length-delimited field whose length runs past the end.
        let frame = Frame::raw(Op::Auth, 1, 0, vec![0x0a, 0x05, b'a']);
        assert!(frame.message::<AuthRequest>().is_err());
        // Wire type 7 does not exist.
        let frame = Frame::raw(Op::Error, 1, 0, vec![0x0f]);
        assert!(frame.message::<ErrorReply>().is_err());
    }

    proptest! {
        #[test]
        fn round_trip(op in proptest::sample::select(Op::ALL.to_vec()), seq: u32, ack: u32,
                      body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let frame = Frame::raw(op, seq, ack, body);
            let bytes = frame.encode();
            prop_assert_eq!(bytes.len(), frame.wire_len());
            prop_assert_eq!(Frame::decode(&bytes, 512).expect("round trip"), frame);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(&bytes, 32);
        }
    }
}
