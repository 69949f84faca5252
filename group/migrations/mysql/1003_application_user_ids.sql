-- Applicants' user ids as strings, byte for byte (see migration 1002).
ALTER TABLE application
    MODIFY uid VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL;
