//! The behaviour every [`GroupStore`] must have, run by each implementation's tests.

use natter_proto::api::{JoinType, Role};

use crate::store::*;

pub(crate) fn member(uid: u64, role: Role) -> MemberRecord {
    MemberRecord {
        uid,
        role,
        nickname: String::new(),
        joined_ms: 1,
        join_seq: 1,
        muted_until_ms: 0,
    }
}

/// Groups, members, read cursors and applications round-trip, and
/// changes apply together.
pub async fn round_trip(store: &dyn GroupStore) {
    let group = GroupRecord {
        id: 0,
        name: "g".into(),
        avatar: String::new(),
        owner: 1,
        join_type: JoinType::Approval,
        mute_all: false,
        dissolved: false,
        created_ms: 5,
        version: 0,
    };
    let gid = store
        .create(&group, &[member(1, Role::Owner), member(2, Role::Member)])
        .await
        .expect("create");
    let second = store
        .create(&group, &[member(1, Role::Owner)])
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

    let mut muted = member(2, Role::Member);
    muted.muted_until_ms = 77;
    // A change against an old version writes nothing.
    let stale = store
        .write(gid, 5, &[Change::RemoveMember(1)])
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
                Change::PutMember(member(3, Role::Admin)),
                Change::PutApplication(ApplicationRecord {
                    uid: 9,
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
        vec![member(1, Role::Owner), muted, member(3, Role::Admin)]
    );
    let renamed = store.group(gid).await.expect("read").expect("exists");
    assert_eq!(
        (renamed.name.as_str(), renamed.mute_all, renamed.version),
        ("renamed", true, 1)
    );
    assert_eq!(store.applications(gid).await.expect("apps").len(), 1);
    assert_eq!(
        store.groups_of(1).await.expect("mine"),
        vec![(gid, 1), (second, 1)]
    );
    assert_eq!(store.owned_count(1).await.expect("owned"), 2);
    assert_eq!(
        store.owned_count(2).await.expect("owned"),
        0,
        "a member owns none"
    );
    // Read cursors only move forward, and member updates keep them.
    assert_eq!(store.mark_read(gid, 3, 5).await.expect("read"), 5);
    assert_eq!(store.mark_read(gid, 3, 4).await.expect("read"), 5);
    store
        .write(gid, 1, &[Change::PutMember(member(3, Role::Member))])
        .await
        .expect("write");
    assert_eq!(store.read_seq(gid, 3).await.expect("read"), 5);
    assert_eq!(store.read_seq(gid, 42).await.expect("read"), 0);
    store
        .write(
            gid,
            2,
            &[Change::RemoveMember(2), Change::RemoveApplication(9)],
        )
        .await
        .expect("write");
    assert_eq!(store.members(gid).await.expect("members").len(), 2);
    assert!(store.applications(gid).await.expect("apps").is_empty());
    assert!(store.groups_of(2).await.expect("mine").is_empty());
}
