-- Conversations (protocol version 2): the list, read cursors, revoke and edit.

-- The newest message of each conversation: the list's activity order.
ALTER TABLE conversation ADD COLUMN last_mid INTEGER NOT NULL DEFAULT 0;

-- A message's state after revoke and edit: when it was last edited, and
-- when it was revoked (its content is then gone: an empty blob).
ALTER TABLE message ADD COLUMN edited_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message ADD COLUMN revoked_at INTEGER NOT NULL DEFAULT 0;

-- One row per user per conversation: the user's read cursor and settings.
-- `peer` is the other user of a one-to-one conversation (its `users.id`),
-- 0 for a group. A message writes its sender's row (the read cursor moves
-- on send) and creates the receiver's once; the newest message of a
-- conversation is the `conversation` row's, so a message moves no other
-- row here. The list reads the user's rows by the primary key's prefix,
-- joins `conversation`, and orders them there (the single writer's time
-- is the scarce resource: an index kept in list order would cost every
-- message two more rows and four index changes).
-- `push`: 0 all, 1 mentions, 2 none.
CREATE TABLE chat (
    owner    INTEGER NOT NULL,
    conv_id  TEXT    NOT NULL,
    peer     INTEGER NOT NULL,
    read_seq INTEGER NOT NULL DEFAULT 0,
    pinned   INTEGER NOT NULL DEFAULT 0,
    push     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, conv_id)
) WITHOUT ROWID;
-- A group's read cursors, for its read counts and receipts.
CREATE INDEX chat_readers ON chat (conv_id, read_seq) WHERE peer = 0;

-- Positions of a conversation that hold no new message (group events,
-- revokes, edits): unread counts leave them out, with an index range count
-- after the read cursor instead of a scan of messages. `target` is the
-- message a revoke or an edit applies to (0 for group events).
CREATE TABLE conv_marker (
    conv_id  TEXT    NOT NULL,
    conv_seq INTEGER NOT NULL,
    target   INTEGER NOT NULL,
    PRIMARY KEY (conv_id, conv_seq)
) WITHOUT ROWID;
CREATE INDEX conv_marker_target ON conv_marker (target) WHERE target != 0;

-- Existing conversations: the newest mid of each, and one row per
-- one-to-one party (groups get theirs when a member reads, sends or
-- changes a setting; until then the join point is the cursor).
UPDATE conversation SET last_mid = coalesce(
    (SELECT m.mid FROM message m WHERE m.conv_id = conversation.conv_id
     ORDER BY m.conv_seq DESC LIMIT 1), 0);
INSERT OR IGNORE INTO chat (owner, conv_id, peer, read_seq)
SELECT r.owner, m.conv_id, r.other, 0
FROM relation r JOIN message m ON m.mid = r.mid
GROUP BY r.owner, m.conv_id;
-- What a user sent counts as read.
UPDATE chat SET read_seq = coalesce(
    (SELECT max(m.conv_seq) FROM message m
     WHERE m.conv_id = chat.conv_id AND m.sender = chat.owner), 0)
WHERE peer != 0;
-- Group events take positions that are no new messages.
INSERT OR IGNORE INTO conv_marker (conv_id, conv_seq, target)
SELECT conv_id, conv_seq, 0 FROM message WHERE msg_type = 11;
