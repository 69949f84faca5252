-- Groups. Ids come from the autoincrement key and are never reused.
CREATE TABLE grp (
    gid        INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    avatar     TEXT    NOT NULL,
    owner      INTEGER NOT NULL,
    join_type  TEXT    NOT NULL,   -- open | approval | invite_only
    mute_all   INTEGER NOT NULL DEFAULT 0,
    dissolved  INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);

-- Members, one row each; leaving or being kicked deletes the row.
CREATE TABLE member (
    gid         INTEGER NOT NULL,
    uid         INTEGER NOT NULL,
    role        TEXT    NOT NULL,  -- owner | admin | member
    nickname    TEXT    NOT NULL DEFAULT '',
    joined_at   INTEGER NOT NULL,
    join_seq    INTEGER NOT NULL,  -- first conv_seq of the group the member may read
    muted_until INTEGER NOT NULL DEFAULT 0, -- Unix ms; 0 not muted
    PRIMARY KEY (gid, uid)
) WITHOUT ROWID;
-- "My groups".
CREATE INDEX member_by_user ON member (uid, gid);

-- Pending applications to join groups that need approval.
CREATE TABLE application (
    gid        INTEGER NOT NULL,
    uid        INTEGER NOT NULL,
    message    TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (gid, uid)
) WITHOUT ROWID;
