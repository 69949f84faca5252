//! Who a token names, as the WebSocket's auth frame and every HTTP route ask
//! it: natter's own HS256 tokens first and, when `auth.verify_url` is set,
//! the operator's account service for every token that is not one of them.
//!
//! natter's own tokens (minted by `natter token`, or by the operator with
//! the shared secret) always work, so a deployment can move to its account
//! service without logging anyone out.
//!
//! A user the operator logged out everywhere ([`Auth::log_out`], the admin
//! API) has that time stored; natter's own tokens issued before its second
//! are then refused with `logged_out`. Each node reads a user's time at most
//! once per [`LOGOUT_CACHE_TTL`], so a logout made on another logic node
//! takes up to that long to reach this one (the connections are closed at
//! once all the same).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use natter_node::telemetry::register;
use natter_proto::{ErrorCode, UserId};
use natter_roles::auth::pick_device;
use natter_roles::{Authenticate, Identity, Refusal, Tokens};
use prometheus::{IntCounterVec, Opts, Registry};

use natter_record::MessageStore;

use crate::verify::{VerifyError, VerifyUrl};

/// How long a user's logout time read from the store is taken as current.
pub const LOGOUT_CACHE_TTL: Duration = Duration::from_secs(1);

/// Users whose logout time is cached at most; past it, the cache is
/// emptied of expired entries, and of all if that is not enough.
pub const LOGOUT_CACHE_ENTRIES: usize = 100_000;

/// Each user's logout time (Unix ms), read from the message store and kept
/// for [`LOGOUT_CACHE_TTL`], so that every request does not ask the store.
struct Logouts {
    store: Arc<dyn MessageStore>,
    cache: Mutex<HashMap<UserId, (Instant, Option<i64>)>>,
}

impl Logouts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, (Instant, Option<i64>)>> {
        // A map of plain values stays consistent whatever panicked.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, uid: &UserId, at: Option<i64>) {
        let now = Instant::now();
        let mut cache = self.lock();
        if cache.len() >= LOGOUT_CACHE_ENTRIES && !cache.contains_key(uid) {
            cache.retain(|_, (read, _)| now.duration_since(*read) < LOGOUT_CACHE_TTL);
            if cache.len() >= LOGOUT_CACHE_ENTRIES {
                cache.clear();
            }
        }
        // A logout time only moves forward: a read that raced a local
        // logout (and saw the store before it) must not hide it.
        let at = match (cache.get(uid), at) {
            (Some((_, Some(known))), at) => Some(at.map_or(*known, |at| at.max(*known))),
            (_, at) => at,
        };
        cache.insert(uid.clone(), (now, at));
    }

    /// When `uid` was last logged out (Unix ms), if ever.
    async fn at(&self, uid: &UserId) -> Result<Option<i64>, natter_record::StoreError> {
        if let Some((read, at)) = self.lock().get(uid).copied() {
            if read.elapsed() < LOGOUT_CACHE_TTL {
                return Ok(at);
            }
        }
        let at = self.store.logged_out_at(uid).await?;
        self.remember(uid, at);
        Ok(at)
    }
}

/// Whether a token issued at `issued_at` (Unix seconds) predates a logout
/// at `logout_ms` (Unix ms). Tokens carry whole seconds: one issued in the
/// logout's own second is taken, so that a token minted right after a
/// logout works.
pub fn issued_before_logout(issued_at: i64, logout_ms: i64) -> bool {
    issued_at < logout_ms.div_euclid(1000)
}

/// The auth providers chosen by config, behind one [`Authenticate`].
pub struct Auth {
    tokens: Tokens,
    verify: Option<Arc<VerifyUrl>>,
    /// Logouts by the operator; `None`: none are checked (tests of logic alone).
    logouts: Option<Logouts>,
    outcomes: IntCounterVec,
}

