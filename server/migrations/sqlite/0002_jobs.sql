-- Runners, jobs and attempts. A job's state machine (construir_api::state) is stored as its
-- snapshot (JSON); the columns beside it are what queries select and sort on, derived from the
-- snapshot on every write. `version` makes every write conditional on the snapshot read
-- (optimistic concurrency: two servers or two requests never both apply a step to one version).
CREATE TABLE runners (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    capabilities TEXT,
    UNIQUE (user_id, name)
);

CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    owner INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    limits TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    -- Not claimable before (a back-off after a failed try).
    claimable_ms INTEGER NOT NULL,
    -- The earliest time a tick changes something (a lease, an accept window, a back-off, the
    -- time-to-live); NULL for an ended job.
    next_deadline_ms INTEGER,
    snapshot TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state, owner, priority, id);
CREATE INDEX jobs_by_deadline ON jobs (next_deadline_ms);
CREATE INDEX jobs_by_owner ON jobs (owner, id);

-- Attempts as the storage knows them (their states live in the job's snapshot): who runs them,
-- the attempt token (its SHA-256), and what the server received and hashed itself.
CREATE TABLE attempts (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    runner_id INTEGER NOT NULL REFERENCES runners(id),
    token_sha256 TEXT NOT NULL UNIQUE,
    console_size INTEGER NOT NULL DEFAULT 0,
    output_sha256 TEXT,
    output_size INTEGER
);
CREATE INDEX attempts_by_job ON attempts (job_id);

-- The console as it arrives, piece by piece at its byte offset (any server process can serve
-- it while the attempt runs).
CREATE TABLE log_pieces (
    attempt_id INTEGER NOT NULL REFERENCES attempts(id),
    start_offset INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (attempt_id, start_offset)
);
