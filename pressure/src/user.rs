//! Simulated users: user number `n` is the user id `u-{n}`.
//!
//! Every run talks to the server in string ids (tokens, sends, pushes,
//! history), so every benchmark exercises them. Inside the harness a user
//! is its number: the ledger holds millions of sends and deliveries, and a
//! `Copy` number keeps reconciling them free of one string per message. The
//! string form is made only at the edges (a token, a send, a report line).

use std::fmt;

use natter_proto::UserId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The prefix of every simulated user's id.
pub const PREFIX: &str = "u-";

/// A simulated user: number `n`, user id `u-{n}`. Ordered by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SimUser(pub u64);

impl SimUser {
    /// The user id on the wire (allocates: for the edges only).
    pub fn id(self) -> UserId {
        // "u-" and at most 20 digits: always a valid user id.
        UserId::parse(&self.to_string())
            .unwrap_or_else(|_| unreachable!("u-{{n}} is a valid user id"))
    }

    /// The user whose id is `s`, if `s` is a simulated user's id (in its
    /// one spelling: no sign, no leading zeros).
    pub fn parse(s: &str) -> Option<SimUser> {
        let digits = s.strip_prefix(PREFIX)?;
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return None;
        }
        digits.parse().ok().map(SimUser)
    }

    /// The one-to-one conversation id of two users, as the server names
    /// it: the byte-wise smaller id first (so `u-10` before `u-9`).
    pub fn conversation_with(self, other: SimUser) -> String {
        let (a, b) = (self.to_string(), other.to_string());
        if a <= b {
            format!("p:{a}:{b}")
        } else {
            format!("p:{b}:{a}")
        }
    }
}

impl fmt::Display for SimUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.0)
    }
}

/// In JSON (the report, and the ledger a worker process hands over) a
/// user is its id, `"u-{n}"`; writing and reading it allocates nothing.
impl Serialize for SimUser {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SimUser {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SimUser, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SimUser;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a simulated user id, u-{n}")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SimUser, E> {
                SimUser::parse(s).ok_or_else(|| E::custom(format!("not a simulated user: {s:?}")))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_u_dash_number_and_round_trip() {
        let u = SimUser(1234);
        assert_eq!(u.to_string(), "u-1234");
        assert_eq!(u.id().as_str(), "u-1234");
        assert_eq!(SimUser::parse("u-1234"), Some(u));
        assert_eq!(SimUser(u64::MAX).id().len(), 22);
        for bad in [
            "u-",
            "u-01",
            "u--1",
            "U-1",
            "u-1x",
            "1",
            "u-+1",
            "u-99999999999999999999",
        ] {
            assert_eq!(SimUser::parse(bad), None, "{bad}");
        }
        let json = serde_json::to_string(&vec![u, SimUser(0)]).expect("serializes");
        assert_eq!(json, r#"["u-1234","u-0"]"#);
        let back: Vec<SimUser> = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, vec![u, SimUser(0)]);
        assert!(serde_json::from_str::<SimUser>("1234").is_err());
    }

    #[test]
    fn conversations_order_ids_byte_wise() {
        assert_eq!(SimUser(9).conversation_with(SimUser(10)), "p:u-10:u-9");
        assert_eq!(SimUser(10).conversation_with(SimUser(9)), "p:u-10:u-9");
        assert_eq!(
            SimUser(9).conversation_with(SimUser(10)),
            SimUser(9).id().conversation_with(&SimUser(10).id())
        );
        assert_eq!(SimUser(3).conversation_with(SimUser(3)), "p:u-3:u-3");
    }
}
