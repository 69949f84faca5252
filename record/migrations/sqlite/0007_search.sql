-- Message search. One row per message with searchable text: its
-- conversation, position and time (for the user's scope and the time
-- range) and its text in lower case. `search_fts` indexes the text by
-- trigrams (any script, no word breaks needed); it reads its content from
-- `search_text`, kept in step by the triggers below.
CREATE TABLE search_text (
    mid        INTEGER PRIMARY KEY,
    conv_id    TEXT    NOT NULL,
    conv_seq   INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    body       TEXT    NOT NULL
);
-- Short queries scan one user's conversations through this.
CREATE INDEX search_text_conv ON search_text (conv_id, mid);

CREATE VIRTUAL TABLE search_fts USING fts5 (
    body,
    content = 'search_text',
    content_rowid = 'mid',
    tokenize = 'trigram'
);

CREATE TRIGGER search_text_insert AFTER INSERT ON search_text BEGIN
    INSERT INTO search_fts (rowid, body) VALUES (new.mid, new.body);
END;
CREATE TRIGGER search_text_delete AFTER DELETE ON search_text BEGIN
    INSERT INTO search_fts (search_fts, rowid, body) VALUES ('delete', old.mid, old.body);
END;
CREATE TRIGGER search_text_update AFTER UPDATE OF body ON search_text BEGIN
    INSERT INTO search_fts (search_fts, rowid, body) VALUES ('delete', old.mid, old.body);
    INSERT INTO search_fts (rowid, body) VALUES (new.mid, new.body);
END;

-- Messages stored but not indexed yet: a batch queues its mids in its own
-- transaction and the store's indexer turns them into rows behind it.
CREATE TABLE search_queue (
    mid INTEGER PRIMARY KEY
);

-- Messages stored before search existed are indexed in the background.
INSERT INTO search_queue (mid) SELECT mid FROM message WHERE revoked_at = 0;
