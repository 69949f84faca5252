-- When each user was last logged out everywhere by the operator (Unix ms):
-- natter refuses the user's tokens issued before it. One row per user who
-- was ever logged out; a later logout overwrites it.
CREATE TABLE user_logout (
    uid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,
    at  BIGINT NOT NULL
) ENGINE = InnoDB;
