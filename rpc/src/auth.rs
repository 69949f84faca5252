//! Who may call whom on the role-to-role plane, checked twice:
//!
//! - **The plane** ([`PlaneKey`]): every call carries, in the
//!   `x-natter-auth` metadata, `v1.T.MAC` where `T` is the caller's clock
//!   (Unix ms) and `MAC` is HMAC-SHA256, under a key derived from
//!   `rpc.secret`, over the call's path (`/natter.rpc.Logic/Send`) and `T`.
//!   The server ([`Guarded`]) refuses a call with `Unauthenticated` before it
//!   is decoded when the MAC does not verify (compared in constant time) or
//!   `T` is further than `rpc.max_clock_skew_ms` from its own clock. Clients
//!   sign through [`Signer`]. This proves the caller holds the cluster
//!   secret; it neither hides nor binds the request's body (the plane is a
//!   private network; see ARCHITECTURE.md).
//! - **The session** ([`SessionKey`]): `Authenticate` answers with a
//!   [`pb::Grant`], the session (uid, device, node, conn) in its protobuf
//!   encoding, signed by logic with a key derived from `auth.secret`, which
//!   only logic nodes (and the account system) hold — gateways do not. Every later per-session call
//!   (send, sync, read, typing, push-ack, disconnect, heartbeat) presents it, and logic
//!   acts for the uid and device written in the grant, never for what the
//!   caller says: a gateway cannot act for a user who has not connected to
//!   it with a valid token.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use hmac::{Hmac, Mac};
use natter_roles::Session;
use prost::Message as _;
use sha2::Sha256;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{GrpcMethod, Status};

use crate::pb;

/// The metadata key of the plane's credential.
pub const AUTH_HEADER: &str = "x-natter-auth";

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// A key for one purpose, derived from a secret: the secret is never used
/// as a key directly, and the two keys below cannot stand in for each other.
fn derive(secret: &[u8], purpose: &str) -> [u8; 32] {
    let mut m = mac(secret);
    m.update(purpose.as_bytes());
    m.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() & 1 == 1 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// The plane's key (from `rpc.secret`) and the clock skew it tolerates.
#[derive(Clone)]
pub struct PlaneKey {
    key: [u8; 32],
    max_skew_ms: i64,
}

impl std::fmt::Debug for PlaneKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlaneKey(<secret>)")
    }
}

impl PlaneKey {
    pub fn new(secret: &[u8], max_skew: Duration) -> PlaneKey {
        PlaneKey {
            key: derive(secret, "natter rpc plane v1"),
            max_skew_ms: max_skew.as_millis().min(i64::MAX as u128) as i64,
        }
    }

    fn mac(&self, path: &str, at_ms: i64) -> HmacSha256 {
        let mut m = mac(&self.key);
        m.update(path.as_bytes());
        m.update(b"\n");
        m.update(at_ms.to_string().as_bytes());
        m
    }

    /// The credential for a call of `path` made at `at_ms`.
    pub fn sign(&self, path: &str, at_ms: i64) -> String {
        let tag = self.mac(path, at_ms).finalize().into_bytes();
        format!("v1.{at_ms}.{}", hex(&tag))
    }

    /// Checks the credential of a call of `path` received at `now_ms`.
    pub fn check(&self, path: &str, credential: Option<&str>, now_ms: i64) -> Result<(), Status> {
        let refused = |why: &str| Err(Status::unauthenticated(why.to_string()));
        let Some(credential) = credential else {
            return refused("no credential: calls between natter nodes are signed with rpc.secret");
        };
        let mut parts = credential.split('.');
        let (Some("v1"), Some(at), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return refused("malformed credential");
        };
        let (Ok(at_ms), Some(tag)) = (at.parse::<i64>(), unhex(tag)) else {
            return refused("malformed credential");
        };
        // The MAC first: an unsigned caller learns nothing about our clock.
        if self.mac(path, at_ms).verify_slice(&tag).is_err() {
            return refused("credential does not verify (is rpc.secret the same on every node?)");
        }
        if now_ms.abs_diff(at_ms) > self.max_skew_ms.unsigned_abs() {
            return refused("stale credential (are the nodes' clocks in step?)");
        }
        Ok(())
    }
}

