//! The JSON form of 64-bit integers and bytes, as serde field attributes.
//!
//! One rule for every JSON body, the protobuf JSON mapping's: a 64-bit
//! integer (`u64`, `i64`: ids, sequence numbers, cursors, times, sizes) is a
//! decimal **string**, because a JSON number is a double in most readers and
//! holds integers exactly only up to 2^53; bytes are **base64** (standard
//! alphabet, padded). 32-bit integers, doubles and booleans stay JSON
//! numbers and booleans. On input, a 64-bit integer may also be a JSON
//! number, and bytes may be standard or URL-safe base64, padded or not.
//!
//! Use as `#[serde(with = "crate::json::int64")]` on a `u64` or `i64` field,
//! `opt_int64` on an `Option` of one, `int64_list` on a `Vec` of them, and
//! `bytes` on a `Vec<u8>`.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use base64::Engine as _;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::Deserialize;

/// A 64-bit integer type: read from a decimal string or a JSON number.
pub trait Int64: Copy + fmt::Display + FromStr + TryFrom<u64> + TryFrom<i64> {}
impl Int64 for u64 {}
impl Int64 for i64 {}

/// A 64-bit integer read from a string or a number.
struct Lenient<T>(T);

impl<'de, T: Int64> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: Int64> Visitor<'_> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-bit integer as a decimal string (or a number)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                // Digits with an optional minus sign: no `+`, no spaces.
                let digits = v.strip_prefix('-').unwrap_or(v);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                v.parse()
                    .map(Lenient)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::try_from(v)
                    .map(Lenient)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::try_from(v)
                    .map(Lenient)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A `u64` or `i64` as a decimal string.
pub mod int64 {
    use super::*;

    pub fn serialize<T: Int64, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T: Int64, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        Lenient::deserialize(d).map(|v| v.0)
    }
}

/// An `Option` of a `u64` or `i64`: a decimal string, or null.
pub mod opt_int64 {
    use super::*;

    pub fn serialize<T: Int64, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, T: Int64, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        Option::<Lenient<T>>::deserialize(d).map(|v| v.map(|v| v.0))
    }
}

/// A list of `u64` or `i64`: an array of decimal strings.
pub mod int64_list {
    use super::*;

    pub fn serialize<T: Int64, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&item.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, T: Int64, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        Vec::<Lenient<T>>::deserialize(d).map(|v| v.into_iter().map(|v| v.0).collect())
    }
}

/// Bytes as base64: written with the standard alphabet and padding; read
/// in the standard or the URL-safe alphabet, with or without padding.
pub mod bytes {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes as a base64 string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                let unpadded = v.trim_end_matches('=');
                let engine = if unpadded.contains(['-', '_']) {
                    URL_SAFE_NO_PAD
                } else {
                    STANDARD_NO_PAD
                };
                engine
                    .decode(unpadded)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "super::int64")]
        id: u64,
        #[serde(with = "super::int64")]
        time: i64,
        #[serde(with = "super::opt_int64")]
        maybe: Option<u64>,
        #[serde(with = "super::int64_list")]
        ids: Vec<u64>,
        #[serde(with = "super::bytes")]
        data: Vec<u8>,
    }

    #[test]
    fn sixty_four_bit_integers_are_strings_and_bytes_base64() {
        let sample = Sample {
            id: u64::MAX,
            time: i64::MIN,
            maybe: Some(9_007_199_254_740_993),
            ids: vec![1, 2_u64.pow(53) + 1],
            data: vec![0, 1, 2, 250, 251, 255],
        };
        let json = serde_json::to_string(&sample).expect("serializes");
        assert_eq!(
            json,
            r#"{"id":"18446744073709551615","time":"-9223372036854775808","maybe":"9007199254740993","ids":["1","9007199254740993"],"data":"AAEC+vv/"}"#
        );
        assert_eq!(
            serde_json::from_str::<Sample>(&json).expect("parses"),
            sample
        );
    }

    #[test]
    fn input_may_use_numbers_and_any_base64() {
        let parsed: Sample = serde_json::from_str(
            r#"{"id":7,"time":-5,"maybe":null,"ids":[1,"2"],"data":"AAEC-vv_"}"#,
        )
        .expect("parses");
        assert_eq!(
            parsed,
            Sample {
                id: 7,
                time: -5,
                maybe: None,
                ids: vec![1, 2],
                data: vec![0, 1, 2, 250, 251, 255],
            }
        );
        let padded: Sample =
            serde_json::from_str(r#"{"id":"7","time":"0","maybe":"1","ids":[],"data":"AA=="}"#)
                .expect("parses");
        assert_eq!(padded.data, vec![0]);
    }

    #[test]
    fn malformed_numbers_and_bytes_are_refused() {
        for bad in [
            r#"{"id":"-1","time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":"+1","time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":" 1","time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":"18446744073709551616","time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":1.5,"time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":"","time":"0","maybe":null,"ids":[],"data":""}"#,
            r#"{"id":"1","time":"0","maybe":null,"ids":[],"data":"A"}"#,
            r#"{"id":"1","time":"0","maybe":null,"ids":[],"data":[1,2]}"#,
        ] {
            assert!(serde_json::from_str::<Sample>(bad).is_err(), "{bad}");
        }
    }
}
