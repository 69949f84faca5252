-- Message search. One row per message with searchable text: its
-- conversation, position and time (for the user's scope and the time
-- range), its text in lower case (`body`, compared byte for byte), and the
-- text's character bigrams as words (`grams`, written by the store: MariaDB
-- has no ngram parser) under a FULLTEXT index. Messages stored before
-- search existed are not indexed.
CREATE TABLE search_text (
    mid        BIGINT       NOT NULL PRIMARY KEY,
    conv_id    VARCHAR(140) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    conv_seq   BIGINT       NOT NULL,
    created_at BIGINT       NOT NULL,
    body       MEDIUMTEXT   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    grams      MEDIUMTEXT   CHARACTER SET ascii COLLATE ascii_general_ci NOT NULL,
    KEY search_text_conv (conv_id, mid),
    FULLTEXT KEY search_text_grams (grams)
) ENGINE = InnoDB;
