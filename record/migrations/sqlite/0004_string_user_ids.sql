-- User ids are strings (protocol version 2): the operator's own account ids,
-- 1-64 bytes of A-Z a-z 0-9 _ - . @, compared byte for byte (SQLite's
-- default BINARY collation). Every user column becomes TEXT. The tables are
-- rebuilt, not altered: with INTEGER affinity SQLite would store an id such
-- as '123' as the number 123. Existing integer ids become their decimal
-- strings, and one-to-one conversation ids are put in the new canonical
-- order (the byte-wise smaller id first: 'p:2:10' becomes 'p:10:2').
-- Group messages keep their group in conv_id; their receiver is now empty.

CREATE TABLE message_v2 (
    mid           INTEGER PRIMARY KEY,
    conv_id       TEXT    NOT NULL,
    conv_seq      INTEGER NOT NULL,
    sender        TEXT    NOT NULL,
    sender_device TEXT    NOT NULL,
    client_seq    INTEGER NOT NULL,
    receiver      TEXT    NOT NULL, -- '' for a group message
    msg_type      INTEGER NOT NULL,
    content       BLOB    NOT NULL,
    created_at    INTEGER NOT NULL
);
INSERT INTO message_v2
SELECT mid,
       CASE WHEN substr(conv_id, 1, 2) = 'p:'
            THEN 'p:' || min(CAST(sender AS TEXT), CAST(receiver AS TEXT))
                 || ':' || max(CAST(sender AS TEXT), CAST(receiver AS TEXT))
            ELSE conv_id END,
       conv_seq,
       CAST(sender AS TEXT),
       sender_device,
       client_seq,
       CASE WHEN substr(conv_id, 1, 2) = 'g:' THEN '' ELSE CAST(receiver AS TEXT) END,
       msg_type,
       content,
       created_at
FROM message;
DROP TABLE message;
ALTER TABLE message_v2 RENAME TO message;
CREATE UNIQUE INDEX message_dedupe ON message (sender, sender_device, client_seq);
CREATE UNIQUE INDEX message_conv_seq ON message (conv_id, conv_seq);

CREATE TABLE relation_v2 (
    owner      TEXT    NOT NULL,
    user_seq   INTEGER NOT NULL,
    mid        INTEGER NOT NULL,
    other      TEXT    NOT NULL,
    direction  INTEGER NOT NULL, -- 1 outbox, 2 inbox
    received   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, user_seq)
) WITHOUT ROWID;
INSERT INTO relation_v2
SELECT CAST(owner AS TEXT), user_seq, mid, CAST(other AS TEXT), direction, received, created_at
FROM relation;
DROP TABLE relation;
ALTER TABLE relation_v2 RENAME TO relation;
CREATE INDEX relation_history ON relation (owner, other, mid);

-- 'p:{a}:{b}' in the new order. No new id can meet an old one: old ids put
-- the numerically smaller first, a swapped one the numerically larger.
UPDATE conversation
SET conv_id = 'p:'
    || min(substr(conv_id, 3, instr(substr(conv_id, 3), ':') - 1),
           substr(conv_id, 3 + instr(substr(conv_id, 3), ':')))
    || ':'
    || max(substr(conv_id, 3, instr(substr(conv_id, 3), ':') - 1),
           substr(conv_id, 3 + instr(substr(conv_id, 3), ':')))
WHERE substr(conv_id, 1, 2) = 'p:';

CREATE TABLE user_sequence_v2 (
    owner    TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO user_sequence_v2 SELECT CAST(owner AS TEXT), last_seq FROM user_sequence;
DROP TABLE user_sequence;
ALTER TABLE user_sequence_v2 RENAME TO user_sequence;

CREATE TABLE device_v2 (
    owner      TEXT    NOT NULL,
    device     TEXT    NOT NULL,
    cursor     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, device)
) WITHOUT ROWID;
INSERT INTO device_v2 SELECT CAST(owner AS TEXT), device, cursor, updated_at FROM device;
DROP TABLE device;
ALTER TABLE device_v2 RENAME TO device;

CREATE TABLE group_cursor_v2 (
    owner      TEXT    NOT NULL,
    device     TEXT    NOT NULL,
    gid        INTEGER NOT NULL,
    cursor     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, device, gid)
) WITHOUT ROWID;
INSERT INTO group_cursor_v2 SELECT CAST(owner AS TEXT), device, gid, cursor, updated_at FROM group_cursor;
DROP TABLE group_cursor;
ALTER TABLE group_cursor_v2 RENAME TO group_cursor;
