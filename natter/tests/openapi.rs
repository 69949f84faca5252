//! docs/openapi.json describes exactly the routes the server has.

use std::collections::BTreeSet;

fn document() -> serde_json::Value {
    let text = include_str!("../../docs/openapi.json");
    serde_json::from_str(text).expect("docs/openapi.json is JSON")
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("path item")
                .keys()
                .map(move |method| (method.clone(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = natter::http_routes()
        .into_iter()
        .chain(natter::admin_routes())
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn documented_error_codes_are_the_real_ones() {
    let doc = document();
    let documented: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let real: Vec<&str> = natter_proto::ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(documented, real);
    let types: Vec<&str> = doc["components"]["schemas"]["MessageType"]["enum"]
        .as_array()
        .expect("enum")
        .iter()
        .map(|v| v.as_str().expect("string"))
        .collect();
    let real: Vec<&str> = natter_proto::msg::MessageType::ALL
        .iter()
        .map(|t| t.as_str())
        .collect();
    assert_eq!(types, real);
}

/// Every API route can answer the front door's refusals: the per-user
/// request limit (429) and the request time-out (408), and a route that
/// takes a body (a `requestBody`), the body limit (413). The admin API has no per-user limit,
/// but its key: every admin route answers 401, and only admin routes take
/// the admin key.
#[test]
fn every_api_route_documents_the_front_doors_refusals() {
    let doc = document();
    let paths = doc["paths"].as_object().expect("paths");
    let mut missing = Vec::new();
    for (path, ops) in paths.iter().filter(|(p, _)| p.starts_with("/v1/")) {
        let admin = path.starts_with("/v1/admin/");
        for (method, op) in ops.as_object().expect("operations") {
            let security = op["security"][0]
                .as_object()
                .and_then(|s| s.keys().next().cloned());
            let tagged = op["tags"]
                .as_array()
                .is_some_and(|t| t.contains(&Value::from("admin")));
            if admin != (security.as_deref() == Some("adminKey")) || admin != tagged {
                missing.push(format!("{method} {path}: admin key and tag"));
            }
            let mut needed = vec!["408", if admin { "401" } else { "429" }];
            if op.get("requestBody").is_some() {
                needed.push("413");
            }
            for status in needed {
                if op["responses"].get(status).is_none() {
                    missing.push(format!("{method} {path}: {status}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "undocumented: {missing:?}");
}

// The JSON bodies: docs/openapi.json describes what the api types read and
// write. Each body is serialized from the shared types and checked against
// its schema: every field written is documented with its JSON type (64-bit
// integers as strings, bytes as base64), every documented field is written
// when set, `required` lists exactly the fields always written (or, for a
// request, exactly the fields the server cannot do without), and every
// schema of an object is checked here.

use std::collections::BTreeMap;

use natter_proto::api::*;
use natter_proto::msg::*;
use serde_json::Value;

/// Above 2^53: a JSON number (a double) would not hold it exactly.
const BIG: u64 = (1 << 53) + 1;
const BIG_SIGNED: i64 = (1 << 53) + 1;
/// The longest user id, with every kind of character the rule allows.
const LONG_UID: &str = "Az09_-.@Az09_-.@Az09_-.@Az09_-.@Az09_-.@Az09_-.@Az09_-.@Az09_-.@";

fn uid() -> natter_proto::UserId {
    natter_proto::UserId::parse(LONG_UID).expect("a valid user id")
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let s = &doc["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

/// `s` with `$ref`s and one-element `allOf`s followed.
fn resolve<'a>(doc: &'a Value, mut s: &'a Value) -> &'a Value {
    loop {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} is not a local schema"));
            s = schema(doc, name);
        } else if let Some([one]) = s.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
            s = one;
        } else {
            return s;
        }
    }
}

/// What is wrong with `value` as an instance of `s`. Stricter than
/// OpenAPI: an object's fields must all be documented unless the schema
/// says `additionalProperties: true`.
fn check(doc: &Value, s: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{path}: null, but the schema is not nullable"));
        }
        return;
    }
    let s = resolve(doc, s);
    if let Some(alternatives) = s.get("oneOf").and_then(Value::as_array) {
        let matching = alternatives
            .iter()
            .filter(|alternative| {
                let mut e = Vec::new();
                check(doc, alternative, value, path, &mut e);
                e.is_empty()
            })
            .count();
        if matching != 1 {
            errors.push(format!("{path}: {value} matches {matching} of its oneOf"));
        }
        return;
    }
    let mut wrong = |what: &str| errors.push(format!("{path}: {value} is not {what}"));
    match s["type"].as_str() {
        Some("string") => {
            let Some(text) = value.as_str() else {
                return wrong("a string");
            };
            match s.get("format").and_then(Value::as_str) {
                Some("uint64") if text.parse::<u64>().is_err() => wrong("a uint64 string"),
                Some("int64") if text.parse::<i64>().is_err() => wrong("an int64 string"),
                Some("byte")
                    if text.len() % 4 != 0
                        || !text
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) =>
                {
                    wrong("base64")
                }
                _ => {}
            }
            if let Some(options) = s.get("enum").and_then(Value::as_array) {
                if !options.contains(value) {
                    wrong("one of the enum");
                }
            }
        }
        Some("integer") if !(value.is_u64() || value.is_i64()) => wrong("an integer"),
        Some("number") if !value.is_number() => wrong("a number"),
        Some("boolean") if !value.is_boolean() => wrong("a boolean"),
        Some("array") => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(doc, &s["items"], item, &format!("{path}[{i}]"), errors);
                }
            }
            None => wrong("an array"),
        },
        Some("object") => {
            let Some(object) = value.as_object() else {
                return wrong("an object");
            };
            let empty = serde_json::Map::new();
            let properties = s["properties"].as_object().unwrap_or(&empty);
            for (key, field) in object {
                match properties.get(key) {
                    Some(p) => check(doc, p, field, &format!("{path}.{key}"), errors),
                    None if s["additionalProperties"] == Value::Bool(true) => {}
                    None => errors.push(format!("{path}.{key}: not documented")),
                }
            }
            for name in required(s) {
                if !object.contains_key(&name) {
                    errors.push(format!("{path}.{name}: required but not written"));
                }
            }
        }
        Some("integer" | "number" | "boolean") => {}
        other => errors.push(format!("{path}: a schema of unknown type {other:?}")),
    }
}

fn required(s: &Value) -> Vec<String> {
    s["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn keys(v: &Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().expect("an object").keys().cloned().collect();
    keys.sort();
    keys
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn property_names(s: &Value) -> Vec<String> {
    keys(&s["properties"])
}

fn valid(doc: &Value, name: &str, value: &Value) {
    let mut errors = Vec::new();
    check(doc, schema(doc, name), value, name, &mut errors);
    assert!(
        errors.is_empty(),
        "{name} does not match {value}:\n{}",
        errors.join("\n")
    );
}

/// A response body: `full` sets every optional field, `minimal` none.
fn response(doc: &Value, checked: &mut Vec<String>, name: &str, full: Value, minimal: Value) {
    valid(doc, name, &full);
    valid(doc, name, &minimal);
    let s = schema(doc, name);
    assert_eq!(keys(&full), property_names(s), "{name}: documented fields");
    assert_eq!(
        keys(&minimal),
        sorted(required(s)),
        "{name}: always written"
    );
    checked.push(name.to_string());
}

/// A request body: `full` (every field set) is documented exactly, and the
/// server takes the required fields alone and refuses a body without any
/// one of them.
macro_rules! request {
    ($doc:expr, $checked:expr, $name:expr, $ty:ty, $sample:expr) => {{
        let full = serde_json::to_value(&$sample).expect("serializes");
        valid($doc, $name, &full);
        let s = schema($doc, $name);
        assert_eq!(
            keys(&full),
            property_names(s),
            "{}: documented fields",
            $name
        );
        let needed = required(s);
        let only = |names: &[String]| {
            Value::Object(
                full.as_object()
                    .expect("object")
                    .iter()
                    .filter(|(k, _)| names.contains(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        };
        let minimal = only(&needed);
        assert!(
            serde_json::from_value::<$ty>(minimal.clone()).is_ok(),
            "{}: {minimal} is refused",
            $name
        );
        for missing in &needed {
            let fewer: Vec<String> = needed.iter().filter(|n| *n != missing).cloned().collect();
            assert!(
                serde_json::from_value::<$ty>(only(&fewer)).is_err(),
                "{}: {missing} is documented as required but is not",
                $name
            );
        }
        $checked.push($name.to_string());
    }};
}

fn json(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).expect("serializes")
}

fn contents() -> Vec<Content> {
    vec![
        Content::Text(Text {
            text: "hi".into(),
            mentions: vec![LONG_UID.into()],
        }),
        Content::Image(Image {
            url: "u".into(),
            width: 1,
            height: 2,
            size: BIG,
            thumbnail_url: "t".into(),
            format: "png".into(),
        }),
        Content::Audio(Audio {
            url: "u".into(),
            duration_ms: 1,
            size: BIG,
            format: "aac".into(),
        }),
        Content::Video(Video {
            url: "u".into(),
            duration_ms: 1,
            width: 2,
            height: 3,
            size: BIG,
            cover_url: "c".into(),
        }),
        Content::File(File {
            url: "u".into(),
            name: "n".into(),
            size: BIG,
            mime: "m".into(),
        }),
        Content::Location(Location {
            latitude: 1.5,
            longitude: -2.5,
            title: "t".into(),
            address: "a".into(),
        }),
        Content::Card(Card {
            kind: "user".into(),
            id: LONG_UID.into(),
            name: "n".into(),
            avatar_url: "a".into(),
        }),
        Content::Notice(Notice {
            title: "t".into(),
            text: "x".into(),
        }),
        Content::Forward(Forward {
            title: "t".into(),
            items: vec![ForwardItem {
                mid: BIG,
                sender: LONG_UID.into(),
                time_ms: BIG_SIGNED,
                summary: "s".into(),
            }],
        }),
        Content::Custom(Custom {
            kind: "k".into(),
            data: vec![0, 1, 2, 250, 255],
        }),
        Content::Revoke(Revoke { mid: BIG }),
        Content::Edit(Edit {
            mid: BIG,
            text: Some(Text {
                text: "fixed".into(),
                mentions: vec![LONG_UID.into()],
            }),
        }),
        Content::GroupEvent(GroupEvent {
            kind: "muted".into(),
            actor: LONG_UID.into(),
            targets: vec![LONG_UID.into()],
            value: String::new(),
            until_ms: MUTED_FOREVER,
        }),
    ]
}

fn view(body: Option<Content>) -> MessageView {
    MessageView {
        mid: BIG.to_string(),
        conversation: "p:u1:u2".into(),
        conv_seq: BIG,
        user_seq: Some(BIG),
        sender: uid(),
        sender_device: "phone".into(),
        receiver: Some(uid()),
        group: Some(BIG),
        client_seq: BIG,
        time_ms: BIG_SIGNED,
        msg_type: body.as_ref().map(Content::message_type),
        body,
        edited_ms: Some(BIG_SIGNED),
        revoked_ms: Some(BIG_SIGNED),
    }
}

fn member(muted: Option<i64>) -> MemberView {
    MemberView {
        uid: uid(),
        role: Role::Admin,
        nickname: "n".into(),
        joined_ms: BIG_SIGNED,
        join_seq: BIG,
        muted_until_ms: muted,
    }
}

#[test]
fn every_json_body_is_documented_as_the_types_write_it() {
    let doc = document();
    let mut checked = Vec::new();

    // Message bodies: one key, the type's name; every field always written.
    let names: BTreeMap<&str, &str> = [
        ("text", "Text"),
        ("image", "Image"),
        ("audio", "Audio"),
        ("video", "Video"),
        ("file", "File"),
        ("location", "Location"),
        ("card", "Card"),
        ("notice", "Notice"),
        ("forward", "Forward"),
        ("custom", "Custom"),
        ("group_event", "GroupEvent"),
        ("revoke", "Revoke"),
        ("edit", "Edit"),
    ]
    .into();
    for content in contents() {
        let value = json(&content);
        valid(&doc, "MessageBody", &value);
        let (key, inner) = value
            .as_object()
            .expect("object")
            .iter()
            .next()
            .expect("one key");
        let name = names[key.as_str()];
        response(&doc, &mut checked, name, inner.clone(), inner.clone());
        if let Content::Forward(forward) = &content {
            let item = json(&forward.items[0]);
            response(&doc, &mut checked, "ForwardItem", item.clone(), item);
        }
    }
    assert_eq!(checked.len(), MessageType::ALL.len() + 1, "a body per type");
    checked.push("MessageBody".into());

    let full = view(contents().pop());
    let mut minimal = view(None);
    minimal.user_seq = None;
    minimal.group = None;
    minimal.receiver = None;
    minimal.edited_ms = None;
    minimal.revoked_ms = None;
    response(&doc, &mut checked, "Message", json(&full), json(&minimal));
    response(
        &doc,
        &mut checked,
        "HistoryPage",
        json(HistoryPage {
            messages: vec![full.clone(), minimal.clone()],
            next_before: Some(BIG.to_string()),
        }),
        json(HistoryPage {
            messages: vec![],
            next_before: None,
        }),
    );
    let page = json(SyncPage {
        messages: vec![full.clone()],
        has_more: true,
        cursor: BIG,
    });
    response(&doc, &mut checked, "SyncPage", page.clone(), page);
    let mut muted = ErrorBody::new(natter_proto::ErrorCode::Muted, "muted");
    muted.until_ms = Some(MUTED_FOREVER);
    response(
        &doc,
        &mut checked,
        "Error",
        json(&muted),
        json(ErrorBody::new(natter_proto::ErrorCode::Forbidden, "no")),
    );
    let group = json(GroupView {
        id: BIG,
        name: "n".into(),
        avatar: "a".into(),
        owner: uid(),
        join_type: JoinType::Open,
        mute_all: false,
        member_count: 3,
        created_ms: BIG_SIGNED,
        dissolved: false,
        last_seq: BIG,
        role: Role::Owner,
        read_seq: BIG,
        unread: BIG,
    });
    response(&doc, &mut checked, "Group", group.clone(), group);
    response(
        &doc,
        &mut checked,
        "Member",
        json(member(Some(BIG_SIGNED))),
        json(member(None)),
    );
    response(
        &doc,
        &mut checked,
        "MemberPage",
        json(MemberPage {
            members: vec![member(None)],
            next_after: Some(uid()),
        }),
        json(MemberPage {
            members: vec![],
            next_after: None,
        }),
    );
    let application = json(ApplicationView {
        uid: uid(),
        message: "m".into(),
        time_ms: BIG_SIGNED,
    });
    response(
        &doc,
        &mut checked,
        "Application",
        application.clone(),
        application,
    );
    let outcome = json(JoinOutcome { joined: true });
    response(&doc, &mut checked, "JoinOutcome", outcome.clone(), outcome);
    let state = json(ReadState {
        read_seq: BIG,
        unread: BIG,
    });
    response(&doc, &mut checked, "ReadState", state.clone(), state);
    let conversation = |last: Option<MessageView>, peer: bool| ConversationView {
        conversation: "p:u1:u2".into(),
        peer: peer.then(uid),
        group: (!peer).then_some(BIG),
        last_message: last,
        last_seq: BIG,
        read_seq: BIG,
        unread: BIG,
        peer_read_seq: peer.then_some(BIG),
        pinned: true,
        push: PushMode::Mentions,
    };
    let mut full_entry = json(conversation(Some(full.clone()), true));
    // Both of peer and group are documented; an entry has one of them.
    full_entry["group"] = serde_json::json!(BIG.to_string());
    response(
        &doc,
        &mut checked,
        "ConversationView",
        full_entry,
        json(conversation(None, false))
            .as_object()
            .map(|o| {
                let mut o = o.clone();
                o.remove("group");
                Value::Object(o)
            })
            .expect("an object"),
    );
    response(
        &doc,
        &mut checked,
        "ConversationPage",
        json(ConversationPage {
            conversations: vec![conversation(Some(full.clone()), true)],
            next: Some("0.1.p:u1:u2".into()),
        }),
        json(ConversationPage {
            conversations: vec![],
            next: None,
        }),
    );
    let settings = json(SettingsView {
        pinned: false,
        push: PushMode::None,
    });
    response(
        &doc,
        &mut checked,
        "SettingsView",
        settings.clone(),
        settings,
    );
    let reader = ReaderView {
        uid: uid(),
        read_seq: BIG,
    };
    response(
        &doc,
        &mut checked,
        "ReaderView",
        json(&reader),
        json(&reader),
    );
    let receipts = |readers: Option<Vec<ReaderView>>| ReceiptsView {
        conversation: "g:1".into(),
        mid: BIG.to_string(),
        conv_seq: BIG,
        read_count: BIG,
        readers,
    };
    response(
        &doc,
        &mut checked,
        "ReceiptsView",
        json(receipts(Some(vec![reader.clone()]))),
        json(receipts(None)),
    );
    request!(
        &doc,
        checked,
        "SettingsUpdate",
        SettingsUpdate,
        SettingsUpdate {
            pinned: Some(true),
            push: Some(PushMode::All),
        }
    );

    request!(
        &doc,
        checked,
        "CreateGroup",
        CreateGroup,
        CreateGroup {
            name: "n".into(),
            avatar: "a".into(),
            join_type: JoinType::InviteOnly,
            members: vec![uid()],
        }
    );
    request!(
        &doc,
        checked,
        "UpdateGroup",
        UpdateGroup,
        UpdateGroup {
            name: Some("n".into()),
            avatar: Some("a".into()),
            join_type: Some(JoinType::Open),
            mute_all: Some(true),
        }
    );
    request!(&doc, checked, "Users", Users, Users { users: vec![uid()] });
    request!(
        &doc,
        checked,
        "JoinRequest",
        JoinRequest,
        JoinRequest {
            message: "m".into()
        }
    );
    request!(
        &doc,
        checked,
        "Decision",
        Decision,
        Decision { approve: true }
    );
    request!(
        &doc,
        checked,
        "SetRole",
        SetRole,
        SetRole { role: Role::Admin }
    );
    request!(&doc, checked, "Transfer", Transfer, Transfer { to: uid() });
    request!(&doc, checked, "Mute", Mute, Mute { duration_secs: -1 });
    request!(
        &doc,
        checked,
        "Nickname",
        Nickname,
        Nickname {
            nickname: "n".into()
        }
    );
    request!(&doc, checked, "MarkRead", MarkRead, MarkRead { seq: BIG });

    // The admin API's bodies.
    let uid = |s: &str| natter_proto::UserId::parse(s).expect("a user id");
    request!(
        &doc,
        checked,
        "AdminTokenRequest",
        AdminTokenRequest,
        AdminTokenRequest {
            uid: uid("alice"),
            device: "phone".into(),
            ttl_secs: Some(BIG),
        }
    );
    let token = json(AdminToken {
        token: "t".into(),
        expires_at: BIG_SIGNED,
    });
    response(&doc, &mut checked, "AdminToken", token.clone(), token);
    request!(
        &doc,
        checked,
        "AdminMessage",
        AdminMessage,
        AdminMessage {
            from: Some(uid("alice")),
            to: Some(uid("bob")),
            group: Some(BIG),
            body: Content::Text(Text {
                text: "hi".into(),
                mentions: vec![],
            }),
            client_seq: Some(BIG),
        }
    );
    // `from` null is the system sender, and is documented so.
    valid(
        &doc,
        "AdminMessage",
        &serde_json::json!({"from": null, "to": "bob", "body": {"text": {"text": "hi", "mentions": []}}}),
    );
    let sent = json(AdminSent {
        mid: BIG,
        conversation: "p:alice:bob".into(),
        conv_seq: BIG,
    });
    response(&doc, &mut checked, "AdminSent", sent.clone(), sent);
    let closed = json(LoggedOut { closed: 2 });
    response(&doc, &mut checked, "LoggedOut", closed.clone(), closed);
    request!(
        &doc,
        checked,
        "AdminCreateGroup",
        AdminCreateGroup,
        AdminCreateGroup {
            owner: uid("alice"),
            group: CreateGroup {
                name: "n".into(),
                avatar: "a".into(),
                join_type: JoinType::InviteOnly,
                members: vec![uid("bob")],
            },
        }
    );

    // Every object schema was checked against its type.
    let objects: Vec<String> = doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .iter()
        .filter(|(_, s)| s["type"] == "object")
        .map(|(name, _)| name.clone())
        .collect();
    let unchecked: Vec<&String> = objects.iter().filter(|n| !checked.contains(n)).collect();
    assert!(
        unchecked.is_empty(),
        "schemas without a check: {unchecked:?}"
    );
}
