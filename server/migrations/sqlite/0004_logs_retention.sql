-- A finished attempt's console as one blob: its kept bytes (the cap's head, then its tail) laid
-- end to end. Set in the same transaction that deletes the attempt's log_pieces, so a reader
-- finds the console in exactly one of the two places; NULL while the attempt is live (or before
-- a restart finished compacting it).
ALTER TABLE attempts ADD COLUMN console_sha256 TEXT;
ALTER TABLE attempts ADD COLUMN console_blob_size INTEGER;
-- Retention deleted this attempt's console (its pieces or its blob) at this time.
ALTER TABLE attempts ADD COLUMN console_deleted_ms INTEGER;
-- The output's digest once retention deleted its blob (output_sha256 is then NULL: nothing to
-- serve), kept so the record still says what the attempt produced.
ALTER TABLE attempts ADD COLUMN deleted_output_sha256 TEXT;
-- When retention deleted the job's outputs and consoles (the job record itself stays).
ALTER TABLE jobs ADD COLUMN retention_ms INTEGER;
-- What the orphan-blob collector and retention look up: is this digest still referenced?
CREATE INDEX attempts_by_output ON attempts (output_sha256);
CREATE INDEX attempts_by_console ON attempts (console_sha256);
CREATE INDEX jobs_by_sha256 ON jobs (sha256);
