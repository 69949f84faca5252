//! The behaviour every [`GroupStore`] must have, run by each implementation's tests.

use natter_proto::api::{JoinType, Role};
use natter_proto::UserId;

use crate::store::*;

pub(crate) fn uid(s: &str) -> UserId {
    UserId::parse(s).expect("a valid user id")
}

pub(crate) fn member(id: &str, role: Role) -> MemberRecord {
    MemberRecord {
        uid: uid(id),
        role,
        nickname: String::new(),
        joined_ms: 1,
        join_seq: 1,
        muted_until_ms: 0,
    }
}

pub(crate) fn group_owned_by(owner: &str) -> GroupRecord {
    GroupRecord {
        id: 0,
        name: "g".into(),
        avatar: String::new(),
        owner: uid(owner),
        join_type: JoinType::Approval,
        mute_all: false,
        dissolved: false,
        created_ms: 5,
        version: 0,
    }
}

/// Every behaviour, each on its own groups.
pub async fn run_all(store: &dyn GroupStore) {
    round_trip(store).await;
    user_ids_are_compared_byte_for_byte(store).await;
    the_longest_user_id_round_trips(store).await;
}

/// Groups, members, read cursors and applications round-trip, and
/// changes apply together.
pub async fn round_trip(store: &dyn GroupStore) {
    let group = group_owned_by("u1");
    let gid = store
        .create(
            &group,
            &[member("u1", Role::Owner), member("u2", Role::Member)],
        )
        .await
        .expect("create");
    let second = store
        .create(&group, &[member("u1", Role::Owner)])
        .await
        .expect("create");
    assert_ne!(gid, second);
    let stored = store.group(gid).await.expect("read").expect("exists");
    assert_eq!(
        stored,
        GroupRecord {
            id: gid,
            ..group.clone()
        }
    );
    assert_eq!(store.group(999).await.expect("read"), None);
    assert_eq!(store.version(gid).await.expect("version"), Some(0));
    assert_eq!(store.version(999).await.expect("version"), None);

    let mut muted = member("u2", Role::Member);
    muted.muted_until_ms = 77;
    // A change against an old version writes nothing.
    let stale = store
        .write(gid, 5, &[Change::RemoveMember(uid("u1"))])
        .await
        .expect("write");
    assert!(!stale);
    assert_eq!(store.members(gid).await.expect("members").len(), 2);
    let written = store
        .write(
            gid,
            0,
            &[
                Change::PutMember(muted.clone()),
                Change::PutMember(member("u3", Role::Admin)),
                Change::PutApplication(ApplicationRecord {
                    uid: uid("u9"),
                    message: "hi".into(),
                    time_ms: 3,
                }),
                Change::PutGroup(GroupRecord {
                    name: "renamed".into(),
                    mute_all: true,
                    ..stored.clone()
                }),
            ],
        )
        .await
        .expect("write");
    assert!(written);
    let members = store.members(gid).await.expect("members");
    assert_eq!(
        members,
        vec![member("u1", Role::Owner), muted, member("u3", Role::Admin)]
    );
    let renamed = store.group(gid).await.expect("read").expect("exists");
    assert_eq!(
        (renamed.name.as_str(), renamed.mute_all, renamed.version),
        ("renamed", true, 1)
    );
    assert_eq!(store.applications(gid).await.expect("apps").len(), 1);
    assert_eq!(
        store.groups_of(&uid("u1")).await.expect("mine"),
        vec![(gid, 1), (second, 1)]
    );
    assert_eq!(store.owned_count(&uid("u1")).await.expect("owned"), 2);
    assert_eq!(
        store.owned_count(&uid("u2")).await.expect("owned"),
        0,
        "a member owns none"
    );
    // Read cursors only move forward, and member updates keep them.
    assert_eq!(store.mark_read(gid, &uid("u3"), 5).await.expect("read"), 5);
    assert_eq!(store.mark_read(gid, &uid("u3"), 4).await.expect("read"), 5);
    store
        .write(gid, 1, &[Change::PutMember(member("u3", Role::Member))])
        .await
        .expect("write");
    assert_eq!(store.read_seq(gid, &uid("u3")).await.expect("read"), 5);
    assert_eq!(store.read_seq(gid, &uid("u42")).await.expect("read"), 0);
    store
        .write(
            gid,
            2,
            &[
                Change::RemoveMember(uid("u2")),
                Change::RemoveApplication(uid("u9")),
            ],
        )
        .await
        .expect("write");
    assert_eq!(store.members(gid).await.expect("members").len(), 2);
    assert!(store.applications(gid).await.expect("apps").is_empty());
    assert!(store.groups_of(&uid("u2")).await.expect("mine").is_empty());
}

