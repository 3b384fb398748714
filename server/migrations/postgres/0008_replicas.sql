-- See migrations/sqlite/0008_replicas.sql (its back-fills have no rows to fill here).
ALTER TABLE jobs ADD COLUMN wanted BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_wanted ON jobs (wanted, owner, priority, id);

ALTER TABLE attempts ADD COLUMN live BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN started BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN statement TEXT;
ALTER TABLE attempts ADD COLUMN told BIGINT NOT NULL DEFAULT 0;
CREATE INDEX attempts_live_by_runner ON attempts (runner_id, live, started);

ALTER TABLE runners ADD COLUMN public_key TEXT;
ALTER TABLE runners ADD COLUMN agreed_in_row BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN agreed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN disagreed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN revoked_ms BIGINT;
