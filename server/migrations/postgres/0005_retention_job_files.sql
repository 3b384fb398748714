-- See migrations/sqlite/0005_retention_job_files.sql.
ALTER TABLE jobs ADD COLUMN file_deleted_ms BIGINT;
ALTER TABLE jobs ADD COLUMN retention_noted BIGINT;
