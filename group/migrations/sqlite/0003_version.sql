-- Every change bumps the group's version; a change written against an older
-- version is refused and made again from the new state.
ALTER TABLE grp ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
