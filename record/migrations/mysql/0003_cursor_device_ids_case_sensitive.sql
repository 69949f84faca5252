-- Each device its own cursors, byte for byte (see migration 2).
ALTER TABLE device_cursor
    MODIFY device VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
