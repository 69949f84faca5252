-- User ids are strings, exactly as the operator's account system gives them,
-- compared byte for byte (TEXT's BINARY collation). A column declared
-- INTEGER would turn the text '123' back into the number 123, so each table
-- holding a user id is rebuilt with TEXT columns; existing numeric ids become
-- their decimal strings. One migration, one transaction: all or nothing.

-- Groups. The copy keeps every gid, and the autoincrement counter is carried
-- over, so ids are still never reused.
CREATE TABLE grp_new (
    gid        INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    avatar     TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    join_type  TEXT    NOT NULL,   -- open | approval | invite_only
    mute_all   INTEGER NOT NULL DEFAULT 0,
    dissolved  INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    version    INTEGER NOT NULL DEFAULT 0  -- bumped by every change
);
INSERT INTO grp_new (gid, name, avatar, owner, join_type, mute_all, dissolved, created_at, version)
    SELECT gid, name, avatar, CAST(owner AS TEXT), join_type, mute_all, dissolved, created_at, version
    FROM grp;
DELETE FROM sqlite_sequence WHERE name = 'grp_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'grp_new', seq FROM sqlite_sequence WHERE name = 'grp';
DROP TABLE grp;
ALTER TABLE grp_new RENAME TO grp;

-- Members, one row each; leaving or being kicked deletes the row.
CREATE TABLE member_new (
    gid         INTEGER NOT NULL,
    uid         TEXT    NOT NULL,
    role        TEXT    NOT NULL,  -- owner | admin | member
    nickname    TEXT    NOT NULL DEFAULT '',
    joined_at   INTEGER NOT NULL,
    join_seq    INTEGER NOT NULL,  -- first conv_seq of the group the member may read
    muted_until INTEGER NOT NULL DEFAULT 0, -- Unix ms; 0 not muted
    read_seq    INTEGER NOT NULL DEFAULT 0, -- highest conv_seq read
    PRIMARY KEY (gid, uid)
) WITHOUT ROWID;
INSERT INTO member_new (gid, uid, role, nickname, joined_at, join_seq, muted_until, read_seq)
    SELECT gid, CAST(uid AS TEXT), role, nickname, joined_at, join_seq, muted_until, read_seq
    FROM member;
DROP TABLE member;
ALTER TABLE member_new RENAME TO member;
-- "My groups".
CREATE INDEX member_by_user ON member (uid, gid);

-- Pending applications to join groups that need approval.
CREATE TABLE application_new (
    gid        INTEGER NOT NULL,
    uid        TEXT    NOT NULL,
    message    TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (gid, uid)
) WITHOUT ROWID;
INSERT INTO application_new (gid, uid, message, created_at)
    SELECT gid, CAST(uid AS TEXT), message, created_at
    FROM application;
DROP TABLE application;
ALTER TABLE application_new RENAME TO application;
