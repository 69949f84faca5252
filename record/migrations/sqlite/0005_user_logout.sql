-- When each user was last logged out everywhere by the operator (Unix ms):
-- natter refuses the user's tokens issued before it. One row per user (the
-- internal id of `users`) who was ever logged out; a later logout
-- overwrites it.
CREATE TABLE user_logout (
    owner INTEGER PRIMARY KEY,
    at    INTEGER NOT NULL
);
