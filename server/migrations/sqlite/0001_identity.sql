-- Who may do what: users own tokens (and, later, runners and jobs). Times are Unix milliseconds.
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);

-- A token is 32 random bytes shown once; only its SHA-256 is kept (checked on every request).
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    role TEXT NOT NULL CHECK (role IN ('submitter', 'runner', 'admin')),
    sha256 TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
