//! User ids: the operator's own account ids, as strings.
//!
//! A user id is 1–64 bytes, each one of `A–Z a–z 0–9 _ - . @`, and is not
//! `.` or `..`. Ids are compared byte for byte (`Alice` and `alice` are two
//! users). The set is chosen so that an id stands in a conversation id
//! (`p:{a}:{b}` — no `:`), in a URL path segment or query value, in a Redis
//! key and in a log line without escaping; `.` and `..` alone are refused
//! because URL normalisation would eat them as path segments.
//!
//! [`UserId`] is parsed once at the edge (the wire, a token, an HTTP path)
//! and is valid from then on; it clones without copying the bytes.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest user id, in bytes.
pub const MAX_USER_ID_LEN: usize = 64;

/// Why a string is not a user id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserIdError {
    #[error("user id is empty")]
    Empty,
    #[error("user id is longer than {MAX_USER_ID_LEN} bytes")]
    TooLong,
    #[error("user id may hold only letters, digits and _ - . @")]
    BadCharacter,
    #[error("user id may not be . or ..")]
    Dots,
}

/// A valid user id (see the module docs for the rule).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

/// Whether `b` may appear in a user id.
pub const fn is_user_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@')
}

/// Checks `s` against the user id rule without allocating.
pub fn check_user_id(s: &str) -> Result<(), UserIdError> {
    if s.is_empty() {
        return Err(UserIdError::Empty);
    }
    if s.len() > MAX_USER_ID_LEN {
        return Err(UserIdError::TooLong);
    }
    if !s.bytes().all(is_user_id_byte) {
        return Err(UserIdError::BadCharacter);
    }
    if s == "." || s == ".." {
        return Err(UserIdError::Dots);
    }
    Ok(())
}

impl UserId {
    /// Parses a user id.
    pub fn parse(s: &str) -> Result<UserId, UserIdError> {
        check_user_id(s)?;
        Ok(UserId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The one-to-one conversation id of two users: `p:{a}:{b}` with the
    /// byte-wise smaller id first (a user's notes to self: `p:{a}:{a}`).
    pub fn conversation_with(&self, other: &UserId) -> String {
        let (a, b) = if self <= other {
            (self, other)
        } else {
            (other, self)
        };
        format!("p:{a}:{b}")
    }
}

/// A stable shard number in `0..shards` for a key such as a user id
/// (FNV-1a over its bytes), for maps sharded by user.
pub fn shard_of(key: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

impl TryFrom<&str> for UserId {
    type Error = UserIdError;
    fn try_from(s: &str) -> Result<UserId, UserIdError> {
        UserId::parse(s)
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;
    fn try_from(s: String) -> Result<UserId, UserIdError> {
        check_user_id(&s)?;
        Ok(UserId(Arc::from(s)))
    }
}

impl std::str::FromStr for UserId {
    type Err = UserIdError;
    fn from_str(s: &str) -> Result<UserId, UserIdError> {
        UserId::parse(s)
    }
}

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for UserId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for UserId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for UserId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.0.to_string()
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<UserId, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        UserId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_set() {
        for id in [
            "a",
            "u-1234",
            "20210419184685527C1DB08A",
            "0x52908400098527886E0F7030069857D2E4169EE7",
            "first.last@example.com",
            "under_score",
            "...",
            ".hidden",
            &"x".repeat(64),
        ] {
            assert_eq!(UserId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(UserId::parse(""), Err(UserIdError::Empty));
        assert_eq!(UserId::parse(&"x".repeat(65)), Err(UserIdError::TooLong));
        assert_eq!(UserId::parse("."), Err(UserIdError::Dots));
        assert_eq!(UserId::parse(".."), Err(UserIdError::Dots));
        for bad in [
            "a:b", "a b", "a/b", "a%20", "a?b", "a#b", "a+b", "é", "a\0", "a\n", "😀", "a,b",
        ] {
            assert_eq!(
                UserId::parse(bad),
                Err(UserIdError::BadCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn compares_byte_for_byte() {
        let upper = UserId::parse("Alice").unwrap();
        let lower = UserId::parse("alice").unwrap();
        assert_ne!(upper, lower);
        assert!(upper < lower, "'A' (0x41) sorts before 'a' (0x61)");
    }

    #[test]
    fn conversation_ids_are_canonical() {
        let a = UserId::parse("u-10").unwrap();
        let b = UserId::parse("u-9").unwrap();
        assert_eq!(a.conversation_with(&b), "p:u-10:u-9");
        assert_eq!(b.conversation_with(&a), "p:u-10:u-9");
        assert_eq!(a.conversation_with(&a), "p:u-10:u-10");
    }

    #[test]
    fn serde_validates() {
        let id: UserId = serde_json::from_str("\"bob@x\"").unwrap();
        assert_eq!(id, "bob@x");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"bob@x\"");
        assert!(serde_json::from_str::<UserId>("\"a:b\"").is_err());
        assert!(serde_json::from_str::<UserId>("42").is_err());
    }
}
