-- User ids are strings (see migration 4).
ALTER TABLE relation
    MODIFY owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    MODIFY other VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
