-- The website (issue 13): accounts that sign in with a password (an argon2id PHC string; NULL:
-- only with a token), admins among them, bans; sessions behind a cookie (only the SHA-256 of the
-- cookie's token is kept, as for API tokens), each with its CSRF token; private jobs.
ALTER TABLE users ADD COLUMN password_hash TEXT;
ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
-- A banned user's tokens and sessions stop working; their runners are revoked with the ban.
ALTER TABLE users ADD COLUMN banned_ms INTEGER;

CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL REFERENCES users(id),
    role TEXT NOT NULL CHECK (role IN ('submitter', 'admin')),
    -- The token it was opened with, if it was: revoking that token ends the session.
    token_id INTEGER REFERENCES tokens(id),
    csrf TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- A private job is seen only by its owner and admins. Jobs of the previous release were seen
-- only by them: they stay so.
ALTER TABLE jobs ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET private = 1;
CREATE INDEX jobs_by_image ON jobs (image, id);

-- Adaptive replication (issue 12): set while the attempt holds its unended job alone, or its vote
-- there is being checked; a runner claims alone only with none such, and only with the standing
-- asked, both checked in the statement that stores the claim.
ALTER TABLE attempts ADD COLUMN alone INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_state_id ON jobs (state, id);
