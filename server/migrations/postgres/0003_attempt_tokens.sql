-- See migrations/sqlite/0003_attempt_tokens.sql. (No PostgreSQL database predates this release:
-- the SQLite migration's back-fill of live_runner has nothing to fill here.)
ALTER TABLE attempts ADD COLUMN claim_token_id BIGINT REFERENCES tokens(id);
ALTER TABLE runners ADD COLUMN slots BIGINT;
ALTER TABLE jobs ADD COLUMN live_runner BIGINT;
ALTER TABLE jobs ADD COLUMN live_started BIGINT;
CREATE INDEX jobs_by_live_runner ON jobs (live_runner, live_started);
