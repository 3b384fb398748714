-- See migrations/sqlite/0004_logs_retention.sql.
ALTER TABLE attempts ADD COLUMN console_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN console_blob_size BIGINT;
ALTER TABLE attempts ADD COLUMN console_deleted_ms BIGINT;
ALTER TABLE attempts ADD COLUMN deleted_output_sha256 TEXT;
ALTER TABLE jobs ADD COLUMN retention_ms BIGINT;
CREATE INDEX attempts_by_output ON attempts (output_sha256);
CREATE INDEX attempts_by_console ON attempts (console_sha256);
CREATE INDEX jobs_by_sha256 ON jobs (sha256);
