//! Jobs, attempts, runners and console pieces in the database. A job's state machine is its
//! snapshot; every write of it is conditional on the version read ([`Db::store_job`]), so a step
//! is applied to exactly the state it was computed from, whatever else runs at the same time.

use crate::db::{Db, DbError, Engine, now_ms};
use construir_api::state::{AttemptBlobs, Effect, JobFacts, JobSnapshot};
use construir_api::types::{
    AttemptId, JobId, JobLimits, JobState, OutputIndexView, RunnerId, UserId,
};
use sqlx::Row;
use std::collections::{HashMap, HashSet};

/// How many of each owner's queued jobs a claim looks at.
pub const PER_OWNER_WINDOW: i64 = 50;

/// A job as stored: what it is, its state machine, and the version of that state.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub facts: JobFacts,
    pub snapshot: JobSnapshot,
    pub version: i64,
}

/// What a new job is, before it has an id.
pub struct NewJob {
    pub owner: UserId,
    pub name: String,
    pub image: String,
    /// The published image digest the job is pinned to (its index's current one at submit).
    pub image_digest: Option<String>,
    pub sha256: String,
    pub size: u64,
    pub limits: JobLimits,
    pub priority: i32,
    /// Seen only by its owner and admins.
    pub private: bool,
}

/// The columns derived from a snapshot: what queries select and sort on.
struct Derived {
    state: &'static str,
    claimable: i64,
    /// How many more attempts the job wants claimed (0: none; a job of one replica wants 1
    /// while it is queued).
    wanted: i64,
    deadline: Option<i64>,
    /// The first live attempt's runner, and whether it has started (kept for the previous
    /// release's readers; a claim counts a runner's attempts on the attempts' own rows).
    live_runner: Option<i64>,
    live_started: Option<i64>,
}

fn derived(s: &JobSnapshot) -> Derived {
    let claimable = s.retry_not_before_ms.unwrap_or(0) as i64;
    let wanted = s.wanted();
    let deadline = if s.state.is_terminal() {
        None
    } else {
        // The time-to-live counts only while the job waits for a runner (and no replica in
        // flight could still conclude it).
        let mut times = Vec::new();
        if s.expirable() {
            times.push(s.expires_at_ms);
        }
        times.extend(s.retry_not_before_ms);
        for a in s.live_attempts() {
            if a.started_ms.is_none() {
                times.push(a.accept_by_ms);
            }
            times.push(a.lease_until_ms);
        }
        times.into_iter().min().map(|t| t as i64)
    };
    let live = s.live_attempts().next();
    Derived {
        state: s.state.as_str(),
        claimable,
        wanted: i64::from(wanted),
        deadline,
        live_runner: live.map(|a| a.runner.0 as i64),
        live_started: live.map(|a| i64::from(a.started_ms.is_some())),
    }
}

/// How many attempts a runner may hold at once, checked in the same statement that stores its
/// claim (so that concurrent claims of one runner cannot all slip under it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerCap {
    pub runner: RunnerId,
    /// Live attempts (leased, running, uploading) in all.
    pub live: u32,
    /// Live attempts not started yet.
    pub unstarted: u32,
    /// For a claim alone (adaptive replication): the votes in a row its runner must have
    /// agreed, and it must hold no other job alone; 0 for any other claim.
    pub alone_after: u64,
}

/// A runner's live attempts, as the jobs' derived columns say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunnerLoad {
    pub live: u32,
    pub unstarted: u32,
}

/// What indexing an output gave: its index (a JSON blob), its tree digest and number of
/// entries, or why it could not be indexed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputIndexed {
    pub index_sha256: Option<String>,
    pub tree_sha256: Option<String>,
    pub entries: Option<u64>,
    pub error: Option<String>,
}

/// What became of an output upload's record ([`Db::set_output`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutput {
    Stored,
    /// The attempt has an output already (one per attempt): its sha256 and size.
    AlreadySet(String, u64),
    /// The job changed since `version` was read: look again whether the attempt may still
    /// deliver.
    JobChanged,
}

