//! The server side of WebSocket (RFC 6455): the handshake's accept key, the
//! frame reader and the frame writer.
//!
//! natter writes pushes straight into the socket from whoever pushes (see
//! [`crate::wire`]), so the gateway owns its WebSocket framing instead of
//! handing every frame to a per-connection writer task. Server frames are
//! unmasked and never fragmented; client frames must be masked and may be
//! fragmented. No extension and no subprotocol is negotiated.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The GUID RFC 6455 appends to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Control frames carry at most this many payload bytes.
const MAX_CONTROL: usize = 125;
/// What the reader asks the socket for at least, per read.
const READ_CHUNK: usize = 4096;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Frame opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close codes the server uses for WebSocket-level failures.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Whether a peer may send `code` in a close frame (RFC 6455, section 7.4):
/// the codes defined for use on the wire, those registered since (1012 to
/// 1014), and the ranges for libraries and applications. 1004 is reserved,
/// and 1005, 1006 and 1015 only ever stand for a missing close frame.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// One complete message (fragments reassembled) or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Binary(Bytes),
    Text(Bytes),
    Ping(Bytes),
    Pong,
    /// The peer closes, with its code and reason if it gave them.
    Close(Option<(u16, String)>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer broke the protocol; the server closes with this code.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// A message over the limit; the server closes with 1009.
    #[error("message of at least {len} bytes exceeds the limit of {max}")]
    TooBig { len: u64, max: usize },
    /// A text message that is not UTF-8; the server closes with 1007.
    #[error("text message is not UTF-8")]
    NotUtf8,
    /// The socket ended (cleanly or not) without a close frame.
    #[error("connection ended")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// The close code to answer with, when the connection can still take one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::Protocol(_) => Some(CLOSE_PROTOCOL_ERROR),
            ReadError::TooBig { .. } => Some(CLOSE_TOO_BIG),
            ReadError::NotUtf8 => Some(CLOSE_INVALID_DATA),
            ReadError::Eof | ReadError::Io(_) => None,
        }
    }
}

/// Reads client frames from a byte stream and reassembles messages.
pub struct Reader {
    buf: BytesMut,
    max_message: usize,
    /// A fragmented message being reassembled: its opcode and bytes so far.
    partial: Option<(Opcode, BytesMut)>,
}

impl Reader {
    /// `initial` bytes may already have been read past the handshake.
    pub fn new(max_message: usize, initial: Bytes) -> Reader {
        let mut buf = BytesMut::with_capacity(READ_CHUNK.max(initial.len()));
        buf.extend_from_slice(&initial);
        Reader {
            buf,
            max_message,
            partial: None,
        }
    }

    /// The next message or control frame from `io`.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<Incoming, ReadError> {
        loop {
            if let Some(incoming) = self.parse()? {
                return Ok(incoming);
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            if io.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadError::Eof);
            }
        }
    }

    /// Takes one message or control frame out of the buffered bytes, if
    /// they hold a whole one.
    pub fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(frame) = self.frame()? else {
                return Ok(None);
            };
            let RawFrame {
                fin,
                opcode,
                payload,
            } = frame;
            if opcode.is_control() {
                return control(opcode, payload).map(Some);
            }
            match (opcode, self.partial.take()) {
                (Opcode::Continuation, None) => {
                    return Err(ReadError::Protocol("continuation without a message"))
                }
                (Opcode::Continuation, Some((first, mut so_far))) => {
                    if so_far.len() + payload.len() > self.max_message {
                        return Err(ReadError::TooBig {
                            len: (so_far.len() + payload.len()) as u64,
                            max: self.max_message,
                        });
                    }
                    so_far.extend_from_slice(&payload);
                    if fin {
                        return data(first, so_far.freeze()).map(Some);
                    }
                    self.partial = Some((first, so_far));
                }
                (_, Some(_)) => {
                    return Err(ReadError::Protocol("new message inside a fragmented one"))
                }
                (opcode, None) if fin => return data(opcode, payload.freeze()).map(Some),
                (opcode, None) => self.partial = Some((opcode, payload)),
            }
        }
    }

    /// One whole frame from the buffer, unmasked.
    fn frame(&mut self) -> Result<Option<RawFrame>, ReadError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        let opcode = Opcode::from_u8(b[0] & 0x0F).ok_or(ReadError::Protocol("unknown opcode"))?;
        if b[1] & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let (len, at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (u64::from_be_bytes(n), 10)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if opcode.is_control() && (!fin || len > MAX_CONTROL as u64) {
            return Err(ReadError::Protocol(
                "control frames must be whole and at most 125 bytes",
            ));
        }
        if len > self.max_message as u64 {
            return Err(ReadError::TooBig {
                len,
                max: self.max_message,
            });
        }
        let len = len as usize;
        if b.len() < at + 4 + len {
            self.buf.reserve(at + 4 + len - b.len());
            return Ok(None);
        }
        let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        self.buf.advance(at + 4);
        let mut payload = self.buf.split_to(len);
        unmask(&mut payload, mask);
        Ok(Some(RawFrame {
            fin,
            opcode,
            payload,
        }))
    }
}