/// Ids that differ only in case are two users (members, applicants,
/// owners, read cursors), and members come in byte order: "B" before "a".
pub async fn user_ids_are_compared_byte_for_byte(store: &dyn GroupStore) {
    let gid = store
        .create(
            &group_owned_by("Ann"),
            &[
                member("Ann", Role::Owner),
                member("ann", Role::Member),
                member("a", Role::Member),
                member("B", Role::Member),
            ],
        )
        .await
        .expect("create");
    let order: Vec<String> = store
        .members(gid)
        .await
        .expect("members")
        .iter()
        .map(|m| m.uid.to_string())
        .collect();
    assert_eq!(order, ["Ann", "B", "a", "ann"], "byte order");
    assert_eq!(store.owned_count(&uid("Ann")).await.expect("owned"), 1);
    assert_eq!(store.owned_count(&uid("ann")).await.expect("owned"), 0);
    assert_eq!(store.groups_of(&uid("ANN")).await.expect("mine"), vec![]);

    assert_eq!(store.mark_read(gid, &uid("ann"), 7).await.expect("read"), 7);
    assert_eq!(store.read_seq(gid, &uid("Ann")).await.expect("read"), 0);
    assert_eq!(store.read_seq(gid, &uid("ann")).await.expect("read"), 7);

    let written = store
        .write(
            gid,
            0,
            &[
                Change::PutApplication(ApplicationRecord {
                    uid: uid("Zed"),
                    message: "upper".into(),
                    time_ms: 1,
                }),
                Change::PutApplication(ApplicationRecord {
                    uid: uid("zed"),
                    message: "lower".into(),
                    time_ms: 1,
                }),
                // Removes "ann" only, not "Ann".
                Change::RemoveMember(uid("ann")),
            ],
        )
        .await
        .expect("write");
    assert!(written);
    let applications: Vec<(String, String)> = store
        .applications(gid)
        .await
        .expect("apps")
        .into_iter()
        .map(|a| (a.uid.to_string(), a.message))
        .collect();
    assert_eq!(
        applications,
        [
            ("Zed".to_string(), "upper".to_string()),
            ("zed".to_string(), "lower".to_string())
        ]
    );
    let members: Vec<String> = store
        .members(gid)
        .await
        .expect("members")
        .iter()
        .map(|m| m.uid.to_string())
        .collect();
    assert_eq!(members, ["Ann", "B", "a"]);
}

/// A user id of the full 64 bytes, of every allowed kind of character,
/// is stored and read back whole as member, owner and applicant.
pub async fn the_longest_user_id_round_trips(store: &dyn GroupStore) {
    let long = format!("{}-_.@{}", "A".repeat(30), "z9".repeat(15));
    assert_eq!(long.len(), 64);
    let gid = store
        .create(&group_owned_by(&long), &[member(&long, Role::Owner)])
        .await
        .expect("create");
    let group = store.group(gid).await.expect("read").expect("exists");
    assert_eq!(group.owner.as_str(), long);
    assert_eq!(
        store.members(gid).await.expect("members"),
        vec![member(&long, Role::Owner)]
    );
    assert_eq!(
        store.groups_of(&uid(&long)).await.expect("mine"),
        vec![(gid, 1)]
    );
    assert_eq!(store.owned_count(&uid(&long)).await.expect("owned"), 1);
    assert_eq!(store.mark_read(gid, &uid(&long), 3).await.expect("read"), 3);
    let applicant = "9".repeat(64);
    assert!(store
        .write(
            gid,
            0,
            &[Change::PutApplication(ApplicationRecord {
                uid: uid(&applicant),
                message: String::new(),
                time_ms: 2,
            })],
        )
        .await
        .expect("write"));
    let applications = store.applications(gid).await.expect("apps");
    assert_eq!(applications.len(), 1);
    assert_eq!(applications[0].uid.as_str(), applicant);
}
