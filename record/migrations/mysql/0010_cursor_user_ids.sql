-- User ids are strings (see migration 4).
ALTER TABLE device_cursor
    MODIFY owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
