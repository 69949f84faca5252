//! Who a token names, as the WebSocket's auth frame and every HTTP route ask
//! it: natter's own HS256 tokens first and, when `auth.verify_url` is set,
//! the operator's account service for every token that is not one of them.
//!
//! natter's own tokens (minted by `natter token`, or by the operator with
//! the shared secret) always work, so a deployment can move to its account
//! service without logging anyone out.

use std::sync::Arc;

use async_trait::async_trait;
use natter_node::telemetry::register;
use natter_proto::{ErrorCode, UserId};
use natter_roles::auth::pick_device;
use natter_roles::{Authenticate, Identity, Refusal, Tokens};
use prometheus::{IntCounterVec, Opts, Registry};

use crate::verify::{VerifyError, VerifyUrl};

/// The auth providers chosen by config, behind one [`Authenticate`].
pub struct Auth {
    tokens: Tokens,
    verify: Option<Arc<VerifyUrl>>,
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
            outcomes,
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
