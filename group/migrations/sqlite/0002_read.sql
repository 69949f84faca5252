-- Each member's read cursor: the highest conv_seq the member has read
-- (on any device). Written only by marking read; other member updates keep it.
ALTER TABLE member ADD COLUMN read_seq INTEGER NOT NULL DEFAULT 0;
