-- See migrations/sqlite/0010_deleted_jobs.sql.
ALTER TABLE attempts ADD COLUMN alone BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_state_id ON jobs (state, id);
ALTER TABLE jobs ADD COLUMN deleted_ms BIGINT;