struct RawFrame {
    fin: bool,
    opcode: Opcode,
    payload: BytesMut,
}

fn data(opcode: Opcode, payload: Bytes) -> Result<Incoming, ReadError> {
    match opcode {
        Opcode::Text if std::str::from_utf8(&payload).is_err() => Err(ReadError::NotUtf8),
        Opcode::Text => Ok(Incoming::Text(payload)),
        _ => Ok(Incoming::Binary(payload)),
    }
}

fn control(opcode: Opcode, payload: BytesMut) -> Result<Incoming, ReadError> {
    Ok(match opcode {
        Opcode::Ping => Incoming::Ping(payload.freeze()),
        Opcode::Pong => Incoming::Pong,
        _ => match payload.len() {
            0 => Incoming::Close(None),
            1 => return Err(ReadError::Protocol("close payload of one byte")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                if !close_code_allowed(code) {
                    return Err(ReadError::Protocol("close code not allowed on the wire"));
                }
                let reason = std::str::from_utf8(&payload[2..])
                    .map_err(|_| ReadError::Protocol("close reason is not UTF-8"))?;
                Incoming::Close(Some((code, reason.to_string())))
            }
        },
    })
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends the header of an unfragmented, unmasked server frame whose
/// payload of `len` bytes follows.
pub fn put_header(dst: &mut BytesMut, opcode: Opcode, len: usize) {
    dst.put_u8(0x80 | opcode as u8);
    if len < 126 {
        dst.put_u8(len as u8);
    } else if len <= usize::from(u16::MAX) {
        dst.put_u8(126);
        dst.put_u16(len as u16);
    } else {
        dst.put_u8(127);
        dst.put_u64(len as u64);
    }
}

/// Appends a whole server frame.
pub fn put_frame(dst: &mut BytesMut, opcode: Opcode, payload: &[u8]) {
    dst.reserve(payload.len() + 10);
    put_header(dst, opcode, payload.len());
    dst.put_slice(payload);
}

/// Appends a close frame; the reason is cut to fit a control frame.
pub fn put_close(dst: &mut BytesMut, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    put_frame(dst, Opcode::Close, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn reader(bytes: &[u8]) -> Reader {
        Reader::new(1 << 20, Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn reads_masked_messages_of_every_length_encoding() {
        for len in [0, 1, 5, 125, 126, 1000, 65535, 65536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let bytes = client_frame(true, 2, &payload, [1, 2, 3, 4]);
            let mut r = reader(&bytes);
            assert_eq!(
                r.parse().unwrap(),
                Some(Incoming::Binary(Bytes::from(payload))),
                "len {len}"
            );
            assert_eq!(r.parse().unwrap(), None);
        }
    }

    #[test]
    fn waits_for_the_rest_of_a_split_frame() {
        let bytes = client_frame(true, 2, b"hello world", [9, 8, 7, 6]);
        for cut in 0..bytes.len() {
            let mut r = reader(&bytes[..cut]);
            assert_eq!(r.parse().unwrap(), None, "cut at {cut}");
            r.buf.extend_from_slice(&bytes[cut..]);
            assert_eq!(
                r.parse().unwrap(),
                Some(Incoming::Binary(Bytes::from_static(b"hello world")))
            );
        }
    }

    #[test]
    fn reassembles_fragments_around_control_frames() {
        let mut bytes = client_frame(false, 2, b"abc", [1, 1, 1, 1]);
        bytes.extend(client_frame(true, 9, b"p", [2, 2, 2, 2]));
        bytes.extend(client_frame(false, 0, b"def", [3, 3, 3, 3]));
        bytes.extend(client_frame(true, 0, b"g", [4, 4, 4, 4]));
        bytes.extend(client_frame(true, 1, b"text", [5, 5, 5, 5]));
        let mut r = reader(&bytes);
        assert_eq!(
            r.parse().unwrap(),
            Some(Incoming::Ping(Bytes::from_static(b"p")))
        );
        assert_eq!(
            r.parse().unwrap(),
            Some(Incoming::Binary(Bytes::from_static(b"abcdefg")))
        );
        assert_eq!(
            r.parse().unwrap(),
            Some(Incoming::Text(Bytes::from_static(b"text")))
        );
    }

    #[test]
    fn reads_close_with_and_without_a_reason() {
        let mut payload = 4006u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut bytes = client_frame(true, 8, &payload, [7, 0, 7, 0]);
        bytes.extend(client_frame(true, 8, b"", [0, 0, 0, 0]));
        bytes.extend(client_frame(true, 10, b"x", [1, 0, 0, 0]));
        let mut r = reader(&bytes);
        assert_eq!(
            r.parse().unwrap(),
            Some(Incoming::Close(Some((4006, "bye".into()))))
        );
        assert_eq!(r.parse().unwrap(), Some(Incoming::Close(None)));
        assert_eq!(r.parse().unwrap(), Some(Incoming::Pong));
    }

    #[test]
    fn refuses_protocol_violations() {
        let unmasked = [0x82, 0x01, b'x'];
        let rsv = {
            let mut f = client_frame(true, 2, b"x", [1, 2, 3, 4]);
            f[0] |= 0x40;
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", unmasked.to_vec()),
            ("reserved bits", rsv),
            ("unknown opcode", client_frame(true, 3, b"x", [1, 2, 3, 4])),
            (
                "stray continuation",
                client_frame(true, 0, b"x", [1, 2, 3, 4]),
            ),
            (
                "fragmented ping",
                client_frame(false, 9, b"x", [1, 2, 3, 4]),
            ),
            (
                "long ping",
                client_frame(true, 9, &[0u8; 126], [1, 2, 3, 4]),
            ),
            ("one-byte close", client_frame(true, 8, b"x", [1, 2, 3, 4])),
            (
                "close code 999",
                client_frame(true, 8, &[3, 231], [1, 2, 3, 4]),
            ),
            (
                "close code 1005",
                client_frame(true, 8, &[3, 237], [1, 2, 3, 4]),
            ),
            (
                "close code 1006",
                client_frame(true, 8, &[3, 238], [1, 2, 3, 4]),
            ),
            (
                "close code 2000",
                client_frame(true, 8, &[7, 208], [1, 2, 3, 4]),
            ),
            (
                "close code 5000",
                client_frame(true, 8, &[19, 136], [1, 2, 3, 4]),
            ),
            (
                "close reason not UTF-8",
                client_frame(true, 8, &[3, 232, 0xff], [1, 2, 3, 4]),
            ),
            ("message inside a message", {
                let mut f = client_frame(false, 2, b"a", [1, 2, 3, 4]);
                f.extend(client_frame(true, 2, b"b", [1, 2, 3, 4]));
                f
            }),
        ];
        for (name, bytes) in cases {
            let err = reader(&bytes).parse().expect_err(name);
            assert_eq!(
                err.close_code(),
                Some(CLOSE_PROTOCOL_ERROR),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn close_codes_follow_the_rfc_ranges() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4000, 4999,
        ] {
            assert!(close_code_allowed(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!close_code_allowed(code), "{code}");
        }
    }

    #[test]
    fn a_text_message_must_be_utf8_even_across_fragments() {
        let mut bytes = client_frame(false, 1, &[0xE2, 0x82], [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 0, &[0xAC], [1, 2, 3, 4]));
        assert_eq!(
            reader(&bytes).parse().unwrap(),
            Some(Incoming::Text(Bytes::from_static("€".as_bytes())))
        );
        let err = reader(&client_frame(true, 1, &[0xE2, 0x82], [1, 2, 3, 4]))
            .parse()
            .unwrap_err();
        assert_eq!(err.close_code(), Some(CLOSE_INVALID_DATA));
    }

    #[test]
    fn refuses_messages_over_the_limit_before_reading_them() {
        // The header alone announces the length: nothing more is buffered.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let err = Reader::new(1000, Bytes::from(header)).parse().unwrap_err();
        assert_eq!(err.close_code(), Some(CLOSE_TOO_BIG));
        // Fragments count together.
        let mut bytes = client_frame(false, 2, &[0u8; 600], [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 0, &[0u8; 600], [1, 2, 3, 4]));
        let err = Reader::new(1000, Bytes::from(bytes)).parse().unwrap_err();
        assert!(matches!(err, ReadError::TooBig { len: 1200, .. }), "{err}");
    }

    #[tokio::test]
    async fn reads_from_a_stream_a_byte_at_a_time() {
        let mut bytes = client_frame(true, 2, b"first", [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 2, &[5u8; 5000], [4, 3, 2, 1]));
        let (mut a, mut b) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(&bytes).await.unwrap();
        });
        let mut r = Reader::new(1 << 20, Bytes::new());
        assert_eq!(
            r.next(&mut b).await.unwrap(),
            Incoming::Binary(Bytes::from_static(b"first"))
        );
        assert_eq!(
            r.next(&mut b).await.unwrap(),
            Incoming::Binary(Bytes::from(vec![5u8; 5000]))
        );
        writer.await.unwrap();
        assert!(matches!(r.next(&mut b).await, Err(ReadError::Eof)));
    }

    #[test]
    fn server_frames_round_trip_through_a_client_parser() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![3u8; len];
            let mut dst = BytesMut::new();
            put_frame(&mut dst, Opcode::Binary, &payload);
            // A server frame is a client frame without the mask bit and key.
            assert_eq!(dst[0], 0x82);
            let header = dst.len() - len;
            assert_eq!(
                header,
                if len < 126 {
                    2
                } else if len < 65536 {
                    4
                } else {
                    10
                }
            );
            assert_eq!(&dst[header..], &payload[..]);
        }
        let mut dst = BytesMut::new();
        put_close(&mut dst, 4006, &"é".repeat(100));
        assert_eq!(dst[0], 0x88);
        assert!(usize::from(dst[1]) <= MAX_CONTROL);
        assert!(std::str::from_utf8(&dst[4..]).is_ok());
    }
}
