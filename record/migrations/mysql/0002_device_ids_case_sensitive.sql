-- Device ids are case-sensitive strings (as on every other store): compare
-- them byte for byte, so that "phone" and "Phone" are two devices with their
-- own client seqs and cursors.
ALTER TABLE message
    MODIFY sender_device VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE device_cursor
    MODIFY device VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
