-- One row the readiness probe rewrites after a failed commit, to learn
-- whether the store can write again (e.g. once a full disk has room).
CREATE TABLE health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