/// Signs every call of a client (a tonic interceptor).
#[derive(Clone, Debug)]
pub struct Signer(pub PlaneKey);

impl tonic::service::Interceptor for Signer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        // Generated clients name the method of every call.
        let path = match request.extensions().get::<GrpcMethod>() {
            Some(m) => format!("/{}/{}", m.service(), m.method()),
            None => return Err(Status::internal("a call without its method")),
        };
        let credential = self.0.sign(&path, natter_node::ids::now_ms());
        let value = MetadataValue::try_from(credential)
            .map_err(|_| Status::internal("credential is not a header value"))?;
        request.metadata_mut().insert(AUTH_HEADER, value);
        Ok(request)
    }
}

/// A gRPC service that serves only signed calls (see the module's doc).
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    key: PlaneKey,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, key: PlaneKey) -> Guarded<S> {
        Guarded { inner, key }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<http::Request<Body>> for Guarded<S>
where
    S: tonic::codegen::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let credential = request
            .headers()
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok());
        match self
            .key
            .check(request.uri().path(), credential, natter_node::ids::now_ms())
        {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::warn!(
                    path = request.uri().path(),
                    reason = status.message(),
                    "unauthenticated call refused"
                );
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// Logic's key for session grants (from `auth.secret`).
#[derive(Clone)]
pub struct SessionKey {
    key: [u8; 32],
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<secret>)")
    }
}

impl SessionKey {
    pub fn new(auth_secret: &[u8]) -> SessionKey {
        SessionKey {
            // v2: sessions name string user ids. A v1 grant (numeric uid)
            // signed before an upgrade does not verify under this key.
            key: derive(auth_secret, "natter session grant v2"),
        }
    }

    /// The grant of `session`: its protobuf encoding and the MAC of exactly
    /// those bytes. The encoding frames every field with its tag and every
    /// string with its length, so the signed bytes name one session only: a
    /// boundary cannot move between the uid and the device.
    pub fn grant(&self, session: &Session) -> pb::Grant {
        let bytes = crate::to_pb(session).encode_to_vec();
        pb::Grant {
            tag: self.tag(&bytes),
            session: bytes,
        }
    }

    fn tag(&self, session: &[u8]) -> Vec<u8> {
        let mut m = mac(&self.key);
        m.update(session);
        m.finalize().into_bytes().to_vec()
    }

