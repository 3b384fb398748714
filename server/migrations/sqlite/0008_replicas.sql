-- Replicated jobs (issue 12): a job may hold several live attempts at once, so what a claim
-- counts a runner's attempts by moves from the job's row to the attempts' rows; a job is
-- claimable while it wants more attempts (`wanted`, derived from its snapshot like `state`).
-- Runners get an ed25519 public key (bound at their first registration with one) and a
-- standing (votes that agreed with a quorum, in a row and in all; votes that lost one).
ALTER TABLE jobs ADD COLUMN wanted INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET wanted = 1 WHERE state = 'queued';
CREATE INDEX jobs_by_wanted ON jobs (wanted, owner, priority, id);

ALTER TABLE attempts ADD COLUMN live INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN started INTEGER NOT NULL DEFAULT 0;
-- The report's signed statement (construir_api::trust::SignedStatement as JSON), once checked.
ALTER TABLE attempts ADD COLUMN statement TEXT;
-- Set once the attempt's job has been told what its output's index gave (the vote it makes):
-- the housekeeping tells what a killed server left untold.
ALTER TABLE attempts ADD COLUMN told INTEGER NOT NULL DEFAULT 0;
-- The job's live attempt of the previous release was its latest one, on `live_runner`.
UPDATE attempts SET live = 1,
    started = COALESCE((SELECT j.live_started FROM jobs j WHERE j.id = attempts.job_id), 0)
    WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.id = attempts.job_id
                  AND j.live_runner = attempts.runner_id)
    AND attempts.id = (SELECT MAX(a2.id) FROM attempts a2 WHERE a2.job_id = attempts.job_id);
CREATE INDEX attempts_live_by_runner ON attempts (runner_id, live, started);

ALTER TABLE runners ADD COLUMN public_key TEXT;
ALTER TABLE runners ADD COLUMN agreed_in_row INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN agreed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runners ADD COLUMN disagreed INTEGER NOT NULL DEFAULT 0;
-- A revoked runner (by its owner or an admin) claims and reports nothing more; results it took
-- part in say so.
ALTER TABLE runners ADD COLUMN revoked_ms INTEGER;
