//! Read-only queries the farm's pages (`/runners`) ask beyond what the API lists: what each
//! runner holds now, and how many attempts each has reported.

use crate::db::{Db, DbError};
use construir_api::state::JobFacts;
use construir_api::types::{JobId, RunnerId, UserId};
use sqlx::Row;
use std::collections::HashMap;

/// The most live attempts listed (a farm's runners hold their slots' worth each).
pub const LIVE_LISTED: i64 = 10_000;

/// A runner's live attempt (leased, running or uploading), with its job's facts (what
/// [`crate::access::Viewer::may_see`] decides on).
#[derive(Debug, Clone)]
pub struct LiveAttempt {
    pub runner: RunnerId,
    pub job: JobFacts,
}

impl Db {
    /// Every live attempt, by runner then job.
    pub async fn farm_live_attempts(&self) -> Result<Vec<LiveAttempt>, DbError> {
        let rows = sqlx::query(
            "SELECT a.runner_id, j.id, j.owner, j.name, j.image, j.image_digest, j.sha256, \
             j.size, j.limits, j.priority, j.private \
             FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.live = 1 ORDER BY a.runner_id, j.id LIMIT $1",
        )
        .bind(LIVE_LISTED)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let limits: String = r.try_get(8)?;
                let job = JobId(r.try_get::<i64, _>(1)? as u64);
                Ok(LiveAttempt {
                    runner: RunnerId(r.try_get::<i64, _>(0)? as u64),
                    job: JobFacts {
                        id: job,
                        owner: UserId(r.try_get::<i64, _>(2)? as u64),
                        name: r.try_get(3)?,
                        image: r.try_get(4)?,
                        image_digest: r.try_get(5)?,
                        sha256: r.try_get(6)?,
                        size: r.try_get::<i64, _>(7)? as u64,
                        limits: serde_json::from_str(&limits).map_err(|e| {
                            DbError::Refused(format!("job {job}: its stored limits: {e}"))
                        })?,
                        priority: r.try_get::<i64, _>(9)? as i32,
                        private: r.try_get::<i64, _>(10)? != 0,
                    },
                })
            })
            .collect()
    }

    /// How many attempts each runner has reported: those whose report the server kept a
    /// signed statement of, and, from runners that sign nothing, those that ended after they
    /// started with an output received (the attempt's state itself lives in its job's snapshot,
    /// which no portable query reads). Runners with none are absent.
    pub async fn farm_reported_counts(&self) -> Result<HashMap<RunnerId, u64>, DbError> {
        let rows = sqlx::query(
            "SELECT runner_id, COUNT(*) FROM attempts \
             WHERE statement IS NOT NULL \
             OR (live = 0 AND started = 1 \
                 AND (output_sha256 IS NOT NULL OR deleted_output_sha256 IS NOT NULL)) \
             GROUP BY runner_id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    RunnerId(r.try_get::<i64, _>(0)? as u64),
                    r.try_get::<i64, _>(1)?.max(0) as u64,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}
