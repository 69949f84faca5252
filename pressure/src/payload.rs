//! The payload every pressure message carries, so a receiver can tell who
//! sent it, which send it was and when it was meant to leave.
//!
//! A `Custom` message body of kind `natter.pressure` whose data is
//! `version u8 | run u64 | sender u64 | device u16 | client_seq u64 | intended unix ns u64`
//! (big-endian), padded with zeros to the message size. The sender is the
//! simulated user's number `n` (user id `u-{n}`, see [`crate::user`]): eight
//! bytes, read without an allocation, whatever the id's length.

use natter_proto::msg::{Content, Custom, MessageBody};

use crate::user::SimUser;

pub const KIND: &str = "natter.pressure";
const VERSION: u8 = 1;
/// The smallest payload.
pub const MIN_SIZE: usize = 1 + 8 + 8 + 2 + 8 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    pub run: u64,
    pub sender: SimUser,
    pub device: u16,
    pub client_seq: u64,
    pub intended_ns: u64,
}

impl Payload {
    pub fn body(&self, size: usize) -> MessageBody {
        let mut data = Vec::with_capacity(size.max(MIN_SIZE));
        data.push(VERSION);
        data.extend_from_slice(&self.run.to_be_bytes());
        data.extend_from_slice(&self.sender.0.to_be_bytes());
        data.extend_from_slice(&self.device.to_be_bytes());
        data.extend_from_slice(&self.client_seq.to_be_bytes());
        data.extend_from_slice(&self.intended_ns.to_be_bytes());
        data.resize(size.max(MIN_SIZE), 0);
        MessageBody::custom(KIND, data)
    }

    /// The payload of a pressure message; `None` for any other message.
    pub fn parse(body: Option<&MessageBody>) -> Option<Payload> {
        let Some(Content::Custom(Custom { kind, data })) = body.and_then(|b| b.content.as_ref())
        else {
            return None;
        };
        if kind != KIND || data.len() < MIN_SIZE || data[0] != VERSION {
            return None;
        }
        let u64_at = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap_or([0; 8]));
        Some(Payload {
            run: u64_at(1),
            sender: SimUser(u64_at(9)),
            device: u16::from_be_bytes([data[17], data[18]]),
            client_seq: u64_at(19),
            intended_ns: u64_at(27),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_any_size() {
        let p = Payload {
            run: 7,
            sender: SimUser(1_000_001),
            device: 3,
            client_seq: 99,
            intended_ns: 1_700_000_000_000_000_000,
        };
        for size in [0, MIN_SIZE, 64, 4096] {
            let body = p.body(size);
            let Some(Content::Custom(c)) = &body.content else {
                panic!("custom body")
            };
            assert_eq!(c.data.len(), size.max(MIN_SIZE));
            assert_eq!(Payload::parse(Some(&body)), Some(p));
        }
        assert_eq!(Payload::parse(Some(&MessageBody::text("hi"))), None);
        assert_eq!(
            Payload::parse(Some(&MessageBody::custom(KIND, vec![1, 2]))),
            None
        );
        assert_eq!(Payload::parse(None), None);
    }
}
