-- Retention deletes a job's file too (the digest stays in jobs.sha256, as a record): set when
-- retention unnamed it, in the transaction that unnames its outputs and consoles. A job file
-- is referenced only by jobs where this is NULL.
ALTER TABLE jobs ADD COLUMN file_deleted_ms INTEGER;
-- The job's reason says what retention deleted: written after that transaction commits, so a
-- server killed in between leaves this NULL and the next pass writes it.
ALTER TABLE jobs ADD COLUMN retention_noted INTEGER;