    /// The session a grant names, if logic signed it.
    pub fn verify(&self, grant: Option<&pb::Grant>) -> Result<Session, Status> {
        let refused = |why: &str| Err(Status::unauthenticated(why.to_string()));
        let Some(grant) = grant else {
            return refused("no session grant");
        };
        let mut m = mac(&self.key);
        m.update(&grant.session);
        if m.verify_slice(&grant.tag).is_err() {
            return refused("session grant does not verify");
        }
        let Ok(session) = pb::Session::decode(grant.session.as_slice()) else {
            return refused("session grant does not decode");
        };
        // Logic signs only sessions of valid users; one that is not is
        // refused all the same, never trusted.
        crate::from_pb(session).map_err(Status::unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_proto::UserId;
    use std::sync::Arc;

    const SECRET: &[u8] = b"a cluster secret of at least 32 bytes";

    #[test]
    fn plane_credentials_verify_only_for_their_path_time_and_key() {
        let key = PlaneKey::new(SECRET, Duration::from_secs(30));
        let path = "/natter.rpc.Logic/Send";
        let signed = key.sign(path, 1_000_000);
        key.check(path, Some(&signed), 1_000_000).expect("fresh");
        key.check(path, Some(&signed), 1_029_000)
            .expect("within the skew");
        key.check(path, Some(&signed), 971_000)
            .expect("within the skew, behind");
        let refuse = |credential: Option<&str>, path: &str, now: i64| {
            let status = key.check(path, credential, now).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        };
        refuse(None, path, 1_000_000);
        refuse(Some(""), path, 1_000_000);
        refuse(Some(&signed), "/natter.rpc.Logic/Sync", 1_000_000);
        refuse(Some(&signed), path, 1_031_000);
        refuse(Some(&signed), path, 969_000);
        let other = PlaneKey::new(
            b"another secret of at least 32 bytes!!",
            Duration::from_secs(30),
        );
        refuse(Some(&other.sign(path, 1_000_000)), path, 1_000_000);
        // The time is signed: moving it forward breaks the MAC.
        let moved = signed.replacen("1000000", "1020000", 1);
        refuse(Some(&moved), path, 1_020_000);
        let truncated = &signed[..signed.len() - 2];
        refuse(Some(truncated), path, 1_000_000);
    }

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid uid")
    }

    fn session_of(uid_: &str, device: &str, conn: u64) -> Session {
        Session {
            uid: uid(uid_),
            device: device.into(),
            node: Arc::from("comet-1"),
            conn,
        }
    }

    fn session(uid_: &str, conn: u64) -> Session {
        session_of(uid_, "phone", conn)
    }

    fn refused(logic: &SessionKey, g: Option<&pb::Grant>) {
        assert_eq!(
            logic.verify(g).expect_err("refused").code(),
            tonic::Code::Unauthenticated
        )
    }

    #[test]
    fn a_grant_names_its_session_and_any_change_to_it_is_refused() {
        let logic = SessionKey::new(SECRET);
        let grant = logic.grant(&session("u-7", 3));
        assert_eq!(
            logic.verify(Some(&grant)).expect("signed"),
            session("u-7", 3)
        );
        refused(&logic, None);
        // Another uid (one differing only in case, too) or conn with the
        // first one's tag.
        for other in [session("u-8", 3), session("U-7", 3), session("u-7", 4)] {
            let mut forged = grant.clone();
            forged.session = crate::to_pb(&other).encode_to_vec();
            refused(&logic, Some(&forged));
        }
        refused(
            &logic,
            Some(&pb::Grant {
                session: grant.session.clone(),
                tag: Vec::new(),
            }),
        );
        // Signed with another key (the plane's, or another cluster's).
        let foreign = SessionKey::new(b"another secret of at least 32 bytes!!");
        refused(&logic, Some(&foreign.grant(&session("u-7", 3))));
    }

    #[test]
    fn signed_bytes_name_one_session_only() {
        let logic = SessionKey::new(SECRET);
        // The same characters split differently between uid and device.
        let ab_c = session_of("ab", "c", 1);
        let a_bc = session_of("a", "bc", 1);
        let one = logic.grant(&ab_c);
        let two = logic.grant(&a_bc);
        assert_ne!(one.session, two.session);
        assert_ne!(one.tag, two.tag);
        assert_eq!(logic.verify(Some(&one)).expect("signed"), ab_c);
        assert_eq!(logic.verify(Some(&two)).expect("signed"), a_bc);
        refused(
            &logic,
            Some(&pb::Grant {
                session: two.session.clone(),
                tag: one.tag.clone(),
            }),
        );
        // The longest id and its case variants survive the round trip.
        for id in ["x".repeat(64), "Alice".into(), "alice".into()] {
            let s = session(&id, 9);
            assert_eq!(logic.verify(Some(&logic.grant(&s))).expect("signed"), s);
        }
    }

    #[test]
    fn a_signed_session_naming_an_invalid_user_is_refused() {
        let logic = SessionKey::new(SECRET);
        let too_long = "x".repeat(65);
        for bad in ["", "a:b", "a b", "..", too_long.as_str()] {
            let session = pb::Session {
                uid: bad.into(),
                device: "phone".into(),
                node: "comet-1".into(),
                conn: 1,
            }
            .encode_to_vec();
            let grant = pb::Grant {
                tag: logic.tag(&session),
                session,
            };
            refused(&logic, Some(&grant));
        }
        // Not even a session, but signed.
        let junk = vec![0xff; 8];
        let grant = pb::Grant {
            tag: logic.tag(&junk),
            session: junk,
        };
        refused(&logic, Some(&grant));
    }
}
