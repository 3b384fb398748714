-- An output's index, made once when it arrives (construir_contract::archive::index): the index
-- itself as a JSON blob, the tree digest replicas must agree on, the number of entries; or why
-- the output could not be indexed (it is kept all the same: it is the job's).
ALTER TABLE attempts ADD COLUMN output_index_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN output_tree_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN output_entries INTEGER;
ALTER TABLE attempts ADD COLUMN output_index_error TEXT;
CREATE INDEX attempts_by_output_index ON attempts (output_index_sha256);
