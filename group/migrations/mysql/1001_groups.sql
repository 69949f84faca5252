-- Groups. Ids come from the auto-increment key and are never reused.
CREATE TABLE grp (
    gid        BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name       VARCHAR(256) NOT NULL,
    avatar     TEXT         NOT NULL,
    owner      BIGINT       NOT NULL,
    join_type  VARCHAR(16)  NOT NULL,
    mute_all   TINYINT      NOT NULL DEFAULT 0,
    dissolved  TINYINT      NOT NULL DEFAULT 0,
    created_at BIGINT       NOT NULL,
    version    BIGINT       NOT NULL DEFAULT 0  -- bumped by every change
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Members, one row each; leaving or being kicked deletes the row.
CREATE TABLE member (
    gid         BIGINT       NOT NULL,
    uid         BIGINT       NOT NULL,
    role        VARCHAR(16)  NOT NULL,
    nickname    VARCHAR(256) NOT NULL DEFAULT '',
    joined_at   BIGINT       NOT NULL,
    join_seq    BIGINT       NOT NULL,
    muted_until BIGINT       NOT NULL DEFAULT 0,
    read_seq    BIGINT       NOT NULL DEFAULT 0,
    PRIMARY KEY (gid, uid),
    KEY member_by_user (uid, gid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;

-- Pending applications to join groups that need approval.
CREATE TABLE application (
    gid        BIGINT NOT NULL,
    uid        BIGINT NOT NULL,
    message    TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (gid, uid)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_general_ci;
