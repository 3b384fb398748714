//! Jobs, attempts, runners and console pieces in the database. A job's state machine is its
//! snapshot; every write of it is conditional on the version read ([`Db::store_job`]), so a step
//! is applied to exactly the state it was computed from, whatever else runs at the same time.

use crate::db::{Db, DbError, now_ms};
use construir_api::state::{AttemptBlobs, JobFacts, JobSnapshot};
use construir_api::types::{AttemptId, JobId, JobLimits, JobState, RunnerId, UserId};
use sqlx::Row;
use std::collections::HashMap;

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
    pub sha256: String,
    pub size: u64,
    pub limits: JobLimits,
    pub priority: i32,
}

/// The columns derived from a snapshot: what queries select and sort on.
fn derived(s: &JobSnapshot) -> (&'static str, i64, Option<i64>) {
    let claimable = s.retry_not_before_ms.unwrap_or(0) as i64;
    let deadline = if s.state.is_terminal() {
        None
    } else {
        // The time-to-live counts only while the job waits for a runner.
        let mut times = Vec::new();
        if s.state == JobState::Queued {
            times.push(s.expires_at_ms);
        }
        times.extend(s.retry_not_before_ms);
        if let Some(a) = s.live_attempt() {
            if a.started_ms.is_none() {
                times.push(a.accept_by_ms);
            }
            times.push(a.lease_until_ms);
        }
        times.into_iter().min().map(|t| t as i64)
    };
    (s.state.as_str(), claimable, deadline)
}

fn json_err(e: serde_json::Error) -> DbError {
    DbError::Refused(format!("stored JSON does not parse: {e}"))
}

fn stored_job(r: &sqlx::any::AnyRow) -> Result<StoredJob, DbError> {
    let limits: String = r.try_get("limits")?;
    let snapshot: String = r.try_get("snapshot")?;
    Ok(StoredJob {
        facts: JobFacts {
            id: JobId(r.try_get::<i64, _>("id")? as u64),
            owner: UserId(r.try_get::<i64, _>("owner")? as u64),
            name: r.try_get("name")?,
            image: r.try_get("image")?,
            sha256: r.try_get("sha256")?,
            size: r.try_get::<i64, _>("size")? as u64,
            limits: serde_json::from_str(&limits).map_err(json_err)?,
            priority: r.try_get::<i64, _>("priority")? as i32,
        },
        snapshot: serde_json::from_str(&snapshot).map_err(json_err)?,
        version: r.try_get("version")?,
    })
}

/// The columns [`stored_job`] reads (a macro: SQL text is built from literals only).
macro_rules! job_columns {
    () => {
        "id, owner, name, image, sha256, size, limits, priority, snapshot, version"
    };
}

impl Db {
    pub async fn insert_job(&self, job: &NewJob, snapshot: &JobSnapshot) -> Result<JobId, DbError> {
        let (state, claimable, deadline) = derived(snapshot);
        let row = sqlx::query(
            "INSERT INTO jobs (owner, name, image, sha256, size, limits, priority, state, created_ms, \
             claimable_ms, next_deadline_ms, snapshot, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1) RETURNING id",
        )
        .bind(job.owner.0 as i64)
        .bind(&job.name)
        .bind(&job.image)
        .bind(&job.sha256)
        .bind(job.size as i64)
        .bind(serde_json::to_string(&job.limits).map_err(json_err)?)
        .bind(i64::from(job.priority))
        .bind(state)
        .bind(snapshot.created_ms as i64)
        .bind(claimable)
        .bind(deadline)
        .bind(serde_json::to_string(snapshot).map_err(json_err)?)
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
        let (state, claimable, deadline) = derived(snapshot);
        let done = sqlx::query(
            "UPDATE jobs SET state = $1, claimable_ms = $2, next_deadline_ms = $3, snapshot = $4, \
             version = version + 1 WHERE id = $5 AND version = $6",
        )
        .bind(state)
        .bind(claimable)
        .bind(deadline)
        .bind(serde_json::to_string(snapshot).map_err(json_err)?)
        .bind(id.0 as i64)
        .bind(version)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Jobs, newest first: one owner's, or everyone's.
    pub async fn list_jobs(
        &self,
        owner: Option<UserId>,
        limit: i64,
    ) -> Result<Vec<StoredJob>, DbError> {
        let rows = match owner {
            Some(o) => {
                sqlx::query(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE owner = $1 ORDER BY id DESC LIMIT $2"
                ))
                .bind(o.0 as i64)
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs ORDER BY id DESC LIMIT $1"
                ))
                .bind(limit)
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(stored_job).collect()
    }

