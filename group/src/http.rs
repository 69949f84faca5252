//! The groups HTTP API. The caller is named by the bearer token; every
//! refusal is an [`ApiError`] with its code (mapped to a status in one place,
//! `record::http`).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use natter_proto::api::{
    ApplicationView, CreateGroup, Decision, GroupView, JoinOutcome, JoinRequest, MarkRead,
    MemberPage, MemberView, Mute, Nickname, ReadState, SetRole, Transfer, UpdateGroup, Users,
};
use natter_proto::ErrorCode;
use natter_record::http::{caller, ApiError, Authenticate};
use serde::Deserialize;

use crate::Groups;

/// Routes served by this module, as written in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/groups"),
    ("post", "/v1/groups"),
    ("get", "/v1/groups/{group}"),
    ("patch", "/v1/groups/{group}"),
    ("delete", "/v1/groups/{group}"),
    ("get", "/v1/groups/{group}/members"),
    ("post", "/v1/groups/{group}/members"),
    ("get", "/v1/groups/{group}/members/{uid}"),
    ("delete", "/v1/groups/{group}/members/{uid}"),
    ("put", "/v1/groups/{group}/members/{uid}/role"),
    ("put", "/v1/groups/{group}/members/{uid}/mute"),
    ("put", "/v1/groups/{group}/members/{uid}/nickname"),
    ("get", "/v1/groups/{group}/muted"),
    ("post", "/v1/groups/{group}/transfer"),
    ("post", "/v1/groups/{group}/join"),
    ("get", "/v1/groups/{group}/applications"),
    ("post", "/v1/groups/{group}/applications/{uid}"),
    ("put", "/v1/groups/{group}/read"),
];

#[derive(Clone)]
struct HttpState {
    groups: Arc<Groups>,
    auth: Arc<dyn Authenticate>,
}

impl HttpState {
    fn me(&self, headers: &HeaderMap) -> Result<u64, ApiError> {
        Ok(caller(headers, self.auth.as_ref())?.uid)
    }
}

/// A JSON body, with a clear error when it does not parse.
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    json.map(|Json(v)| v).map_err(ApiError::from)
}

/// Path ids, with a clear error when they are not numbers.
fn ids<T>(path: Result<Path<T>, axum::extract::rejection::PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(v)| v)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
}

type PathResult<T> = Result<Path<T>, axum::extract::rejection::PathRejection>;

/// The groups routes.
pub fn router(groups: Arc<Groups>, auth: Arc<dyn Authenticate>) -> Router {
    Router::new()
        .route("/v1/groups", get(mine).post(create))
        .route(
            "/v1/groups/{group}",
            get(info).patch(update).delete(dissolve),
        )
        .route("/v1/groups/{group}/members", get(members).post(invite))
        .route(
            "/v1/groups/{group}/members/{uid}",
            get(member).delete(remove),
        )
        .route("/v1/groups/{group}/members/{uid}/role", put(set_role))
        .route("/v1/groups/{group}/members/{uid}/mute", put(mute))
        .route("/v1/groups/{group}/members/{uid}/nickname", put(nickname))
        .route("/v1/groups/{group}/muted", get(muted))
        .route("/v1/groups/{group}/transfer", post(transfer))
        .route("/v1/groups/{group}/join", post(join))
        .route("/v1/groups/{group}/applications", get(applications))
        .route("/v1/groups/{group}/applications/{uid}", post(decide))
        .route("/v1/groups/{group}/read", put(mark_read))
        .with_state(HttpState { groups, auth })
}

async fn mine(
    State(s): State<HttpState>,
    headers: HeaderMap,
) -> Result<Json<Vec<GroupView>>, ApiError> {
    let me = s.me(&headers)?;
    Ok(Json(s.groups.mine(me).await?))
}

async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    req: Result<Json<CreateGroup>, JsonRejection>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let me = s.me(&headers)?;
    let view = s.groups.create(me, body(req)?).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn info(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers)?;
    Ok(Json(s.groups.info(me, ids(path)?).await?))
}

async fn update(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<UpdateGroup>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    Ok(Json(s.groups.update(me, gid, body(req)?).await?))
}

async fn dissolve(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers)?;
    s.groups.dissolve(me, ids(path)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PageParams {
    after: Option<u64>,
    limit: Option<u32>,
}

async fn members(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<MemberPage>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    let Query(params) = params?;
    let page = s
        .groups
        .members(
            me,
            gid,
            params.after.unwrap_or(0),
            params.limit.unwrap_or(100),
        )
        .await?;
    Ok(Json(page))
}

async fn invite(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<Users>, JsonRejection>,
) -> Result<Json<Users>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    let users = s.groups.invite(me, gid, body(req)?.users).await?;
    Ok(Json(Users { users }))
}

async fn member(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    Ok(Json(s.groups.member(me, gid, uid).await?))
}

/// Removes a member: oneself (leave) or another (kick).
async fn remove(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    if uid == me {
        s.groups.quit(me, gid).await?;
    } else {
        s.groups.kick(me, gid, uid).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn set_role(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
    req: Result<Json<SetRole>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    Ok(Json(
        s.groups.set_role(me, gid, uid, body(req)?.role).await?,
    ))
}

async fn mute(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
    req: Result<Json<Mute>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    let secs = body(req)?.duration_secs;
    Ok(Json(s.groups.mute(me, gid, uid, secs).await?))
}

async fn nickname(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
    req: Result<Json<Nickname>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    let nick = body(req)?.nickname;
    Ok(Json(s.groups.nickname(me, gid, uid, nick).await?))
}

async fn muted(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<Vec<MemberView>>, ApiError> {
    let me = s.me(&headers)?;
    Ok(Json(s.groups.muted(me, ids(path)?).await?))
}

async fn transfer(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<Transfer>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    Ok(Json(s.groups.transfer(me, gid, body(req)?.to).await?))
}

async fn join(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<JoinOutcome>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    Ok(Json(s.groups.join(me, gid, body(req)?.message).await?))
}

async fn applications(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<Vec<ApplicationView>>, ApiError> {
    let me = s.me(&headers)?;
    Ok(Json(s.groups.applications(me, ids(path)?).await?))
}

async fn decide(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, u64)>,
    req: Result<Json<Decision>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers)?;
    let (gid, uid) = ids(path)?;
    s.groups.decide(me, gid, uid, body(req)?.approve).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn mark_read(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<MarkRead>, JsonRejection>,
) -> Result<Json<ReadState>, ApiError> {
    let me = s.me(&headers)?;
    let gid = ids(path)?;
    Ok(Json(s.groups.mark_read(me, gid, body(req)?.seq).await?))
}
