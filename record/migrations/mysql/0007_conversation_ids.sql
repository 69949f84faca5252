-- Conversation ids hold two user ids of up to 64 bytes (see migration 4).
ALTER TABLE conversation
    MODIFY conv_id VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
