-- Group messages live in `message` once per group (conv_id 'g:{group}',
-- receiver = the group, numbered by conv_seq); they have no relation rows.
-- Each member device's received cursor per group:
CREATE TABLE group_cursor (
    owner      INTEGER NOT NULL,
    device     TEXT    NOT NULL,
    gid        INTEGER NOT NULL,
    cursor     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (owner, device, gid)
) WITHOUT ROWID;
