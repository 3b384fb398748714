-- Jobs an admin deleted (deletion.rs): the row stays as a tombstone (its id is never reused, the
-- state machine and the attempts' rows stay whole), renamed, its snapshot ended and its reason
-- replaced; every name it gave to blobs is gone, in the transaction that sets this. Listing and
-- every view treat a job with this set as one that does not exist.
ALTER TABLE jobs ADD COLUMN deleted_ms INTEGER;
