-- See migrations/sqlite/0006_output_index.sql.
ALTER TABLE attempts ADD COLUMN output_index_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN output_tree_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN output_entries BIGINT;
ALTER TABLE attempts ADD COLUMN output_index_error TEXT;
CREATE INDEX attempts_by_output_index ON attempts (output_index_sha256);
