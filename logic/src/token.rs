//! HS256 tokens (JWT compact form) naming a user and a device.
//!
//! ```text
//! base64url({"alg":"HS256","typ":"JWT"}) . base64url({"uid":42,"dev":"phone","iat":…,"exp":…}) . base64url(HMAC-SHA256)
//! ```
//!
//! The operator's account system mints them with the shared secret;
//! `natter token` mints them for local use.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use natter_proto::ErrorCode;
use natter_record::http::{Authenticate, Identity};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
/// Longest device id accepted.
pub const MAX_DEVICE_LEN: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    uid: u64,
    dev: String,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// Mints and checks tokens with one secret.
#[derive(Clone)]
pub struct Tokens {
    secret: Vec<u8>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(<secret>)")
    }
}

/// Whether `device` is an acceptable device id: 1–64 printable ASCII
/// characters without spaces.
pub fn valid_device(device: &str) -> bool {
    !device.is_empty()
        && device.len() <= MAX_DEVICE_LEN
        && device.bytes().all(|b| b.is_ascii_graphic())
}

impl Tokens {
    pub fn new(secret: impl Into<Vec<u8>>) -> Tokens {
        Tokens {
            secret: secret.into(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    /// A token for `uid` on `device`, valid from `now` (Unix seconds) for `ttl_secs`.
    pub fn mint_at(
        &self,
        uid: u64,
        device: &str,
        now: i64,
        ttl_secs: u64,
    ) -> Result<String, String> {
        if uid == 0 || uid > i64::MAX as u64 {
            return Err("uid must be between 1 and 2^63-1".into());
        }
        if !valid_device(device) {
            return Err(format!(
                "device must be 1-{MAX_DEVICE_LEN} printable characters without spaces"
            ));
        }
        let claims = Claims {
            uid,
            dev: device.into(),
            iat: now,
            exp: now.saturating_add(ttl_secs as i64),
        };
        let payload = serde_json::to_vec(&claims).map_err(|e| e.to_string())?;
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signing_input}.{signature}"))
    }

    /// A token valid from now for `ttl_secs`.
    pub fn mint(&self, uid: u64, device: &str, ttl_secs: u64) -> Result<String, String> {
        self.mint_at(uid, device, natter_node::ids::now_ms() / 1000, ttl_secs)
    }

    /// The identity a token names, checked against the time `now` (Unix seconds).
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Identity, ErrorCode> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ErrorCode::AuthFailed);
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| ErrorCode::AuthFailed)?;
        let mut mac = self.mac();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| ErrorCode::AuthFailed)?;
        let header: Header = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| json_object(&h))
            .ok_or(ErrorCode::AuthFailed)?;
        if header.alg != "HS256" {
            return Err(ErrorCode::AuthFailed);
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| json_object(&p))
            .ok_or(ErrorCode::AuthFailed)?;
        if claims.uid == 0 || claims.uid > i64::MAX as u64 || !valid_device(&claims.dev) {
            return Err(ErrorCode::AuthFailed);
        }
        if claims.exp <= now {
            return Err(ErrorCode::TokenExpired);
        }
        Ok(Identity {
            uid: claims.uid,
            device: claims.dev,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Identity, ErrorCode> {
        self.verify_at(token, natter_node::ids::now_ms() / 1000)
    }
}

/// `bytes` as `T`, only from a JSON object: serde's derived structs also
/// accept an array of the fields in order, which the token format does not.
fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    (*first == b'{')
        .then(|| serde_json::from_slice(bytes).ok())
        .flatten()
}

impl Authenticate for Tokens {
    fn authenticate(&self, token: &str) -> Result<Identity, ErrorCode> {
        self.verify(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify() {
        let tokens = Tokens::new(b"0123456789abcdef".to_vec());
        let token = tokens.mint_at(42, "phone", 1_000, 60).expect("mint");
        let id = tokens.verify_at(&token, 1_030).expect("valid");
        assert_eq!(
            id,
            Identity {
                uid: 42,
                device: "phone".into()
            }
        );
        assert_eq!(
            tokens.verify_at(&token, 1_060),
            Err(ErrorCode::TokenExpired)
        );
    }

    #[test]
    fn known_vector() {
        // Computed independently with Python's hmac and base64 modules.
        let tokens = Tokens::new(b"secret".to_vec());
        let token = tokens.mint_at(1, "d", 0, 10).expect("mint");
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1aWQiOjEsImRldiI6ImQiLCJpYXQiOjAsImV4cCI6MTB9.\
             5xs7o98HvqIfMelCte_NDVbwMlvLlAvBNlUSZpY_9zg"
        );
    }

    #[test]
    fn tampered_or_foreign_tokens_fail() {
        let tokens = Tokens::new(b"0123456789abcdef".to_vec());
        let other = Tokens::new(b"fedcba9876543210".to_vec());
        let token = tokens.mint_at(42, "phone", 1_000, 60).expect("mint");
        assert_eq!(other.verify_at(&token, 1_000), Err(ErrorCode::AuthFailed));
        let forged_payload =
            URL_SAFE_NO_PAD.encode(r#"{"uid":1,"dev":"phone","iat":0,"exp":99999999999}"#);
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(tokens.verify_at(&forged, 1_000), Err(ErrorCode::AuthFailed));
        for junk in ["", "a.b", "a.b.c", "a.b.c.d", "...", "ü.ü.ü"] {
            assert_eq!(
                tokens.verify_at(junk, 1_000),
                Err(ErrorCode::AuthFailed),
                "{junk:?}"
            );
        }
        assert!(tokens.mint_at(0, "phone", 0, 1).is_err());
        // Claims as a JSON array, correctly signed: still not a token.
        let array = URL_SAFE_NO_PAD.encode(r#"[42,"phone",0,99999999999]"#);
        let signing_input = format!("{}.{array}", parts[0]);
        let mut mac = tokens.mac();
        mac.update(signing_input.as_bytes());
        let signed = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(
            tokens.verify_at(&format!("{signing_input}.{signed}"), 1_000),
            Err(ErrorCode::AuthFailed),
            "an array payload"
        );
        assert!(tokens.mint_at(1, "has space", 0, 1).is_err());
        assert!(tokens.mint_at(1, &"x".repeat(65), 0, 1).is_err());
    }
}
