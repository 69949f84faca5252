-- Content table: one row per message, keyed by its time-ordered id.
CREATE TABLE message (
    mid           INTEGER PRIMARY KEY,
    conv_id       TEXT    NOT NULL,
    conv_seq      INTEGER NOT NULL,
    sender        INTEGER NOT NULL,
    sender_device TEXT    NOT NULL,
    client_seq    INTEGER NOT NULL,
    receiver      INTEGER NOT NULL,
    msg_type      INTEGER NOT NULL,
    content       BLOB    NOT NULL,
    created_at    INTEGER NOT NULL
);
-- A resend of the same client seq from the same device is the same message.
CREATE UNIQUE INDEX message_dedupe ON message (sender, sender_device, client_seq);
CREATE UNIQUE INDEX message_conv_seq ON message (conv_id, conv_seq);

-- Relation table: one row per message per user who holds it (outbox or inbox),
-- numbered contiguously per user (user_seq) for device sync.
CREATE TABLE relation (
    owner      INTEGER NOT NULL,
    user_seq   INTEGER NOT NULL,
    mid        INTEGER NOT NULL,
    other      INTEGER NOT NULL,
    direction  INTEGER NOT NULL, -- 1 outbox, 2 inbox
    received   INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (owner, user_seq)
) WITHOUT ROWID;
-- Conversation history before a mid (and a message's row by owner, other, mid).
CREATE INDEX relation_history ON relation (owner, other, mid);
-- What a device has not received yet is the primary key's range
-- (owner, user_seq > the device's cursor); `received` records push-acks
-- without an index of its own, so acks cost no index churn.

-- Last sequence numbers handed out, per conversation and per user.
CREATE TABLE conversation (
    conv_id  TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE user_sequence (
    owner    INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL
);

-- Each device's sync cursor: the highest user_seq it has acknowledged.
CREATE TABLE device (
    owner      INTEGER NOT NULL,
    device     TEXT    NOT NULL,
    cursor     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, device)
) WITHOUT ROWID;