fn json_err(e: serde_json::Error) -> DbError {
    DbError::Refused(format!("stored JSON does not parse: {e}"))
}

pub(crate) fn stored_job(r: &sqlx::any::AnyRow) -> Result<StoredJob, DbError> {
    let limits: String = r.try_get("limits")?;
    let snapshot: String = r.try_get("snapshot")?;
    Ok(StoredJob {
        facts: JobFacts {
            id: JobId(r.try_get::<i64, _>("id")? as u64),
            owner: UserId(r.try_get::<i64, _>("owner")? as u64),
            name: r.try_get("name")?,
            image: r.try_get("image")?,
            image_digest: r.try_get("image_digest")?,
            sha256: r.try_get("sha256")?,
            size: r.try_get::<i64, _>("size")? as u64,
            limits: serde_json::from_str(&limits).map_err(json_err)?,
            priority: r.try_get::<i64, _>("priority")? as i32,
            private: r.try_get::<i64, _>("private")? != 0,
        },
        snapshot: serde_json::from_str(&snapshot).map_err(json_err)?,
        version: r.try_get("version")?,
    })
}

/// The columns [`stored_job`] reads (a macro: SQL text is built from literals only).
macro_rules! job_columns {
    () => {
        "id, owner, name, image, image_digest, sha256, size, limits, priority, snapshot, version, private"
    };
}

impl Db {
    pub async fn insert_job(&self, job: &NewJob, snapshot: &JobSnapshot) -> Result<JobId, DbError> {
        let d = derived(snapshot);
        let row = sqlx::query(
            "INSERT INTO jobs (owner, name, image, sha256, size, limits, priority, state, created_ms, \
             claimable_ms, next_deadline_ms, snapshot, live_runner, live_started, version, image_digest, \
             wanted, private) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 1, $15, $16, $17) \
             RETURNING id",
        )
        .bind(job.owner.0 as i64)
        .bind(&job.name)
        .bind(&job.image)
        .bind(&job.sha256)
        .bind(job.size as i64)
        .bind(serde_json::to_string(&job.limits).map_err(json_err)?)
        .bind(i64::from(job.priority))
        .bind(d.state)
        .bind(snapshot.created_ms as i64)
        .bind(d.claimable)
        .bind(d.deadline)
        .bind(serde_json::to_string(snapshot).map_err(json_err)?)
        .bind(d.live_runner)
        .bind(d.live_started)
        .bind(job.image_digest.as_deref())
        .bind(d.wanted)
        .bind(i64::from(job.private))
        .fetch_one(self.pool())
        .await?;
        Ok(JobId(row.try_get::<i64, _>(0)? as u64))
    }

