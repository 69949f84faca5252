-- Group owners' user ids as strings, byte for byte (see migration 1002); the
-- owned-groups count joins this column to member.uid, so both share one
-- character set and collation.
ALTER TABLE grp
    MODIFY owner VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
