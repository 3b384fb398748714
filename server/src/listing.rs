//! The jobs list as the website shows it: newest first, filtered by state, owner and image,
//! in pages (a page ends where the next begins: `before` the last id shown), with only the jobs
//! the viewer may see (public ones and their own; an admin's: all), never a deleted one.

use crate::access::Viewer;
use crate::db::{Db, DbError};
use crate::jobs::StoredJob;
use construir_api::types::{JobId, JobState};
use sqlx::Row;

/// What the list is narrowed to.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    /// An owner's user name.
    pub owner: Option<String>,
    pub image: Option<String>,
    /// Only jobs older than this one (the next page).
    pub before: Option<JobId>,
}

/// A listed job, with its owner's name.
pub struct Listed {
    pub job: StoredJob,
    pub owner_name: String,
}

impl Db {
    /// At most `limit` jobs `viewer` may see that match `filter`, newest first.
    pub async fn list_page(
        &self,
        viewer: Viewer,
        filter: &JobFilter,
        limit: i64,
    ) -> Result<Vec<Listed>, DbError> {
        let rows = sqlx::query(
            "SELECT j.id, j.owner, j.name, j.image, j.image_digest, j.sha256, j.size, j.limits, \
             j.priority, j.snapshot, j.version, j.private, u.name AS owner_name \
             FROM jobs j JOIN users u ON u.id = j.owner \
             WHERE j.deleted_ms IS NULL AND (j.private = 0 OR j.owner = $1 OR $2 = 1) \
             AND ($3 IS NULL OR j.state = $3) AND ($4 IS NULL OR u.name = $4) \
             AND ($5 IS NULL OR j.image = $5) AND ($6 IS NULL OR j.id < $6) \
             ORDER BY j.id DESC LIMIT $7",
        )
        .bind(viewer.user.map_or(-1, |u| u.0 as i64))
        .bind(i64::from(viewer.admin))
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.owner.as_deref())
        .bind(filter.image.as_deref())
        .bind(filter.before.map(|b| b.0 as i64))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Listed {
                    job: crate::jobs::stored_job(r)?,
                    owner_name: r.try_get("owner_name")?,
                })
            })
            .collect()
    }

    /// A user's name.
    pub async fn user_name(&self, id: i64) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT name FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?)
    }
}
