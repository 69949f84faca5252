//! The conversations HTTP API: the caller's conversation list with unread
//! counts, read cursors (and `PUT /v1/groups/{group}/read`, the same
//! cursor for a group), settings, and read receipts. The rules are
//! `natter_logic::conversations`; this module only reads requests and
//! writes answers.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use natter_logic::{Logic, Receipts, Session};
use natter_proto::api::{
    ConversationPage, ConversationView, MarkRead, ReadState, ReaderView, ReceiptsView,
    SettingsUpdate, SettingsView,
};
use natter_proto::ErrorCode;
use natter_record::http::{caller, view, ApiError};
use natter_record::store::{group_conversation, ConversationEntry, ListKey, Peer, SettingsChange};
use natter_roles::{Authenticate, Identity};
use serde::Deserialize;

/// Routes served by this module, as written in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/conversations"),
    ("post", "/v1/conversations/{conversation}/read"),
    ("put", "/v1/conversations/{conversation}/settings"),
    (
        "get",
        "/v1/conversations/{conversation}/messages/{mid}/receipts",
    ),
    ("put", "/v1/groups/{group}/read"),
];

#[derive(Clone)]
struct HttpState {
    logic: Arc<Logic>,
    auth: Arc<dyn Authenticate>,
}

/// The conversation routes, acting through `logic`.
pub fn router(logic: Arc<Logic>, auth: Arc<dyn Authenticate>) -> Router {
    Router::new()
        .route("/v1/conversations", get(list))
        .route("/v1/conversations/{conversation}/read", post(read))
        .route("/v1/conversations/{conversation}/settings", put(settings))
        .route(
            "/v1/conversations/{conversation}/messages/{mid}/receipts",
            get(receipts),
        )
        .route("/v1/groups/{group}/read", put(group_read))
        .with_state(HttpState { logic, auth })
}

/// An HTTP caller as a session: it holds no connection, so every one of its
/// devices online gets what a read tells them.
fn session(me: Identity) -> Session {
    Session {
        uid: me.uid,
        device: me.device,
        node: Arc::from(""),
        conn: 0,
    }
}

fn path<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(p)| p)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
}

fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    Ok(json?.0)
}

#[derive(Deserialize)]
struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
}

/// A list position as `after` carries it: `{pinned}.{last_mid}.{conversation}`.
fn list_cursor(key: &ListKey) -> String {
    format!(
        "{}.{}.{}",
        u8::from(key.pinned),
        key.last_mid,
        key.conversation
    )
}

fn parse_list_cursor(s: &str) -> Result<ListKey, ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::BadRequest,
            "after must be a `next` value of an earlier page",
        )
    };
    let mut parts = s.splitn(3, '.');
    let pinned = match parts.next() {
        Some("0") => false,
        Some("1") => true,
        _ => return Err(bad()),
    };
    let last_mid: u64 = parts.next().and_then(|m| m.parse().ok()).ok_or_else(bad)?;
    let conversation = parts.next().filter(|c| !c.is_empty()).ok_or_else(bad)?;
    Ok(ListKey {
        pinned,
        last_mid,
        conversation: conversation.to_string(),
    })
}

fn conversation_view(e: &ConversationEntry) -> ConversationView {
    let (peer, group) = match &e.peer {
        Peer::User(uid) => (Some(uid.clone()), None),
        Peer::Group(group) => (None, Some(*group)),
    };
    ConversationView {
        conversation: e.conversation.clone(),
        peer_read_seq: peer.as_ref().map(|_| e.peer_read_seq),
        peer,
        group,
        last_message: e.last.as_ref().map(|m| view(m, None)),
        last_seq: e.last_seq,
        read_seq: e.read_seq,
        unread: e.unread,
        pinned: e.settings.pinned,
        push: e.settings.push,
    }
}

async fn list(
    State(s): State<HttpState>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ConversationPage>, ApiError> {
    let me = caller(&headers, s.auth.as_ref()).await?;
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "limit must be between 1 and 100",
        ));
    }
    let after = match params.after.as_deref() {
        None | Some("") => None,
        Some(cursor) => Some(parse_list_cursor(cursor)?),
    };
    let page = s.logic.conversations(&me.uid, after, limit).await?;
    let next = page
        .more
        .then(|| page.items.last().map(|e| list_cursor(&e.key())))
        .flatten();
    Ok(Json(ConversationPage {
        conversations: page.items.iter().map(conversation_view).collect(),
        next,
    }))
}

async fn read(
    State(s): State<HttpState>,
    headers: HeaderMap,
    conversation: Result<Path<String>, PathRejection>,
    req: Result<Json<MarkRead>, JsonRejection>,
) -> Result<Json<ReadState>, ApiError> {
    let me = caller(&headers, s.auth.as_ref()).await?;
    let conversation = path(conversation)?;
    let seq = body(req)?.seq;
    let reply = s.logic.mark_read(&session(me), &conversation, seq).await?;
    Ok(Json(ReadState {
        read_seq: reply.read_seq,
        unread: reply.unread,
    }))
}

async fn group_read(
    State(s): State<HttpState>,
    headers: HeaderMap,
    group: Result<Path<u64>, PathRejection>,
    req: Result<Json<MarkRead>, JsonRejection>,
) -> Result<Json<ReadState>, ApiError> {
    let me = caller(&headers, s.auth.as_ref()).await?;
    let conversation = group_conversation(path(group)?);
    let seq = body(req)?.seq;
    let reply = s.logic.mark_read(&session(me), &conversation, seq).await?;
    Ok(Json(ReadState {
        read_seq: reply.read_seq,
        unread: reply.unread,
    }))
}

async fn settings(
    State(s): State<HttpState>,
    headers: HeaderMap,
    conversation: Result<Path<String>, PathRejection>,
    req: Result<Json<SettingsUpdate>, JsonRejection>,
) -> Result<Json<SettingsView>, ApiError> {
    let me = caller(&headers, s.auth.as_ref()).await?;
    let conversation = path(conversation)?;
    let update = body(req)?;
    let change = SettingsChange {
        pinned: update.pinned,
        push: update.push,
    };
    let settings = s.logic.set_settings(&me.uid, &conversation, change).await?;
    Ok(Json(SettingsView {
        pinned: settings.pinned,
        push: settings.push,
    }))
}

async fn receipts(
    State(s): State<HttpState>,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<ReceiptsView>, ApiError> {
    let me = caller(&headers, s.auth.as_ref()).await?;
    let (conversation, mid) = path(ids)?;
    let mid: u64 = mid
        .parse()
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, "mid must be a message id"))?;
    let Receipts {
        conversation,
        mid,
        conv_seq,
        read_count,
        readers,
    } = s.logic.receipts(&me.uid, &conversation, mid).await?;
    Ok(Json(ReceiptsView {
        conversation,
        mid: mid.to_string(),
        conv_seq,
        read_count,
        readers: readers.map(|readers| {
            readers
                .into_iter()
                .map(|r| ReaderView {
                    uid: r.uid,
                    read_seq: r.read_seq,
                })
                .collect()
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursors_round_trip_and_bad_ones_are_refused() {
        let key = ListKey {
            pinned: true,
            last_mid: 42,
            conversation: "p:a.b:c.d".into(),
        };
        assert_eq!(parse_list_cursor(&list_cursor(&key)).expect("parses"), key);
        for bad in ["", "2.1.p:a:b", "1.x.p:a:b", "1.5", "1.5.", "0"] {
            assert!(parse_list_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
