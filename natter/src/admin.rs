//! The admin API: the operator's own servers mint tokens, send messages as
//! a user or as the system, log a user out everywhere and create groups on
//! a user's behalf. It is served on a listener of its own (`admin.listen`)
//! and every request, on any path, must carry `Authorization: Bearer <admin
//! key>` (`admin.key`, or the data dir's `admin.key` file); without it the
//! answer is 401 before anything else is read.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use natter_group::Groups;
use natter_logic::admin::Sender;
use natter_logic::{Auth, Logic};
use natter_proto::api::{
    AdminCreateGroup, AdminMessage, AdminSent, AdminToken, AdminTokenRequest, GroupView, LoggedOut,
};
use natter_proto::msg::MessageBody;
use natter_proto::{ErrorCode, UserId};
use natter_record::http::ApiError;
use natter_record::store::Peer;
use natter_roles::{valid_device, Tokens};
use sha2::{Digest, Sha256};

/// Routes served by this module, as written in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/admin/tokens"),
    ("post", "/v1/admin/messages"),
    ("post", "/v1/admin/users/{uid}/logout"),
    ("post", "/v1/admin/groups"),
];

/// The reason a logged-out user's connections are closed with.
pub const LOGOUT_REASON: &str = "logged out by the operator";

/// The admin key, kept as its SHA-256: a presented key is hashed and the
/// two digests compared in constant time, so neither the comparison's time
/// nor the key's length tells anything about the key.
pub struct AdminKey([u8; 32]);

impl AdminKey {
    pub fn new(key: &[u8]) -> AdminKey {
        AdminKey(Sha256::digest(key).into())
    }

    /// Whether `presented` is the key.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest
            .iter()
            .zip(self.0.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminKey(<set>)")
    }
}

/// What the admin routes act with.
pub struct Admin {
    pub key: AdminKey,
    pub logic: Arc<Logic>,
    pub auth: Arc<Auth>,
    pub groups: Arc<Groups>,
    /// natter's own tokens (the `auth.secret`).
    pub tokens: Tokens,
    /// The longest and the default token life (`auth.token_ttl_secs`).
    pub max_ttl_secs: u64,
    /// Who `"from": null` messages are from (`admin.system_sender`).
    pub system_sender: UserId,
}

/// The admin routes, each behind the key.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/v1/admin/tokens", post(mint))
        .route("/v1/admin/messages", post(send))
        .route("/v1/admin/users/{uid}/logout", post(logout))
        .route("/v1/admin/groups", post(create_group))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(middleware::from_fn_with_state(admin.clone(), require_key))
        .with_state(admin)
}

/// Lets a request through only with the admin key; every other answer is
/// 401, on every path (the key is never logged).
async fn require_key(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    match check_key(&admin.key, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

fn check_key(key: &AdminKey, headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            ErrorCode::AuthRequired,
            "missing Authorization: Bearer <admin key>",
        )
    })?;
    let presented = value.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
        ApiError::new(
            ErrorCode::AuthRequired,
            "Authorization must be Bearer <admin key>",
        )
    })?;
    if key.matches(presented) {
        Ok(())
    } else {
        tracing::warn!("admin request with a wrong key");
        Err(ApiError::new(ErrorCode::AuthFailed, "wrong admin key"))
    }
}

fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    json.map(|Json(v)| v).map_err(ApiError::from)
}

async fn mint(
    State(admin): State<Arc<Admin>>,
    req: Result<Json<AdminTokenRequest>, JsonRejection>,
) -> Result<Json<AdminToken>, ApiError> {
    let req = body(req)?;
    if !valid_device(&req.device) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "device must be 1-64 printable characters without spaces",
        ));
    }
    let ttl = req.ttl_secs.unwrap_or(admin.max_ttl_secs);
    if ttl == 0 || ttl > admin.max_ttl_secs {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "ttl_secs must be between 1 and {} (auth.token_ttl_secs)",
                admin.max_ttl_secs
            ),
        ));
    }
    let now = natter_roles::auth::unix_now();
    let token = admin
        .tokens
        .mint_at(&req.uid, &req.device, now, ttl)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e))?;
    tracing::info!(uid = %req.uid, device = %req.device, ttl, "admin minted a token");
    Ok(Json(AdminToken {
        token,
        expires_at: now.saturating_add(ttl as i64),
    }))
}

async fn send(
    State(admin): State<Arc<Admin>>,
    req: Result<Json<AdminMessage>, JsonRejection>,
) -> Result<Json<AdminSent>, ApiError> {
    let req = body(req)?;
    let to = match (req.to, req.group) {
        (Some(user), None) => Peer::User(user),
        (None, Some(group)) if group > 0 => Peer::Group(group),
        _ => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "name one receiver: to (a user) or group (a group id)",
            ))
        }
    };
    let from = match req.from {
        Some(uid) => Sender::User(uid),
        None => Sender::System(admin.system_sender.clone()),
    };
    let body = MessageBody {
        content: Some(req.body),
    };
    let reply = admin.logic.send_as(&from, to, body, req.client_seq).await?;
    Ok(Json(AdminSent {
        mid: reply.mid,
        conversation: reply.conversation,
        conv_seq: reply.conv_seq,
    }))
}

async fn logout(
    State(admin): State<Arc<Admin>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<LoggedOut>, ApiError> {
    let Path(uid) = path.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let uid = UserId::parse(&uid)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("uid: {e}")))?;
    // First the time, so that a connection closed below cannot come back
    // with the same token; then the connections.
    admin.auth.log_out(&uid).await?;
    let closed = admin
        .logic
        .kick_user(&uid, ErrorCode::LoggedOut, LOGOUT_REASON)
        .await?;
    tracing::info!(%uid, closed, "admin logged a user out");
    Ok(Json(LoggedOut { closed }))
}

async fn create_group(
    State(admin): State<Arc<Admin>>,
    req: Result<Json<AdminCreateGroup>, JsonRejection>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let AdminCreateGroup { owner, group } = body(req)?;
    let view = admin.groups.create(&owner, group).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_matches_itself_only() {
        let key = AdminKey::new(b"k".repeat(40).as_slice());
        assert!(key.matches(b"k".repeat(40).as_slice()));
        assert!(!key.matches(b"k".repeat(39).as_slice()));
        assert!(!key.matches(b""));
        assert!(!key.matches(b"K".repeat(40).as_slice()));
        assert!(!format!("{key:?}").contains('k'));
    }

    #[test]
    fn requests_without_the_key_are_refused() {
        let key = AdminKey::new(b"secret-admin-key-of-32-bytes-or-more");
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().expect("header"));
            check_key(&key, &headers).map_err(|e| e.code())
        };
        assert_eq!(
            check_key(&key, &HeaderMap::new()).map_err(|e| e.code()),
            Err(ErrorCode::AuthRequired)
        );
        assert_eq!(with("Basic abc"), Err(ErrorCode::AuthRequired));
        assert_eq!(with("Bearer nope"), Err(ErrorCode::AuthFailed));
        assert_eq!(with("Bearer secret-admin-key-of-32-bytes-or-more"), Ok(()));
        assert_eq!(
            with("Bearer  secret-admin-key-of-32-bytes-or-more"),
            Err(ErrorCode::AuthFailed),
            "the key exactly as sent"
        );
    }
}
