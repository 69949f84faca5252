//! Who a token names, and natter's own tokens.
//!
//! [`Authenticate`] is the one contract every entry point (the WebSocket's
//! auth frame, every HTTP route) asks; its providers are natter's own HS256
//! [`Tokens`] and, in `logic`, the operator's account service. HS256 tokens
//! are JWTs in compact form:
//!
//! ```text
//! base64url({"alg":"HS256","typ":"JWT"}) . base64url({"uid":"alice","dev":"phone","iat":…,"exp":…}) . base64url(HMAC-SHA256)
//! ```
//!
//! The operator's account system mints them with the shared secret; the
//! admin API and `natter token` mint them too.

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use natter_proto::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::Refusal;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
/// Longest device id accepted.
pub const MAX_DEVICE_LEN: usize = 64;

/// Who a request comes from: a user and one of their devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: UserId,
    pub device: String,
}

/// Checks tokens. `device` is the client's own word for its device (the
/// auth frame's `device`); a provider whose tokens name no device uses it,
/// and one whose tokens do refuses a different one.
#[async_trait]
pub trait Authenticate: Send + Sync + 'static {
    async fn authenticate(&self, token: &str, device: Option<&str>) -> Result<Identity, Refusal>;
}

#[async_trait]
impl<A: Authenticate + ?Sized> Authenticate for std::sync::Arc<A> {
    async fn authenticate(&self, token: &str, device: Option<&str>) -> Result<Identity, Refusal> {
        (**self).authenticate(token, device).await
    }
}

/// Whether `device` is an acceptable device id: 1–64 printable ASCII
/// characters without spaces.
pub fn valid_device(device: &str) -> bool {
    !device.is_empty()
        && device.len() <= MAX_DEVICE_LEN
        && device.bytes().all(|b| b.is_ascii_graphic())
}

