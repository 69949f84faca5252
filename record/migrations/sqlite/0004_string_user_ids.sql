-- User ids are strings (protocol version 2): the operator's own account ids,
-- 1-64 bytes of A-Z a-z 0-9 _ - . @, compared byte for byte (SQLite's
-- default BINARY collation). The hot tables keep an internal integer per
-- user instead of the string, behind `users`: a string id costs every
-- relation row and index entry its bytes twice over, and the single writer
-- pays for that in throughput. Only this table knows the strings; reads
-- join it to turn ids back into them.
CREATE TABLE users (
    id  INTEGER PRIMARY KEY,
    uid TEXT    NOT NULL UNIQUE
);

-- A version 1 database held integer ids: user N becomes (N, 'N'), so every
-- integer column keeps its value. New users are numbered after the largest.
-- A group message's receiver was its group, not a user: it is read from
-- `message` only for one-to-one conversations.
INSERT OR IGNORE INTO users (id, uid)
SELECT x, CAST(x AS TEXT) FROM (
    SELECT sender AS x FROM message
    UNION SELECT receiver FROM message WHERE substr(conv_id, 1, 2) = 'p:'
    UNION SELECT owner FROM relation
    UNION SELECT other FROM relation
    UNION SELECT owner FROM user_sequence
    UNION SELECT owner FROM device
    UNION SELECT owner FROM group_cursor
);

-- One-to-one conversation ids are put in the new canonical order (the
-- byte-wise smaller id first: 'p:2:10' becomes 'p:10:2'). No new id can meet
-- an old one: old ids put the numerically smaller first, a swapped one the
-- numerically larger.
UPDATE message
SET conv_id = 'p:' || min(CAST(sender AS TEXT), CAST(receiver AS TEXT))
              || ':' || max(CAST(sender AS TEXT), CAST(receiver AS TEXT))
WHERE substr(conv_id, 1, 2) = 'p:';
-- Group messages keep their group in conv_id; their receiver is 0, which
-- no user is (user ids start at 1), so it joins to no `users` row.
UPDATE message SET receiver = 0 WHERE substr(conv_id, 1, 2) = 'g:';

UPDATE conversation
SET conv_id = 'p:'
    || min(substr(conv_id, 3, instr(substr(conv_id, 3), ':') - 1),
           substr(conv_id, 3 + instr(substr(conv_id, 3), ':')))
    || ':'
    || max(substr(conv_id, 3, instr(substr(conv_id, 3), ':') - 1),
           substr(conv_id, 3 + instr(substr(conv_id, 3), ':')))
WHERE substr(conv_id, 1, 2) = 'p:';
