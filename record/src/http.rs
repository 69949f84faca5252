//! The history and sync HTTP API. Every call carries the same token as the
//! WebSocket (`Authorization: Bearer …`), and a user reads only their own
//! conversations, and groups only while a member (asked of a [`GroupAccess`]). Errors are JSON `{"code": "...", "message": "..."}` with the
//! status of the code, built in one place ([`ApiError`]).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use natter_proto::api::{ErrorBody, HistoryPage, MessageView, SyncPage};
use natter_proto::msg::MessageType;
use natter_proto::{ErrorCode, UserId};
use natter_roles::{Authenticate, Identity, Refusal};
use serde::Deserialize;

use crate::store::{
    parse_group_conversation, parse_p2p_conversation, GroupHistoryQuery, HistoryQuery,
    MessageStore, Page, PageLimit, SearchQuery, StoredMessage, MAX_ID,
};

/// Routes served by this module, as written in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/conversations/{conversation}/messages"),
    ("get", "/v1/sync"),
    ("get", "/v1/search"),
];

/// The HTTP API's per-user request limit: a token bucket per user in front
/// of any [`Authenticate`], so every authenticated route counts (over the
/// limit: `rate_limited`, 429). The limit is per process.
pub struct RateLimitedAuth<A> {
    inner: A,
    limiter: natter_node::limit::RateLimiter,
}

impl<A: Authenticate> RateLimitedAuth<A> {
    pub fn new(inner: A, per_sec: f64, burst: u32) -> RateLimitedAuth<A> {
        RateLimitedAuth {
            inner,
            limiter: natter_node::limit::RateLimiter::new(per_sec, burst),
        }
    }
}

#[async_trait::async_trait]
impl<A: Authenticate> Authenticate for RateLimitedAuth<A> {
    async fn authenticate(&self, token: &str, device: Option<&str>) -> Result<Identity, Refusal> {
        let identity = self.inner.authenticate(token, device).await?;
        if !self.limiter.allow(&identity.uid) {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many requests; slow down",
            ));
        }
        Ok(identity)
    }
}

/// Who may read a group's messages, and from where; implemented by `group`.
#[async_trait::async_trait]
pub trait GroupAccess: Send + Sync + 'static {
    /// The first `conv_seq` of `group` that `uid` may read (their join
    /// point), or why they may not read it at all.
    async fn readable_from(&self, uid: &UserId, group: u64) -> Result<u64, Refusal>;

    /// The groups `uid` is a member of now, each with their join point
    /// (the first `conv_seq` they may read).
    async fn groups_of(&self, uid: &UserId) -> Result<Vec<(u64, u64)>, Refusal>;
}

/// An error answer of the HTTP API: a [`Refusal`] as JSON `{"code",
/// "message", "until_ms"?}` with the status of its code. This is the one
/// place a refusal becomes an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError(pub Refusal);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(Refusal::new(code, message))
    }

    pub fn code(&self) -> ErrorCode {
        self.0.code
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> ApiError {
        ApiError(refusal)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let Refusal {
            code,
            message,
            until_ms,
        } = self.0;
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = ErrorBody::new(code, message);
        body.until_ms = until_ms;
        (status, Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, rejection.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        // A body over the limit is 413, whatever else the rejection says.
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::PayloadTooLarge
        } else {
            ErrorCode::BadRequest
        };
        ApiError::new(code, rejection.body_text())
    }
}

impl From<crate::StoreError> for ApiError {
    fn from(e: crate::StoreError) -> ApiError {
        tracing::error!(error = %e, "store failed in HTTP API");
        ApiError::new(ErrorCode::Internal, "storage is unavailable")
    }
}

/// The header naming the caller's device, for tokens that name none (see
/// [`Authenticate`]).
pub const DEVICE_HEADER: &str = "x-natter-device";

/// The authenticated caller of an HTTP request.
pub async fn caller(headers: &HeaderMap, auth: &dyn Authenticate) -> Result<Identity, ApiError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::new(
            ErrorCode::AuthRequired,
            "missing Authorization: Bearer <token>",
        )
    })?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::AuthRequired,
                "Authorization must be Bearer <token>",
            )
        })?;
    let device =
        match headers.get(DEVICE_HEADER) {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                ApiError::new(ErrorCode::BadRequest, "X-Natter-Device must be ASCII")
            })?),
        };
    // The token exactly as sent, as over the WebSocket: no trimming.
    Ok(auth.authenticate(token, device).await?)
}

