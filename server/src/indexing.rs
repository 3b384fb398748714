//! Indexing outputs (`construir_contract::archive::index`): once an output is recorded on its
//! attempt, it is read back in the background — never while its runner waits for the upload's
//! answer (a big output takes longer to decompress than a runner or a proxy waits) — and its
//! index stored as a JSON blob named on the attempt with its tree digest and entry count, or
//! the reason it has none. Two at a time in the whole server, each within limits tied to the
//! job's output size; a server killed meanwhile leaves the attempt unindexed, and the
//! housekeeping ([`catch_up`]) indexes it then.

use crate::jobs::OutputIndexed;
use crate::service::{ApplyError, Shared};
use construir_api::state::{Event, OutputTree};
use construir_api::types::{AttemptId, JobId};
use construir_contract::archive::{self, Limits};
use sqlx::Row;
use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock, Mutex};

/// Outputs indexed at a time (each is CPU-bound decompression on a blocking thread).
static INDEXING: LazyLock<Arc<tokio::sync::Semaphore>> =
    LazyLock::new(|| Arc::new(tokio::sync::Semaphore::new(2)));

/// Attempts being indexed in this process, by app (tests run many apps in one process).
static UNDER_WAY: Mutex<BTreeSet<(usize, u64)>> = Mutex::new(BTreeSet::new());

/// What indexing an output whose job allows `output_size` bytes may cost
/// ([`archive::index_limits`]: the runner signs a tree digest computed within the same).
pub fn limits_for(output_size: u64) -> Limits {
    archive::index_limits(output_size)
}

/// Indexes attempt `attempt`'s output `sha256` in the background.
pub fn spawn(app: &Shared, attempt: AttemptId, sha256: String, output_size: u64) {
    let app = app.clone();
    tokio::spawn(async move {
        if let Err(e) = index_stored(&app, attempt, &sha256, output_size).await {
            tracing::warn!("indexing the output of attempt {attempt}: {e}");
        }
    });
}

/// Indexes the recorded outputs that have no index yet (a server stopped while indexing them);
/// at most `limit` of them. Returns how many were indexed.
pub async fn catch_up(app: &Shared, limit: i64) -> Result<usize, IndexingError> {
    let mut done = 0;
    for (attempt, sha256, output_size) in app.db.unindexed_outputs(limit).await? {
        // One output's trouble (a missing blob) must not hold up the others'.
        match index_stored(app, attempt, &sha256, output_size).await {
            Ok(true) => done += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!("indexing the output of attempt {attempt}: {e}"),
        }
    }
    Ok(done)
}

#[derive(Debug, thiserror::Error)]
pub enum IndexingError {
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    #[error("{0}")]
    Failed(String),
}

/// Indexes one stored output and names the index on its attempt (only if the attempt still
/// has that output and no index). False if another task of this process is at it already.
async fn index_stored(
    app: &Shared,
    attempt: AttemptId,
    sha256: &str,
    output_size: u64,
) -> Result<bool, IndexingError> {
    let key = (Arc::as_ptr(app) as usize, attempt.0);
    if !UNDER_WAY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key)
    {
        return Ok(false);
    }
    let _under_way = Release(key);
    // Owned, and moved into the blocking work: the slot is free only when the work is done,
    // whatever happens to this task meanwhile.
    let permit = INDEXING
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| IndexingError::Failed("the server is stopping".into()))?;
    // From S3, a temporary copy (checked against its digest), removed when the index is made.
    let blob = app.blobs.as_file(sha256, false).await?;
    let limits = limits_for(output_size);
    let made = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let path = blob.path();
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read the stored output {}: {e}", path.display()))?;
        Ok::<_, String>(
            archive::index(std::io::BufReader::new(file), &limits).map(|index| {
                let json = serde_json::to_vec(&index);
                (index.tree_sha256, index.entries.len() as u64, json)
            }),
        )
    })
    .await
    .map_err(|e| IndexingError::Failed(format!("the indexing task failed: {e}")))?
    .map_err(IndexingError::Failed)?;
    let indexed = match made {
        Ok((tree, entries, json)) => {
            let json = json.map_err(|e| IndexingError::Failed(format!("the index: {e}")))?;
            let mut writer = app.blobs.writer().await?;
            writer.write(&json).await?;
            let stored = writer.finish().await?;
            // Published before the attempt names it; the collector's grace covers the gap.
            app.blobs.publish(&stored).await?;
            OutputIndexed {
                index_sha256: Some(stored.sha256),
                tree_sha256: Some(tree),
                entries: Some(entries),
                error: None,
            }
        }
        Err(e) => OutputIndexed {
            error: Some(format!(
                "the server could not index it (not an archive, or past the limits): {e}"
            )),
            ..OutputIndexed::default()
        },
    };
    app.db.set_output_index(attempt, sha256, &indexed).await?;
    tell_job(app, attempt).await?;
    Ok(true)
}

