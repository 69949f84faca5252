-- User ids are strings (protocol version 2): 1-64 bytes of A-Z a-z 0-9
-- _ - . @, compared byte for byte. ascii_bin compares bytes (so 'Alice' and
-- 'alice' are two users) and keeps indexes at one byte per character.
-- Existing integer ids become their decimal strings. Conversation ids hold
-- two user ids ('p:{a}:{b}'). One statement a migration (see migration 2).
ALTER TABLE message
    MODIFY conv_id  VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    MODIFY sender   VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    MODIFY receiver VARCHAR(64)  CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