impl Auth {
    pub fn new(tokens: Tokens, verify: Option<Arc<VerifyUrl>>, registry: &Registry) -> Auth {
        let outcomes = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "natter_auth_provider_total",
                    "Token checks, by the provider that answered and the outcome.",
                ),
                &["provider", "outcome"],
            )
            .expect("valid counter"),
        );
        Auth {
            tokens,
            verify,
            logouts: None,
            outcomes,
        }
    }

    /// Checks natter's own tokens against the users' logouts kept in `store`.
    pub fn with_logouts(mut self, store: Arc<dyn MessageStore>) -> Auth {
        self.logouts = Some(Logouts {
            store,
            cache: Mutex::new(HashMap::new()),
        });
        self
    }

    /// Logs `uid` out everywhere as of now: stores the time (natter's tokens
    /// issued before it are refused from then on, on this node at once) and
    /// drops the account service's cached accepts of the user. Returns the
    /// time (Unix ms). Closing the user's connections is the caller's part.
    pub async fn log_out(&self, uid: &UserId) -> Result<i64, Refusal> {
        let now = SystemTime::now();
        let at = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let Some(logouts) = &self.logouts else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                "logouts are not kept by this node",
            ));
        };
        logouts.store.log_out(uid, at).await.map_err(|e| {
            tracing::error!(error = %e, "storing a logout failed");
            Refusal::new(ErrorCode::Internal, "storage unavailable")
        })?;
        logouts.remember(uid, Some(at));
        if let Some(verify) = &self.verify {
            verify.forget_user(uid.as_str(), now);
        }
        Ok(at)
    }

    /// Refuses a natter token of `uid` issued before the user's logout.
    async fn check_logout(&self, uid: &UserId, issued_at: i64) -> Result<(), Refusal> {
        let Some(logouts) = &self.logouts else {
            return Ok(());
        };
        match logouts.at(uid).await {
            Ok(Some(at)) if issued_before_logout(issued_at, at) => {
                self.count("token", "logged_out");
                Err(Refusal::new(
                    ErrorCode::LoggedOut,
                    "logged out by the operator; get a new token",
                ))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.count("token", "auth_unavailable");
                tracing::error!(error = %e, "reading a logout failed");
                Err(Refusal::new(
                    ErrorCode::AuthUnavailable,
                    "cannot check the token now; retry later",
                ))
            }
        }
    }

    fn count(&self, provider: &str, outcome: &str) {
        self.outcomes.with_label_values(&[provider, outcome]).inc();
    }

    /// The account service's answer for a token that is not natter's own.
    async fn ask(
        &self,
        verify: &VerifyUrl,
        token: &str,
        device: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let verified = match verify.verify(token).await {
            Ok(verified) => verified,
            Err(VerifyError::Refused) => {
                self.count("verify_url", "auth_failed");
                return Err(Refusal::new(ErrorCode::AuthFailed, "invalid token"));
            }
            Err(VerifyError::Expired) => {
                self.count("verify_url", "token_expired");
                return Err(Refusal::new(ErrorCode::TokenExpired, "token expired"));
            }
            Err(VerifyError::Unavailable(reason)) => {
                self.count("verify_url", "auth_unavailable");
                tracing::warn!(%reason, "account service unavailable");
                return Err(Refusal::new(
                    ErrorCode::AuthUnavailable,
                    "the account service did not answer; retry later",
                ));
            }
        };
        let Ok(uid) = UserId::parse(&verified.uid) else {
            // The operator's service named an id natter cannot hold: a
            // misconfiguration to fix there, not the client's fault.
            self.count("verify_url", "auth_unavailable");
            tracing::error!(
                "the account service answered a user id outside natter's rule (1-64 bytes of A-Z a-z 0-9 _ - . @)"
            );
            return Err(Refusal::new(
                ErrorCode::AuthUnavailable,
                "the account service answered an invalid user id",
            ));
        };
        let device = pick_device(None, device).inspect_err(|_| {
            self.count("verify_url", "auth_failed");
        })?;
        self.count("verify_url", "ok");
        Ok(Identity { uid, device })
    }
}

