//! The groups HTTP API. The caller is named by the bearer token; every
//! refusal is an [`ApiError`] with its code (mapped to a status in one place,
//! `record::http`). A `{uid}` in a path, and every user id in a query or a
//! body, is checked against the user id rule before anything else: an
//! invalid one is a 400 `bad_request`.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use natter_proto::api::{
    ApplicationView, CreateGroup, Decision, GroupView, JoinOutcome, JoinRequest, MemberPage,
    MemberView, Mute, Nickname, SetRole, Transfer, UpdateGroup, Users,
};
use natter_proto::{ErrorCode, UserId};
use natter_record::http::{caller, ApiError};
use natter_roles::Authenticate;
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
];

#[derive(Clone)]
struct HttpState {
    groups: Arc<Groups>,
    auth: Arc<dyn Authenticate>,
}

impl HttpState {
    async fn me(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        Ok(caller(headers, self.auth.as_ref()).await?.uid)
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

/// A group id and a user id from the path (`/{group}/…/{uid}`), with a
/// clear error when either is not one. The refused id is not echoed: it
/// may be long, and it is the client's own.
fn group_and_user(path: PathResult<(u64, String)>) -> Result<(u64, UserId), ApiError> {
    let (gid, uid) = ids(path)?;
    let uid = UserId::parse(&uid).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("the user id in the path is not valid: {e}"),
        )
    })?;
    Ok((gid, uid))
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
        .with_state(HttpState { groups, auth })
}

async fn mine(
    State(s): State<HttpState>,
    headers: HeaderMap,
) -> Result<Json<Vec<GroupView>>, ApiError> {
    let me = s.me(&headers).await?;
    Ok(Json(s.groups.mine(&me).await?))
}

async fn create(
    State(s): State<HttpState>,
    headers: HeaderMap,
    req: Result<Json<CreateGroup>, JsonRejection>,
) -> Result<(StatusCode, Json<GroupView>), ApiError> {
    let me = s.me(&headers).await?;
    let view = s.groups.create(&me, body(req)?).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn info(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers).await?;
    Ok(Json(s.groups.info(&me, ids(path)?).await?))
}

async fn update(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<UpdateGroup>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers).await?;
    let gid = ids(path)?;
    Ok(Json(s.groups.update(&me, gid, body(req)?).await?))
}

