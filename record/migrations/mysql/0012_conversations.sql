-- Conversations (protocol version 2): the list, read cursors, revoke and edit.

-- The newest message of each conversation: the list's activity order.
ALTER TABLE conversation ADD COLUMN last_mid BIGINT NOT NULL DEFAULT 0;

-- A message's state after revoke and edit: when it was last edited, and
-- when it was revoked (its content is then gone: an empty blob).
ALTER TABLE message
    ADD COLUMN edited_at  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN revoked_at BIGINT NOT NULL DEFAULT 0;

-- One row per user per conversation: the user's read cursor and settings.
-- `peer` is the other user of a one-to-one conversation, '' for a group.
-- One-to-one rows also carry the conversation's newest mid, moved by every
-- message, so the list pages them through `chat_recent` (groups are few per
-- user; their newest mid is the conversation's). MySQL has no partial
-- indexes: both indexes hold every row, and the queries filter by peer
-- (group rows keep last_mid 0, so they sit at the end of a user's range).
-- `push`: 0 all, 1 mentions, 2 none.
CREATE TABLE chat (
    owner    VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    conv_id  VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    peer     VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    read_seq BIGINT  NOT NULL DEFAULT 0,
    last_mid BIGINT  NOT NULL DEFAULT 0,
    pinned   TINYINT NOT NULL DEFAULT 0,
    push     TINYINT NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, conv_id),
    KEY chat_recent (owner, pinned, last_mid, conv_id),
    -- A group's read cursors, for its read counts and receipts.
    KEY chat_readers (conv_id, read_seq)
) ENGINE = InnoDB;

-- Positions of a conversation that hold no new message (group events,
-- revokes, edits): unread counts leave them out, with an index range count
-- after the read cursor instead of a scan of messages. `target` is the
-- message a revoke or an edit applies to (0 for group events).
CREATE TABLE conv_marker (
    conv_id  VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    conv_seq BIGINT NOT NULL,
    target   BIGINT NOT NULL,
    PRIMARY KEY (conv_id, conv_seq),
    KEY conv_marker_target (target)
) ENGINE = InnoDB;

-- Existing conversations: the newest mid of each, and one row per
-- one-to-one party (groups get theirs when a member reads, sends or
-- changes a setting; until then the join point is the cursor).
UPDATE conversation c SET c.last_mid = COALESCE(
    (SELECT m.mid FROM message m WHERE m.conv_id = c.conv_id
     ORDER BY m.conv_seq DESC LIMIT 1), 0);
INSERT IGNORE INTO chat (owner, conv_id, peer, read_seq, last_mid)
SELECT r.owner, m.conv_id, MAX(r.other), 0, MAX(r.mid)
FROM relation r JOIN message m ON m.mid = r.mid
GROUP BY r.owner, m.conv_id;
-- What a user sent counts as read.
UPDATE chat h SET h.read_seq = COALESCE(
    (SELECT MAX(m.conv_seq) FROM message m
     WHERE m.conv_id = h.conv_id AND m.sender = h.owner), 0)
WHERE h.peer != '';
-- Group events take positions that are no new messages.
INSERT IGNORE INTO conv_marker (conv_id, conv_seq, target)
SELECT conv_id, conv_seq, 0 FROM message WHERE msg_type = 11;
