-- User ids are strings (see migration 4).
ALTER TABLE user_sequence
    MODIFY owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