/// Tells the attempt's job what the index made of its output ([`Event::Indexed`]), once the
/// attempt has an index: the vote it completes is counted. Changes nothing when the job knows
/// it already, or has ended.
pub async fn tell_job(app: &Shared, attempt: AttemptId) -> Result<(), IndexingError> {
    let Some((job, tree)) = app.db.index_outcome(attempt).await? else {
        return Ok(());
    };
    match app
        .apply(job, |_| Event::Indexed {
            attempt,
            tree: tree.clone(),
        })
        .await
    {
        Ok(_) => {}
        Err(ApplyError::Refused(r)) => {
            tracing::warn!("attempt {attempt}'s index was not taken by job {job}: {r}");
        }
        Err(ApplyError::Db(e)) => return Err(e.into()),
        Err(e) => return Err(IndexingError::Failed(e.to_string())),
    }
    // Told (after the step is stored): a crash before this tells it again, which changes
    // nothing the second time.
    app.db.mark_told(attempt).await?;
    Ok(())
}

/// Tells the unended jobs the indexes of their attempts' outputs that a stopped server left
/// untold (indexed, and the server killed before the job heard); at most `limit`.
pub async fn tell_leftovers(app: &Shared, limit: i64) -> Result<(), IndexingError> {
    for attempt in app.db.indexed_of_unended(limit).await? {
        if let Err(e) = tell_job(app, attempt).await {
            tracing::warn!("telling the job of attempt {attempt} its index: {e}");
        }
    }
    Ok(())
}

impl crate::db::Db {
    /// The job of `attempt` and what its output's index gave, once it was indexed.
    pub async fn index_outcome(
        &self,
        attempt: AttemptId,
    ) -> Result<Option<(JobId, OutputTree)>, crate::db::DbError> {
        let row = sqlx::query(
            "SELECT job_id, output_tree_sha256, output_index_error FROM attempts WHERE id = $1",
        )
        .bind(attempt.0 as i64)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let job = JobId(r.try_get::<i64, _>(0)? as u64);
        let tree: Option<String> = r.try_get(1)?;
        let error: Option<String> = r.try_get(2)?;
        Ok(match (tree, error) {
            (Some(t), _) => Some((job, OutputTree::Digest(t))),
            (None, Some(_)) => Some((job, OutputTree::Unreadable)),
            (None, None) => None,
        })
    }

    /// Notes that `attempt`'s job knows what its output's index gave.
    pub async fn mark_told(&self, attempt: AttemptId) -> Result<(), crate::db::DbError> {
        sqlx::query("UPDATE attempts SET told = 1 WHERE id = $1")
            .bind(attempt.0 as i64)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Indexed attempts of jobs that have not ended whose job was not told of the index (a
    /// server killed between the two).
    pub async fn indexed_of_unended(
        &self,
        limit: i64,
    ) -> Result<Vec<AttemptId>, crate::db::DbError> {
        let rows = sqlx::query(
            "SELECT a.id FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE j.state IN ('queued', 'running') AND a.told = 0 \
             AND (a.output_tree_sha256 IS NOT NULL OR a.output_index_error IS NOT NULL) \
             ORDER BY a.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(AttemptId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(crate::db::DbError::from)
    }
}

struct Release((usize, u64));

impl Drop for Release {
    fn drop(&mut self) {
        UNDER_WAY
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decompression_budget_follows_the_output_size_within_bounds() {
        assert_eq!(limits_for(1 << 20).max_stream, 64 << 20, "at least 64 MiB");
        assert_eq!(limits_for(16 << 20).max_stream, 512 << 20);
        assert_eq!(limits_for(1 << 40).max_stream, 8 << 30, "at most 8 GiB");
        assert_eq!(limits_for(u64::MAX).max_stream, 8 << 30);
    }
}