async fn dissolve(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers).await?;
    s.groups.dissolve(&me, ids(path)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PageParams {
    /// Members whose uid is greater, byte for byte; absent: from the first.
    after: Option<UserId>,
    limit: Option<u32>,
}

async fn members(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<MemberPage>, ApiError> {
    let me = s.me(&headers).await?;
    let gid = ids(path)?;
    let Query(params) = params?;
    let page = s
        .groups
        .members(&me, gid, params.after.as_ref(), params.limit.unwrap_or(100))
        .await?;
    Ok(Json(page))
}

async fn invite(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<Users>, JsonRejection>,
) -> Result<Json<Users>, ApiError> {
    let me = s.me(&headers).await?;
    let gid = ids(path)?;
    let users = s.groups.invite(&me, gid, body(req)?.users).await?;
    Ok(Json(Users { users }))
}

async fn member(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    Ok(Json(s.groups.member(&me, gid, &uid).await?))
}

/// Removes a member: oneself (leave) or another (kick).
async fn remove(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    if uid == me {
        s.groups.quit(&me, gid).await?;
    } else {
        s.groups.kick(&me, gid, &uid).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn set_role(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
    req: Result<Json<SetRole>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    Ok(Json(
        s.groups.set_role(&me, gid, &uid, body(req)?.role).await?,
    ))
}

async fn mute(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
    req: Result<Json<Mute>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    let secs = body(req)?.duration_secs;
    Ok(Json(s.groups.mute(&me, gid, &uid, secs).await?))
}

async fn nickname(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
    req: Result<Json<Nickname>, JsonRejection>,
) -> Result<Json<MemberView>, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    let nick = body(req)?.nickname;
    Ok(Json(s.groups.nickname(&me, gid, &uid, nick).await?))
}

async fn muted(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<Vec<MemberView>>, ApiError> {
    let me = s.me(&headers).await?;
    Ok(Json(s.groups.muted(&me, ids(path)?).await?))
}

async fn transfer(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<Transfer>, JsonRejection>,
) -> Result<Json<GroupView>, ApiError> {
    let me = s.me(&headers).await?;
    let gid = ids(path)?;
    Ok(Json(s.groups.transfer(&me, gid, &body(req)?.to).await?))
}

async fn join(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
    req: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<JoinOutcome>, ApiError> {
    let me = s.me(&headers).await?;
    let gid = ids(path)?;
    Ok(Json(s.groups.join(&me, gid, body(req)?.message).await?))
}

async fn applications(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<u64>,
) -> Result<Json<Vec<ApplicationView>>, ApiError> {
    let me = s.me(&headers).await?;
    Ok(Json(s.groups.applications(&me, ids(path)?).await?))
}

async fn decide(
    State(s): State<HttpState>,
    headers: HeaderMap,
    path: PathResult<(u64, String)>,
    req: Result<Json<Decision>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let me = s.me(&headers).await?;
    let (gid, uid) = group_and_user(path)?;
    s.groups.decide(&me, gid, &uid, body(req)?.approve).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteGroupStore;
    use natter_proto::api::ErrorBody;
    use natter_roles::{Identity, Refusal};

    /// Takes the token for the user id itself: these tests are about ids,
    /// not tokens.
    struct TokenIsTheUser;

    #[async_trait::async_trait]
    impl Authenticate for TokenIsTheUser {
        async fn authenticate(&self, token: &str, _: Option<&str>) -> Result<Identity, Refusal> {
            let uid = UserId::parse(token)
                .map_err(|_| Refusal::new(ErrorCode::AuthFailed, "not a user"))?;
            Ok(Identity {
                uid,
                device: "test".into(),
            })
        }
    }

    struct Quiet;

    #[async_trait::async_trait]
    impl crate::Publisher for Quiet {
        async fn publish(
            &self,
            _: u64,
            _: natter_proto::msg::GroupEvent,
            _: Vec<UserId>,
        ) -> Result<(), Refusal> {
            Ok(())
        }
    }

    /// The groups API on a port of its own; the server stops with the
    /// returned task.
    async fn serve() -> (String, tokio::task::JoinHandle<()>) {
        let store = Arc::new(SqliteGroupStore::memory().await.expect("group store"));
        let messages = Arc::new(
            natter_record::sqlite::SqliteStore::memory()
                .await
                .expect("message store"),
        );
        let groups = Arc::new(Groups::new(
            store,
            messages,
            Arc::new(Quiet),
            natter_node::config::GroupsConfig::default(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let app = router(groups, Arc::new(TokenIsTheUser));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (base, server)
    }

    async fn refused(response: reqwest::Response) -> (u16, ErrorBody) {
        let status = response.status().as_u16();
        (status, response.json().await.expect("an error body"))
    }

    #[tokio::test]
    async fn invalid_user_ids_are_bad_requests_wherever_they_appear() {
        let (base, server) = serve().await;
        let http = reqwest::Client::new();
        let created: GroupView = http
            .post(format!("{base}/v1/groups"))
            .bearer_auth("owner")
            .json(&serde_json::json!({"name": "g", "join_type": "open", "members": ["Bob"]}))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("a group");
        let group = format!("{base}/v1/groups/{}", created.id);
        let too_long = "x".repeat(65);

        // ("." and ".." never arrive: clients resolve them away.)
        for path in ["a:b", too_long.as_str(), "a%20b", "a%2Fb", "%C3%A9"] {
            for request in [
                http.get(format!("{group}/members/{path}")),
                http.delete(format!("{group}/members/{path}")),
                http.put(format!("{group}/members/{path}/mute"))
                    .json(&serde_json::json!({"duration_secs": 60})),
                http.post(format!("{group}/applications/{path}"))
                    .json(&serde_json::json!({"approve": true})),
            ] {
                let (status, body) =
                    refused(request.bearer_auth("owner").send().await.expect("sent")).await;
                assert_eq!((status, body.code.as_str()), (400, "bad_request"), "{path}");
                assert!(
                    body.message.contains("user id in the path"),
                    "{path}: {}",
                    body.message
                );
            }
        }
        let bodies = [
            (
                http.post(format!("{base}/v1/groups")),
                serde_json::json!({"name": "h", "members": ["ok", "a:b"]}),
            ),
            (
                http.post(format!("{group}/members")),
                serde_json::json!({"users": [too_long]}),
            ),
            (
                http.post(format!("{group}/members")),
                serde_json::json!({"users": [""]}),
            ),
            (
                http.post(format!("{group}/transfer")),
                serde_json::json!({"to": "Bob "}),
            ),
            (
                http.post(format!("{group}/transfer")),
                serde_json::json!({"to": 7}),
            ),
        ];
        for (request, json) in bodies {
            let (status, body) = refused(
                request
                    .bearer_auth("owner")
                    .json(&json)
                    .send()
                    .await
                    .expect("sent"),
            )
            .await;
            assert_eq!((status, body.code.as_str()), (400, "bad_request"), "{json}");
        }
        let (status, body) = refused(
            http.get(format!("{group}/members?after=a:b"))
                .bearer_auth("owner")
                .send()
                .await
                .expect("sent"),
        )
        .await;
        assert_eq!((status, body.code.as_str()), (400, "bad_request"));
        server.abort();
    }

    /// Through the API: ids that differ only in case are two members, the
    /// longest id works as a path segment, and pages follow byte order.
    #[tokio::test]
    async fn user_ids_in_paths_are_taken_byte_for_byte() {
        let (base, server) = serve().await;
        let http = reqwest::Client::new();
        let long = format!("{}@x.y", "L".repeat(60));
        let created: GroupView = http
            .post(format!("{base}/v1/groups"))
            .bearer_auth("owner")
            .json(&serde_json::json!({
                "name": "g",
                "join_type": "open",
                "members": ["bob", "Bob", long],
            }))
            .send()
            .await
            .expect("sent")
            .json()
            .await
            .expect("a group");
        assert_eq!(created.member_count, 4);
        let group = format!("{base}/v1/groups/{}", created.id);
        for uid in ["bob", "Bob", long.as_str()] {
            let member: MemberView = http
                .get(format!("{group}/members/{uid}"))
                .bearer_auth("owner")
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("a member");
            assert_eq!(member.uid.as_str(), uid);
        }
        let response = http
            .delete(format!("{group}/members/Bob"))
            .bearer_auth("owner")
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let (status, body) = refused(
            http.get(format!("{group}/members/Bob"))
                .bearer_auth("owner")
                .send()
                .await
                .expect("sent"),
        )
        .await;
        assert_eq!(
            (status, body.code.as_str()),
            (403, "not_member"),
            "Bob was kicked"
        );
        http.get(format!("{group}/members/bob"))
            .bearer_auth("owner")
            .send()
            .await
            .expect("sent")
            .error_for_status()
            .expect("bob is still a member");
        let mut seen = Vec::new();
        let mut after = String::new();
        loop {
            let page: MemberPage = http
                .get(format!("{group}/members?limit=1{after}"))
                .bearer_auth("bob")
                .send()
                .await
                .expect("sent")
                .json()
                .await
                .expect("a page");
            seen.extend(page.members.iter().map(|m| m.uid.to_string()));
            match page.next_after {
                Some(next) => after = format!("&after={next}"),
                None => break,
            }
        }
        assert_eq!(seen, [long.as_str(), "bob", "owner"]);
        server.abort();
    }
}