    /// Queued jobs claimable at `now`: (id, owner, priority), best first within an owner. Each
    /// owner's best [`PER_OWNER_WINDOW`] only, so one owner's thousands of queued jobs (ones no
    /// runner can take, or all at the top priority) never push another owner's out of sight.
    pub async fn claimable(&self, now: u64) -> Result<Vec<(JobId, UserId, i32)>, DbError> {
        let rows = sqlx::query(
            "SELECT id, owner, priority FROM (SELECT id, owner, priority, ROW_NUMBER() OVER \
             (PARTITION BY owner ORDER BY priority DESC, id ASC) AS rank FROM jobs \
             WHERE state = 'queued' AND claimable_ms <= $1) AS ranked \
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
            "INSERT INTO runners (user_id, name, registered_ms, last_seen_ms) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (user_id, name) DO UPDATE SET last_seen_ms = $3",
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

    /// Notes that `user`'s runner was seen, with its capabilities; `None` if it is not `user`'s.
    pub async fn runner_seen(
        &self,
        runner: RunnerId,
        user: i64,
        caps: &str,
    ) -> Result<Option<i64>, DbError> {
        let row = sqlx::query(
            "UPDATE runners SET last_seen_ms = $1, capabilities = $2 WHERE id = $3 AND user_id = $4 \
             RETURNING user_id",
        )
        .bind(now_ms())
        .bind(caps)
        .bind(runner.0 as i64)
        .bind(user)
        .fetch_optional(self.pool())
        .await?;
        row.map(|r| r.try_get::<i64, _>(0))
            .transpose()
            .map_err(DbError::from)
    }

    pub async fn insert_attempt(
        &self,
        job: JobId,
        runner: RunnerId,
        token_sha256: &str,
    ) -> Result<AttemptId, DbError> {
        let row = sqlx::query(
            "INSERT INTO attempts (job_id, runner_id, token_sha256) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(job.0 as i64)
        .bind(runner.0 as i64)
        .bind(token_sha256)
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

    /// The attempt (and its job) an attempt token belongs to.
    pub async fn attempt_by_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<(AttemptId, JobId)>, DbError> {
        let row = sqlx::query("SELECT id, job_id FROM attempts WHERE token_sha256 = $1")
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

    /// What each attempt of a job uploaded.
    pub async fn attempt_blobs(
        &self,
        job: JobId,
    ) -> Result<HashMap<AttemptId, AttemptBlobs>, DbError> {
        let rows = sqlx::query(
            "SELECT id, console_size, output_sha256, output_size FROM attempts WHERE job_id = $1",
        )
        .bind(job.0 as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    AttemptId(r.try_get::<i64, _>(0)? as u64),
                    AttemptBlobs {
                        console_size: r.try_get::<i64, _>(1)? as u64,
                        output_sha256: r.try_get(2)?,
                        output_size: r.try_get::<Option<i64>, _>(3)?.map(|s| s as u64),
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Console bytes received so far for an attempt (all of them, kept or not).
    pub async fn console_size(&self, attempt: AttemptId) -> Result<u64, DbError> {
        let row = sqlx::query("SELECT console_size FROM attempts WHERE id = $1")
            .bind(attempt.0 as i64)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    /// Appends console bytes: `keep` is stored at `offset` (if not empty) and the attempt's size
    /// becomes `new_size`, only if it still is `expected` (one writer wins; the other retries).
    pub async fn append_log(
        &self,
        attempt: AttemptId,
        expected: u64,
        offset: u64,
        keep: &[u8],
        new_size: u64,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE attempts SET console_size = $1 WHERE id = $2 AND console_size = $3",
        )
        .bind(new_size as i64)
        .bind(attempt.0 as i64)
        .bind(expected as i64)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        if !keep.is_empty() {
            sqlx::query(
                "INSERT INTO log_pieces (attempt_id, start_offset, bytes) VALUES ($1, $2, $3)",
            )
            .bind(attempt.0 as i64)
            .bind(offset as i64)
            .bind(keep.to_vec())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Kept console bytes of an attempt from `from`, at most `max` of them.
    pub async fn read_log(
        &self,
        attempt: AttemptId,
        from: u64,
        max: usize,
    ) -> Result<Vec<u8>, DbError> {
        let rows = sqlx::query(
            "SELECT start_offset, bytes FROM log_pieces WHERE attempt_id = $1 \
             AND start_offset + LENGTH(bytes) > $2 AND start_offset < $3 ORDER BY start_offset",
        )
        .bind(attempt.0 as i64)
        .bind(from as i64)
        .bind(from.saturating_add(max as u64) as i64)
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::new();
        let mut at = from;
        for r in rows {
            let start = r.try_get::<i64, _>(0)? as u64;
            let bytes: Vec<u8> = r.try_get(1)?;
            if start > at {
                break; // bytes past the console cap were not kept
            }
            let skip = (at - start) as usize;
            let piece = &bytes[skip.min(bytes.len())..];
            let take = piece.len().min(max - out.len());
            out.extend_from_slice(&piece[..take]);
            at += take as u64;
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    pub async fn set_output(
        &self,
        attempt: AttemptId,
        sha256: &str,
        size: u64,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE attempts SET output_sha256 = $1, output_size = $2 WHERE id = $3")
            .bind(sha256)
            .bind(size as i64)
            .bind(attempt.0 as i64)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// Whether a job state means no more attempts will run.
pub fn ended(state: JobState) -> bool {
    state.is_terminal()
}