    pub async fn load_job(&self, id: JobId) -> Result<Option<StoredJob>, DbError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = $1"
        ))
        .bind(id.0 as i64)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(stored_job).transpose()
    }

    /// Writes `snapshot` if the job is still at `version`; false if someone wrote it first (read
    /// it again and recompute).
    pub async fn store_job(
        &self,
        id: JobId,
        version: i64,
        snapshot: &JobSnapshot,
    ) -> Result<bool, DbError> {
        self.store_job_within(id, version, snapshot, None, &[], None)
            .await
    }

    /// [`Db::store_job`], and, with a `cap`, only if that runner holds fewer live and fewer
    /// unstarted attempts than it allows. One transaction: the job's row (conditional on its
    /// version and the runner's counts, in one statement), then its attempts' live and started
    /// marks (what the counts read), then the standing of the runners a quorum in `effects`
    /// judged (so it changes exactly once per quorum), and the report's `statement` if any.
    /// Concurrent claims of one runner cannot all pass the count: SQLite runs one writer at a
    /// time, and on PostgreSQL a claim locks its runner's row first. False if a condition
    /// failed (nothing written).
    pub async fn store_job_within(
        &self,
        id: JobId,
        version: i64,
        snapshot: &JobSnapshot,
        cap: Option<RunnerCap>,
        effects: &[Effect],
        statement: Option<(AttemptId, &str)>,
    ) -> Result<bool, DbError> {
        let d = derived(snapshot);
        let query = match cap {
            None => sqlx::query(
                "UPDATE jobs SET state = $1, claimable_ms = $2, next_deadline_ms = $3, \
                 snapshot = $4, live_runner = $5, live_started = $6, wanted = $9, \
                 version = version + 1 WHERE id = $7 AND version = $8",
            ),
            Some(_) => sqlx::query(
                "UPDATE jobs SET state = $1, claimable_ms = $2, next_deadline_ms = $3, \
                 snapshot = $4, live_runner = $5, live_started = $6, wanted = $9, \
                 version = version + 1 WHERE id = $7 AND version = $8 \
                 AND (SELECT COUNT(*) FROM attempts WHERE runner_id = $10 AND live = 1) < $11 \
                 AND (SELECT COUNT(*) FROM attempts WHERE runner_id = $10 AND live = 1 \
                      AND started = 0) < $12 \
                 AND ($13 = 0 OR ((SELECT agreed_in_row FROM runners WHERE id = $10) >= $13 \
                      AND NOT EXISTS (SELECT 1 FROM attempts WHERE runner_id = $10 AND alone = 1)))",
            ),
        };
        let mut query = query
            .bind(d.state)
            .bind(d.claimable)
            .bind(d.deadline)
            .bind(serde_json::to_string(snapshot).map_err(json_err)?)
            .bind(d.live_runner)
            .bind(d.live_started)
            .bind(id.0 as i64)
            .bind(version)
            .bind(d.wanted);
        if let Some(c) = cap {
            query = query
                .bind(c.runner.0 as i64)
                .bind(i64::from(c.live))
                .bind(i64::from(c.unstarted))
                .bind(c.alone_after as i64);
        }
        let mut tx = self.pool().begin().await?;
        if let (Some(c), Engine::Postgres) = (cap, self.engine()) {
            // PostgreSQL runs writers side by side. A claim skips a job another claim (or step)
            // is writing right now instead of queueing behind it: lost, the runner takes the
            // next (FOR UPDATE SKIP LOCKED). Then it locks its runner's row, so that claims of
            // one runner run one after another and the counts below are exact (SQLite gets
            // both from running one writer at a time). Job, then runner: the one lock a claim
            // waits for is taken last.
            let free = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE SKIP LOCKED")
                .bind(id.0 as i64)
                .fetch_optional(&mut *tx)
                .await?;
            if free.is_none() {
                tx.rollback().await?;
                return Ok(false);
            }
            sqlx::query("SELECT id FROM runners WHERE id = $1 FOR UPDATE")
                .bind(c.runner.0 as i64)
                .execute(&mut *tx)
                .await?;
        }
        if query.execute(&mut *tx).await?.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        let alone = snapshot
            .alone_attempt()
            .filter(|_| !snapshot.state.is_terminal())
            .map(|(i, _)| snapshot.attempts[i].id);
        for a in &snapshot.attempts {
            let (live, started) = (
                i64::from(a.state.is_live()),
                i64::from(a.started_ms.is_some()),
            );
            sqlx::query(
                "UPDATE attempts SET live = $1, started = $2, alone = $5 \
                 WHERE id = $3 AND job_id = $4 \
                 AND (live <> $1 OR started <> $2 OR alone <> $5)",
            )
            .bind(live)
            .bind(started)
            .bind(a.id.0 as i64)
            .bind(id.0 as i64)
            .bind(i64::from(alone == Some(a.id)))
            .execute(&mut *tx)
            .await?;
        }
        for e in effects {
            if let Effect::Standing { agreed, disagreed } = e {
                crate::runners::record_standing(&mut tx, agreed, disagreed).await?;
            }
        }
        // A report's signed statement is kept with the step that takes the report: a receipt
        // never lacks the statement of a vote that counted.
        if let Some((attempt, json)) = statement {
            sqlx::query("UPDATE attempts SET statement = $1 WHERE id = $2 AND job_id = $3")
                .bind(json)
                .bind(attempt.0 as i64)
                .bind(id.0 as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The jobs of which `runner` holds a live attempt it has not started.
    pub async fn unstarted_jobs(&self, runner: RunnerId) -> Result<Vec<JobId>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT job_id FROM attempts WHERE runner_id = $1 AND live = 1 AND started = 0",
        )
        .bind(runner.0 as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(JobId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// The live attempts `runner` holds now.
    pub async fn runner_load(&self, runner: RunnerId) -> Result<RunnerLoad, DbError> {
        let row = sqlx::query(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN started = 0 THEN 1 ELSE 0 END), 0) \
             FROM attempts WHERE runner_id = $1 AND live = 1",
        )
        .bind(runner.0 as i64)
        .fetch_one(self.pool())
        .await?;
        Ok(RunnerLoad {
            live: row.try_get::<i64, _>(0)? as u32,
            unstarted: row.try_get::<i64, _>(1)? as u32,
        })
    }

    /// Jobs, newest first: one owner's, or everyone's.
    pub async fn list_jobs(
        &self,
        owner: Option<UserId>,
        limit: i64,
    ) -> Result<Vec<StoredJob>, DbError> {
        let rows =
            match owner {
                Some(o) => sqlx::query(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE owner = $1 AND deleted_ms IS NULL ORDER BY id DESC LIMIT $2"
                ))
                .bind(o.0 as i64)
                .bind(limit)
                .fetch_all(self.pool())
                .await?,
                None => {
                    sqlx::query(concat!(
                        "SELECT ",
                        job_columns!(),
                        " FROM jobs WHERE deleted_ms IS NULL ORDER BY id DESC LIMIT $1"
                    ))
                    .bind(limit)
                    .fetch_all(self.pool())
                    .await?
                }
            };
        rows.iter().map(stored_job).collect()
    }

    /// Jobs claimable at `now` (queued, or running and wanting more replicas): (id, owner, priority), best first within an owner. Each
    /// owner's best [`PER_OWNER_WINDOW`] only, so one owner's thousands of queued jobs (ones no
    /// runner can take, or all at the top priority) never push another owner's out of sight.
    pub async fn claimable(&self, now: u64) -> Result<Vec<(JobId, UserId, i32)>, DbError> {
        let rows = sqlx::query(
            "SELECT id, owner, priority FROM (SELECT id, owner, priority, ROW_NUMBER() OVER \
             (PARTITION BY owner ORDER BY priority DESC, id ASC) AS rank FROM jobs \
             WHERE wanted > 0 AND claimable_ms <= $1) AS ranked \
             WHERE rank <= $2 ORDER BY rank, id LIMIT 2000",
        )
        .bind(now as i64)
        .bind(PER_OWNER_WINDOW)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    JobId(r.try_get::<i64, _>(0)? as u64),
                    UserId(r.try_get::<i64, _>(1)? as u64),
                    r.try_get::<i64, _>(2)? as i32,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// How many jobs `owner` has waiting in the queue (the per-user cap at submission).
    pub async fn queued_of(&self, owner: UserId) -> Result<u64, DbError> {
        let row = sqlx::query("SELECT COUNT(*) FROM jobs WHERE owner = $1 AND state = 'queued'")
            .bind(owner.0 as i64)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    /// The bytes `owner` keeps stored: the job files still kept, the outputs and the finished
    /// consoles of their jobs not deleted (equal bytes stored once are counted for each).
    pub async fn stored_of(&self, owner: UserId) -> Result<u64, DbError> {
        let row = sqlx::query(
            "SELECT CAST((SELECT COALESCE(SUM(size), 0) FROM jobs WHERE owner = $1 \
             AND deleted_ms IS NULL AND file_deleted_ms IS NULL) AS BIGINT), \
             CAST((SELECT COALESCE(SUM(a.output_size), 0) FROM attempts a JOIN jobs j \
             ON j.id = a.job_id WHERE j.owner = $1 AND j.deleted_ms IS NULL \
             AND a.output_sha256 IS NOT NULL) AS BIGINT), \
             CAST((SELECT COALESCE(SUM(a.console_blob_size), 0) FROM attempts a JOIN jobs j \
             ON j.id = a.job_id WHERE j.owner = $1 AND j.deleted_ms IS NULL \
             AND a.console_sha256 IS NOT NULL) AS BIGINT)",
        )
        .bind(owner.0 as i64)
        .fetch_one(self.pool())
        .await?;
        let mut total = 0u64;
        for i in 0..3 {
            total = total.saturating_add(row.try_get::<i64, _>(i)?.max(0) as u64);
        }
        Ok(total)
    }

    /// How many jobs each owner has running (the fair-share key).
    pub async fn running_per_owner(&self) -> Result<HashMap<UserId, u64>, DbError> {
        let rows =
            sqlx::query("SELECT owner, COUNT(*) FROM jobs WHERE state = 'running' GROUP BY owner")
                .fetch_all(self.pool())
                .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    UserId(r.try_get::<i64, _>(0)? as u64),
                    r.try_get::<i64, _>(1)? as u64,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Jobs with a deadline at or before `now` (a tick changes them).
    pub async fn due(&self, now: u64) -> Result<Vec<JobId>, DbError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE next_deadline_ms IS NOT NULL AND next_deadline_ms <= $1 \
             ORDER BY next_deadline_ms LIMIT 1000",
        )
        .bind(now as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(JobId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// The runner named `name` of `user`, made if new.
    pub async fn register_runner(&self, user: i64, name: &str) -> Result<RunnerId, DbError> {
        let now = now_ms();
        sqlx::query(
            // A registration is a runner (re)starting: what it declared before is forgotten.
            "INSERT INTO runners (user_id, name, registered_ms, last_seen_ms) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (user_id, name) DO UPDATE SET last_seen_ms = $3, slots = NULL",
        )
        .bind(user)
        .bind(name)
        .bind(now)
        .execute(self.pool())
        .await?;
        let row = sqlx::query("SELECT id FROM runners WHERE user_id = $1 AND name = $2")
            .bind(user)
            .bind(name)
            .fetch_one(self.pool())
            .await?;
        Ok(RunnerId(row.try_get::<i64, _>(0)? as u64))
    }

    /// Every runner of `user` (all its names): a claim hands none of them a job that one of
    /// them claimed and did not start, until the user's cool-down for it has passed.
    pub async fn runners_of(&self, user: i64) -> Result<HashSet<RunnerId>, DbError> {
        let rows = sqlx::query("SELECT id FROM runners WHERE user_id = $1")
            .bind(user)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| Ok(RunnerId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Notes that `user`'s runner was seen, with its capabilities, and raises its declared
    /// slots to `free_slots` if that is more; returns those slots, or `None` if the runner is not
    /// `user`'s.
    pub async fn runner_seen(
        &self,
        runner: RunnerId,
        user: i64,
        caps: &str,
        free_slots: u32,
    ) -> Result<Option<u32>, DbError> {
        let row = sqlx::query(
            "UPDATE runners SET last_seen_ms = $1, capabilities = $2, \
             slots = CASE WHEN slots IS NULL OR slots < $5 THEN $5 ELSE slots END \
             WHERE id = $3 AND user_id = $4 AND revoked_ms IS NULL RETURNING slots",
        )
        .bind(now_ms())
        .bind(caps)
        .bind(runner.0 as i64)
        .bind(user)
        .bind(i64::from(free_slots))
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| r.try_get::<i64, _>(0).map(|n| n as u32))
            .transpose()
            .map_err(DbError::from)
    }

    /// A new attempt row for `job` on `runner`, claimed with the runner token `claim_token` and
    /// reached with the attempt token whose digest is `token_sha256`.
    pub async fn insert_attempt(
        &self,
        job: JobId,
        runner: RunnerId,
        token_sha256: &str,
        claim_token: i64,
    ) -> Result<AttemptId, DbError> {
        let row = sqlx::query(
            "INSERT INTO attempts (job_id, runner_id, token_sha256, claim_token_id) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(job.0 as i64)
        .bind(runner.0 as i64)
        .bind(token_sha256)
        .bind(claim_token)
        .fetch_one(self.pool())
        .await?;
        Ok(AttemptId(row.try_get::<i64, _>(0)? as u64))
    }

    /// Removes an attempt row whose claim did not go through.
    pub async fn drop_attempt(&self, id: AttemptId) -> Result<(), DbError> {
        sqlx::query("DELETE FROM attempts WHERE id = $1")
            .bind(id.0 as i64)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The attempt (and its job) an attempt token belongs to, unless the runner token it was
    /// claimed with has been revoked since: an attempt token lives no longer than its runner's.
    pub async fn attempt_by_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<(AttemptId, JobId)>, DbError> {
        let row = sqlx::query(
            "SELECT a.id, a.job_id FROM attempts a LEFT JOIN tokens t ON t.id = a.claim_token_id \
             JOIN runners r ON r.id = a.runner_id \
             WHERE a.token_sha256 = $1 AND (a.claim_token_id IS NULL OR t.revoked_ms IS NULL) \
             AND r.revoked_ms IS NULL",
        )
        .bind(token_sha256)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok((
                AttemptId(r.try_get::<i64, _>(0)? as u64),
                JobId(r.try_get::<i64, _>(1)? as u64),
            ))
        })
        .transpose()
        .map_err(|e: sqlx::Error| DbError::from(e))
    }

    /// The output an attempt uploaded (sha256, size), if any.
    pub async fn attempt_output(
        &self,
        attempt: AttemptId,
    ) -> Result<Option<(String, u64)>, DbError> {
        let row = sqlx::query(
            "SELECT output_sha256, output_size FROM attempts WHERE id = $1 \
             AND output_sha256 IS NOT NULL",
        )
        .bind(attempt.0 as i64)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| {
            Ok((
                r.try_get::<String, _>(0)?,
                r.try_get::<Option<i64>, _>(1)?.unwrap_or(0) as u64,
            ))
        })
        .transpose()
        .map_err(|e: sqlx::Error| DbError::from(e))
    }

    /// What each attempt of a job uploaded.
    pub async fn attempt_blobs(
        &self,
        job: JobId,
    ) -> Result<HashMap<AttemptId, AttemptBlobs>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.console_size, a.output_sha256, a.output_size, a.output_tree_sha256, \
             a.output_entries, a.output_index_error, \
             CASE WHEN a.statement IS NULL THEN 0 ELSE 1 END, \
             CASE WHEN r.revoked_ms IS NULL THEN 0 ELSE 1 END FROM attempts a JOIN runners r ON r.id = a.runner_id \
             WHERE a.job_id = $1",
        )
        .bind(job.0 as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let tree_sha256: Option<String> = r.try_get(4)?;
                let entries = r.try_get::<Option<i64>, _>(5)?.map(|n| n as u64);
                let error: Option<String> = r.try_get(6)?;
                let indexed = tree_sha256.is_some() || error.is_some();
                Ok((
                    AttemptId(r.try_get::<i64, _>(0)? as u64),
                    AttemptBlobs {
                        console_size: r.try_get::<i64, _>(1)? as u64,
                        output_sha256: r.try_get(2)?,
                        output_size: r.try_get::<Option<i64>, _>(3)?.map(|s| s as u64),
                        output_index: indexed.then_some(OutputIndexView {
                            tree_sha256,
                            entries,
                            error,
                        }),
                        signed: r.try_get::<i64, _>(7)? != 0,
                        runner_revoked: r.try_get::<i64, _>(8)? != 0,
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Recorded outputs without an index or a reason for none (indexing happens after the
    /// record; a server stopped meanwhile leaves these): attempt, output, the job's output size.
    pub async fn unindexed_outputs(
        &self,
        limit: i64,
    ) -> Result<Vec<(AttemptId, String, u64)>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.output_sha256, j.limits FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.output_sha256 IS NOT NULL AND a.output_tree_sha256 IS NULL \
             AND a.output_index_error IS NULL ORDER BY a.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let limits: JobLimits =
                serde_json::from_str(&r.try_get::<String, _>(2)?).map_err(json_err)?;
            out.push((
                AttemptId(r.try_get::<i64, _>(0)? as u64),
                r.try_get(1)?,
                limits.output_size,
            ));
        }
        Ok(out)
    }

    /// Names attempt `attempt`'s output index, once, and only while its output is `sha256`.
    pub async fn set_output_index(
        &self,
        attempt: AttemptId,
        sha256: &str,
        index: &OutputIndexed,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE attempts SET output_index_sha256 = $1, output_tree_sha256 = $2, \
             output_entries = $3, output_index_error = $4 \
             WHERE id = $5 AND output_sha256 = $6 AND output_tree_sha256 IS NULL \
             AND output_index_error IS NULL",
        )
        .bind(index.index_sha256.as_deref())
        .bind(index.tree_sha256.as_deref())
        .bind(index.entries.map(|n| n as i64))
        .bind(index.error.as_deref())
        .bind(attempt.0 as i64)
        .bind(sha256)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The index blob of attempt `attempt`'s output, if it was indexed.
    pub async fn output_index_blob(&self, attempt: AttemptId) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT output_index_sha256 FROM attempts WHERE id = $1")
            .bind(attempt.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten())
    }

    /// Records attempt `attempt`'s output, once: only if it has none yet and its job is still
    /// at `version` (the version whose snapshot said the attempt may deliver), in one
    /// statement, so that an attempt that ended meanwhile, or a second upload, sets nothing.
    pub async fn set_output(
        &self,
        attempt: AttemptId,
        job: JobId,
        version: i64,
        sha256: &str,
        size: u64,
        index: &OutputIndexed,
    ) -> Result<SetOutput, DbError> {
        let mut tx = self.pool().begin().await?;
        if self.engine() == Engine::Postgres {
            // The job's row held (shared) until the output is named: a step, a deletion or
            // retention of the job waits, and then sees it; one that came first makes the
            // version differ (the statement's own look at jobs would read the state from before
            // it waited, on PostgreSQL).
            let held = sqlx::query("SELECT id FROM jobs WHERE id = $1 AND version = $2 FOR SHARE")
                .bind(job.0 as i64)
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
            if held.is_none() {
                tx.rollback().await?;
                return Ok(match self.attempt_output(attempt).await? {
                    Some((sha, size)) => SetOutput::AlreadySet(sha, size),
                    None => SetOutput::JobChanged,
                });
            }
        }
        let done = sqlx::query(
            "UPDATE attempts SET output_sha256 = $1, output_size = $2, \
             output_index_sha256 = $6, output_tree_sha256 = $7, output_entries = $8, \
             output_index_error = $9 \
             WHERE id = $3 AND job_id = $4 AND output_sha256 IS NULL \
             AND EXISTS (SELECT 1 FROM jobs WHERE id = $4 AND version = $5)",
        )
        .bind(sha256)
        .bind(size as i64)
        .bind(attempt.0 as i64)
        .bind(job.0 as i64)
        .bind(version)
        .bind(index.index_sha256.as_deref())
        .bind(index.tree_sha256.as_deref())
        .bind(index.entries.map(|n| n as i64))
        .bind(index.error.as_deref())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if done.rows_affected() == 1 {
            return Ok(SetOutput::Stored);
        }
        Ok(match self.attempt_output(attempt).await? {
            Some((sha, size)) => SetOutput::AlreadySet(sha, size),
            None => SetOutput::JobChanged,
        })
    }
}

/// Whether a job state means no more attempts will run.
pub fn ended(state: JobState) -> bool {
    state.is_terminal()
}