/// The JSON view of a stored message.
pub fn view(m: &StoredMessage, user_seq: Option<u64>) -> MessageView {
    MessageView {
        mid: m.mid.to_string(),
        conversation: m.conversation.clone(),
        conv_seq: m.conv_seq,
        user_seq,
        sender: m.sender.clone(),
        sender_device: m.sender_device.clone(),
        receiver: m.to.user().cloned(),
        group: m.to.group(),
        client_seq: m.client_seq,
        time_ms: m.time_ms,
        msg_type: MessageType::from_u32(m.msg_type),
        body: m.body().and_then(|b| b.content),
        edited_ms: (m.edited_ms != 0).then_some(m.edited_ms),
        revoked_ms: (m.revoked_ms != 0).then_some(m.revoked_ms),
    }
}

#[derive(Clone)]
struct HttpState {
    store: Arc<dyn MessageStore>,
    auth: Arc<dyn Authenticate>,
    groups: Arc<dyn GroupAccess>,
    /// Stored bytes per page at most (`limits.page_bytes`).
    page_bytes: usize,
}

/// The record routes. A page of history or sync holds at most `page_bytes`
/// of stored messages (or one message larger than that).
pub fn router(
    store: Arc<dyn MessageStore>,
    auth: Arc<dyn Authenticate>,
    groups: Arc<dyn GroupAccess>,
    page_bytes: usize,
) -> Router {
    Router::new()
        .route("/v1/conversations/{conversation}/messages", get(history))
        .route("/v1/sync", get(sync))
        .route("/v1/search", get(search))
        .with_state(HttpState {
            store,
            auth,
            groups,
            page_bytes,
        })
}

#[derive(Deserialize)]
struct HistoryParams {
    before: Option<String>,
    limit: Option<u32>,
    types: Option<String>,
}

fn parse_types(spec: &str) -> Result<Vec<u32>, ApiError> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let s = s.trim();
            MessageType::parse(s)
                .or_else(|| s.parse().ok().and_then(MessageType::from_u32))
                .map(|t| t as u32)
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::BadRequest, format!("unknown message type {s:?}"))
                })
        })
        .collect()
}

async fn history(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(conversation): Path<String>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let me = caller(&headers, state.auth.as_ref()).await?;
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "limit must be between 1 and 100",
        ));
    }
    let before = match params.before.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "before must be a message id"))?,
        ),
    };
    let types = parse_types(params.types.as_deref().unwrap_or(""))?;
    let limit = PageLimit::new(limit, state.page_bytes);
    if let Some(group) = parse_group_conversation(&conversation) {
        let from_seq = state.groups.readable_from(&me.uid, group).await?;
        let query = GroupHistoryQuery {
            group,
            from_seq,
            before,
            limit,
            types,
        };
        let rows = state.store.group_history(&query).await?;
        return Ok(Json(page(rows)));
    }
    let (a, b) = parse_p2p_conversation(&conversation).ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("{conversation:?} is not a conversation id"),
        )
    })?;
    let other = match &me.uid {
        uid if *uid == a => b,
        uid if *uid == b => a,
        _ => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "not a member of this conversation",
            ))
        }
    };
    let query = HistoryQuery {
        owner: me.uid.clone(),
        other,
        before,
        limit,
        types,
    };
    let rows = state.store.history(&query).await?;
    Ok(Json(page(rows)))
}

fn page(rows: Page<StoredMessage>) -> HistoryPage {
    let next_before = rows
        .more
        .then(|| rows.items.last().map(|m| m.mid.to_string()))
        .flatten();
    HistoryPage {
        messages: rows.items.iter().map(|m| view(m, None)).collect(),
        next_before,
    }
}

#[derive(Deserialize)]
struct SyncParams {
    after: Option<u64>,
    limit: Option<u32>,
    group: Option<u64>,
}

