-- Attempt tokens die with the runner token that claimed them, and a runner holds no more live
-- attempts than the slots it declared.

-- The runner token an attempt was claimed with: revoking it kills the attempt's token too. NULL
-- only for attempts claimed before this migration.
ALTER TABLE attempts ADD COLUMN claim_token_id INTEGER REFERENCES tokens(id);

-- The most job slots the runner has declared free since it last registered (a runner that has
-- just started holds nothing, so its free slots are all it lends). NULL until its first claim.
ALTER TABLE runners ADD COLUMN slots INTEGER;

-- Derived from the snapshot on every write, like state: the runner of the job's live attempt,
-- and whether it has started, so that a claim counts a runner's live and unstarted attempts.
ALTER TABLE jobs ADD COLUMN live_runner INTEGER;
ALTER TABLE jobs ADD COLUMN live_started INTEGER;
CREATE INDEX jobs_by_live_runner ON jobs (live_runner, live_started);

UPDATE jobs SET
    live_runner = (SELECT json_extract(a.value, '$.runner') FROM json_each(jobs.snapshot, '$.attempts') AS a
                   WHERE json_extract(a.value, '$.state') IN ('leased', 'running', 'uploading') LIMIT 1),
    live_started = (SELECT json_extract(a.value, '$.started_ms') IS NOT NULL FROM json_each(jobs.snapshot, '$.attempts') AS a
                    WHERE json_extract(a.value, '$.state') IN ('leased', 'running', 'uploading') LIMIT 1)
WHERE state = 'running';
