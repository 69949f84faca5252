-- Device ids are case-sensitive strings (as on every other store): compare
-- them byte for byte, so that "phone" and "Phone" are two devices with their
-- own client seqs. One statement a migration: a failed ALTER leaves nothing
-- half-done. (Rebuilds the table: on a large database, plan for it.)
ALTER TABLE message
    MODIFY sender_device VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