async fn sync(
    State(state): State<HttpState>,
    headers: HeaderMap,
    params: Result<Query<SyncParams>, QueryRejection>,
) -> Result<Json<SyncPage>, ApiError> {
    let me = caller(&headers, state.auth.as_ref()).await?;
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "limit must be between 1 and 500",
        ));
    }
    if params.after.is_some_and(|after| after > MAX_ID) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "after must be at most 2^63-1",
        ));
    }
    let limit = PageLimit::new(limit, state.page_bytes);
    let group = params.group.unwrap_or(0);
    if group != 0 {
        let from_seq = state.groups.readable_from(&me.uid, group).await?;
        let after = match params.after {
            Some(after) => after,
            None => state.store.cursor(&me.uid, &me.device, group).await?,
        };
        // Nothing before the caller's join point.
        let after = after.max(from_seq.saturating_sub(1));
        let rows = state.store.group_sync(group, after, limit).await?;
        return Ok(Json(SyncPage {
            has_more: rows.more,
            cursor: rows.items.last().map(|m| m.conv_seq).unwrap_or(after),
            messages: rows.items.iter().map(|m| view(m, None)).collect(),
        }));
    }
    let after = match params.after {
        Some(after) => after,
        None => state.store.cursor(&me.uid, &me.device, 0).await?,
    };
    let page = state.store.sync(&me.uid, after, limit).await?;
    let cursor = page.items.last().map(|i| i.user_seq).unwrap_or(after);
    Ok(Json(SyncPage {
        has_more: page.more,
        messages: page
            .items
            .iter()
            .map(|i| view(&i.message, Some(i.user_seq)))
            .collect(),
        cursor,
    }))
}

#[derive(Deserialize)]
struct SearchParams {
    q: Option<String>,
    conversation: Option<String>,
    from: Option<String>,
    to: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

/// An optional number parameter: absent or empty is `None`; anything else
/// must be a number in `valid`.
fn number<T: std::str::FromStr + PartialOrd>(
    value: Option<&str>,
    name: &str,
    valid: std::ops::RangeInclusive<T>,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(s) => match s.parse::<T>() {
            Ok(n) if valid.contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("{name} must be {what}"),
            )),
        },
    }
}

/// `GET /v1/search`: the caller's messages holding `q`, newest first, in
/// the caller's one-to-one conversations and groups (from each join
/// point), or in one `conversation` the caller may read (as history).
async fn search(
    State(state): State<HttpState>,
    headers: HeaderMap,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Json<HistoryPage>, ApiError> {
    let me = caller(&headers, state.auth.as_ref()).await?;
    let Query(params) = params?;
    let text = params.q.unwrap_or_default();
    crate::search::check_query(&text).map_err(|m| ApiError::new(ErrorCode::BadRequest, m))?;
    let limit = number(
        params.limit.as_deref(),
        "limit",
        1..=100,
        "between 1 and 100",
    )?
    .unwrap_or(20);
    let before = number(
        params.before.as_deref(),
        "before",
        0..=MAX_ID,
        "a message id",
    )?;
    let from_ms = number(
        params.from.as_deref(),
        "from",
        i64::MIN..=i64::MAX,
        "a time in Unix ms",
    )?;
    let to_ms = number(
        params.to.as_deref(),
        "to",
        i64::MIN..=i64::MAX,
        "a time in Unix ms",
    )?;
    if let (Some(from), Some(to)) = (from_ms, to_ms) {
        if from > to {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "from must not be after to",
            ));
        }
    }
    // The same checks as history: a conversation that is not the caller's
    // is refused, a group only while a member and from the join point.
    let conversation = params.conversation.filter(|c| !c.is_empty());
    let groups = match &conversation {
        None => state.groups.groups_of(&me.uid).await?,
        Some(c) => match parse_group_conversation(c) {
            Some(group) => vec![(group, state.groups.readable_from(&me.uid, group).await?)],
            None => {
                let (a, b) = parse_p2p_conversation(c).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::BadRequest,
                        format!("{c:?} is not a conversation id"),
                    )
                })?;
                if me.uid != a && me.uid != b {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        "not a member of this conversation",
                    ));
                }
                Vec::new()
            }
        },
    };
    let query = SearchQuery {
        owner: me.uid.clone(),
        text,
        conversation,
        groups,
        from_ms,
        to_ms,
        before,
        limit: PageLimit::new(limit, state.page_bytes),
    };
    let rows = state.store.search(&query).await?;
    Ok(Json(page(rows)))
}