/// The device of a request: the token's, unless the client named another
/// (refused) or the token names none (the client's, which must be valid).
pub fn pick_device(token_device: Option<&str>, asked: Option<&str>) -> Result<String, Refusal> {
    let asked = asked.filter(|d| !d.is_empty());
    match (token_device, asked) {
        (Some(t), Some(a)) if t != a => Err(Refusal::new(
            ErrorCode::AuthFailed,
            "the token is for another device",
        )),
        (Some(t), _) => Ok(t.to_owned()),
        (None, Some(a)) if valid_device(a) => Ok(a.to_owned()),
        (None, Some(_)) => Err(Refusal::new(
            ErrorCode::AuthFailed,
            format!("device must be 1-{MAX_DEVICE_LEN} printable characters without spaces"),
        )),
        (None, None) => Err(Refusal::new(
            ErrorCode::AuthFailed,
            "the token names no device: name it in the auth frame",
        )),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    uid: String,
    dev: String,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// What a valid HS256 token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub uid: UserId,
    pub device: String,
    /// When it was issued, Unix seconds.
    pub issued_at: i64,
    /// When it expires, Unix seconds.
    pub expires_at: i64,
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

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
        uid: &UserId,
        device: &str,
        now: i64,
        ttl_secs: u64,
    ) -> Result<String, String> {
        if !valid_device(device) {
            return Err(format!(
                "device must be 1-{MAX_DEVICE_LEN} printable characters without spaces"
            ));
        }
        let claims = Claims {
            uid: uid.to_string(),
            dev: device.into(),
            iat: now,
            exp: now.saturating_add(ttl_secs.min(i64::MAX as u64) as i64),
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
    pub fn mint(&self, uid: &UserId, device: &str, ttl_secs: u64) -> Result<String, String> {
        self.mint_at(uid, device, unix_now(), ttl_secs)
    }

    /// What a token says, checked against the time `now` (Unix seconds).
    pub fn verify_at(&self, token: &str, now: i64) -> Result<TokenClaims, ErrorCode> {
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
        let uid = UserId::parse(&claims.uid).map_err(|_| ErrorCode::AuthFailed)?;
        if !valid_device(&claims.dev) {
            return Err(ErrorCode::AuthFailed);
        }
        if claims.exp <= now {
            return Err(ErrorCode::TokenExpired);
        }
        Ok(TokenClaims {
            uid,
            device: claims.dev,
            issued_at: claims.iat,
            expires_at: claims.exp,
        })
    }

    pub fn verify(&self, token: &str) -> Result<TokenClaims, ErrorCode> {
        self.verify_at(token, unix_now())
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

#[async_trait]
impl Authenticate for Tokens {
    async fn authenticate(&self, token: &str, device: Option<&str>) -> Result<Identity, Refusal> {
        let claims = self.verify(token).map_err(Refusal::from)?;
        let device = pick_device(Some(&claims.device), device)?;
        Ok(Identity {
            uid: claims.uid,
            device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid uid")
    }

    #[test]
    fn minted_tokens_verify() {
        let tokens = Tokens::new(b"0123456789abcdef".to_vec());
        let token = tokens
            .mint_at(&uid("Alice"), "phone", 1_000, 60)
            .expect("mint");
        let claims = tokens.verify_at(&token, 1_030).expect("valid");
        assert_eq!(claims.uid, uid("Alice"));
        assert_ne!(claims.uid, uid("alice"), "ids compare byte for byte");
        assert_eq!(claims.device, "phone");
        assert_eq!((claims.issued_at, claims.expires_at), (1_000, 1_060));
        assert_eq!(
            tokens.verify_at(&token, 1_060),
            Err(ErrorCode::TokenExpired)
        );
        let long = uid(&"x".repeat(64));
        let token = tokens.mint_at(&long, "phone", 1_000, 60).expect("mint");
        assert_eq!(tokens.verify_at(&token, 1_000).expect("valid").uid, long);
    }

    #[test]
    fn known_vector() {
        // Computed independently with Python's hmac and base64 modules.
        let tokens = Tokens::new(b"secret".to_vec());
        let token = tokens.mint_at(&uid("alice"), "d", 0, 10).expect("mint");
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1aWQiOiJhbGljZSIsImRldiI6ImQiLCJpYXQiOjAsImV4cCI6MTB9.\
             7syEeeOgT9E9LY01cLqWErPVgToqizYOZEqnGLPFfbY"
        );
    }

    fn signed(tokens: &Tokens, payload: &str) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let mut mac = tokens.mac();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    #[test]
    fn tampered_or_foreign_tokens_fail() {
        let tokens = Tokens::new(b"0123456789abcdef".to_vec());
        let other = Tokens::new(b"fedcba9876543210".to_vec());
        let token = tokens
            .mint_at(&uid("u-42"), "phone", 1_000, 60)
            .expect("mint");
        assert_eq!(other.verify_at(&token, 1_000), Err(ErrorCode::AuthFailed));
        let forged_payload =
            URL_SAFE_NO_PAD.encode(r#"{"uid":"u-1","dev":"phone","iat":0,"exp":99999999999}"#);
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
        // Correctly signed, but not a valid token: an array payload, a
        // numeric uid (version 1 tokens), and uids outside the rule.
        for payload in [
            r#"["u-42","phone",0,99999999999]"#,
            r#"{"uid":42,"dev":"phone","iat":0,"exp":99999999999}"#,
            r#"{"uid":"","dev":"phone","iat":0,"exp":99999999999}"#,
            r#"{"uid":"a:b","dev":"phone","iat":0,"exp":99999999999}"#,
            r#"{"uid":"..","dev":"phone","iat":0,"exp":99999999999}"#,
        ] {
            assert_eq!(
                tokens.verify_at(&signed(&tokens, payload), 1_000),
                Err(ErrorCode::AuthFailed),
                "{payload}"
            );
        }
        let too_long = format!(
            r#"{{"uid":"{}","dev":"phone","iat":0,"exp":99999999999}}"#,
            "x".repeat(65)
        );
        assert_eq!(
            tokens.verify_at(&signed(&tokens, &too_long), 1_000),
            Err(ErrorCode::AuthFailed)
        );
        assert!(tokens.mint_at(&uid("a"), "has space", 0, 1).is_err());
        assert!(tokens.mint_at(&uid("a"), &"x".repeat(65), 0, 1).is_err());
    }

    #[test]
    fn the_device_comes_from_the_token_or_the_client() {
        assert_eq!(pick_device(Some("phone"), None).unwrap(), "phone");
        assert_eq!(pick_device(Some("phone"), Some("")).unwrap(), "phone");
        assert_eq!(pick_device(Some("phone"), Some("phone")).unwrap(), "phone");
        assert_eq!(
            pick_device(Some("phone"), Some("laptop")).unwrap_err().code,
            ErrorCode::AuthFailed
        );
        assert_eq!(pick_device(None, Some("laptop")).unwrap(), "laptop");
        assert_eq!(
            pick_device(None, Some("has space")).unwrap_err().code,
            ErrorCode::AuthFailed
        );
        assert_eq!(
            pick_device(None, None).unwrap_err().code,
            ErrorCode::AuthFailed
        );
    }
}
