-- User ids are strings, exactly as the operator's account system gives them
-- (1-64 bytes of A-Z a-z 0-9 _ - . @). ascii_bin compares them byte for
-- byte, so ids that differ only in case are two users, and one byte a
-- character keeps the keys small. Existing numeric ids become their decimal
-- strings. One statement a migration: a failed ALTER leaves nothing
-- half-done. (Rebuilds the table: on a large database, plan for it.)
ALTER TABLE member
    MODIFY uid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
