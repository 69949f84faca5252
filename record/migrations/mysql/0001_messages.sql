-- Content table: one row per message, keyed by its time-ordered id. Group
-- messages are stored once, with conv_id 'g:{group}' and receiver = the group.
CREATE TABLE message (
    mid           BIGINT       NOT NULL PRIMARY KEY,
    conv_id       VARCHAR(64)  NOT NULL,
    conv_seq      BIGINT       NOT NULL,
    sender        BIGINT       NOT NULL,
    sender_device VARCHAR(128) NOT NULL,
    client_seq    BIGINT       NOT NULL,
    receiver      BIGINT       NOT NULL,
    msg_type      INT          NOT NULL,
    content       MEDIUMBLOB   NOT NULL,
    created_at    BIGINT       NOT NULL,
    -- A resend of the same client seq from the same device is the same message.
    UNIQUE KEY message_dedupe (sender, sender_device, client_seq),
    UNIQUE KEY message_conv_seq (conv_id, conv_seq)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Relation table: one row per one-to-one message per user who holds it,
-- numbered contiguously per user (user_seq) for device sync.
CREATE TABLE relation (
    owner      BIGINT  NOT NULL,
    user_seq   BIGINT  NOT NULL,
    mid        BIGINT  NOT NULL,
    other      BIGINT  NOT NULL,
    direction  TINYINT NOT NULL, -- 1 outbox, 2 inbox
    received   TINYINT NOT NULL DEFAULT 0,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (owner, user_seq),
    KEY relation_history (owner, other, mid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Last sequence numbers handed out. Writers lock the rows they advance
-- (SELECT ... FOR UPDATE), so any number of logic nodes share them.
CREATE TABLE conversation (
    conv_id  VARCHAR(64) NOT NULL PRIMARY KEY,
    last_seq BIGINT      NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
CREATE TABLE user_sequence (
    owner    BIGINT NOT NULL PRIMARY KEY,
    last_seq BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Each device's cursor per stream (gid 0: its user's stream; else a group):
-- everything up to cursor_seq is held; `above` lists positions acknowledged
-- past a gap, so acks handled by different nodes still close the gap.
CREATE TABLE device_cursor (
    owner      BIGINT       NOT NULL,
    device     VARCHAR(128) NOT NULL,
    gid        BIGINT       NOT NULL,
    cursor_seq BIGINT       NOT NULL,
    above      TEXT         NOT NULL,
    updated_at BIGINT       NOT NULL,
    PRIMARY KEY (owner, device, gid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