#[async_trait]
impl Authenticate for Auth {
    async fn authenticate(&self, token: &str, device: Option<&str>) -> Result<Identity, Refusal> {
        match self.tokens.verify(token) {
            Ok(claims) => {
                let device = pick_device(Some(&claims.device), device).inspect_err(|_| {
                    self.count("token", "auth_failed");
                })?;
                self.check_logout(&claims.uid, claims.issued_at).await?;
                self.count("token", "ok");
                Ok(Identity {
                    uid: claims.uid,
                    device,
                })
            }
            Err(ErrorCode::TokenExpired) => {
                self.count("token", "token_expired");
                Err(Refusal::new(ErrorCode::TokenExpired, "token expired"))
            }
            Err(_) => match &self.verify {
                Some(verify) => self.ask(verify, token, device).await,
                None => {
                    self.count("token", "auth_failed");
                    Err(Refusal::new(ErrorCode::AuthFailed, "invalid token"))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_record::sqlite::SqliteStore;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("a valid user id")
    }

    fn unix_now() -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    #[test]
    fn a_token_of_the_logout_second_is_taken_an_earlier_one_is_not() {
        assert!(issued_before_logout(999, 1_000_000));
        assert!(!issued_before_logout(1_000, 1_000_000));
        assert!(!issued_before_logout(1_000, 1_000_999));
        assert!(issued_before_logout(1_000, 1_001_000));
    }

    #[tokio::test]
    async fn a_stale_read_does_not_hide_a_local_logout() {
        let logouts = Logouts {
            store: Arc::new(SqliteStore::memory().await.expect("memory store")),
            cache: Mutex::new(HashMap::new()),
        };
        logouts.remember(&uid("alice"), Some(5_000));
        logouts.remember(&uid("alice"), None);
        assert_eq!(logouts.at(&uid("alice")).await.expect("read"), Some(5_000));
        logouts.remember(&uid("alice"), Some(4_000));
        assert_eq!(logouts.at(&uid("alice")).await.expect("read"), Some(5_000));
        logouts.remember(&uid("alice"), Some(6_000));
        assert_eq!(logouts.at(&uid("alice")).await.expect("read"), Some(6_000));
    }

    #[tokio::test]
    async fn tokens_issued_before_a_logout_are_refused_and_later_ones_taken() {
        let store: Arc<dyn MessageStore> =
            Arc::new(SqliteStore::memory().await.expect("memory store"));
        let tokens = Tokens::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let old = tokens
            .mint_at(&uid("alice"), "phone", unix_now() - 10, 3600)
            .expect("mint");
        let other = tokens
            .mint_at(&uid("Alice"), "phone", unix_now() - 10, 3600)
            .expect("mint");
        let auth = Auth::new(
            Tokens::new(b"0123456789abcdef0123456789abcdef".to_vec()),
            None,
            &Registry::new(),
        )
        .with_logouts(store.clone());
        auth.authenticate(&old, None)
            .await
            .expect("before the logout");
        let at = auth.log_out(&uid("alice")).await.expect("log out");
        assert_eq!(
            store.logged_out_at(&uid("alice")).await.expect("read"),
            Some(at),
            "stored"
        );
        let refused = auth.authenticate(&old, None).await.expect_err("logged out");
        assert_eq!(refused.code, ErrorCode::LoggedOut);
        auth.authenticate(&other, None)
            .await
            .expect("another user (ids differ in case)");
        let new = tokens.mint(&uid("alice"), "phone", 3600).expect("mint");
        auth.authenticate(&new, None)
            .await
            .expect("a token after the logout");
        // Another node sees the logout once its cached answer is stale.
        let elsewhere = Auth::new(
            Tokens::new(b"0123456789abcdef0123456789abcdef".to_vec()),
            None,
            &Registry::new(),
        )
        .with_logouts(store);
        assert_eq!(
            elsewhere.authenticate(&old, None).await.unwrap_err().code,
            ErrorCode::LoggedOut
        );
    }
}
