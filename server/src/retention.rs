//! Retention and orphan blobs. Outputs, consoles and job files of jobs that ended more than
//! `retention` ago are deleted; the job's record stays (its attempts keep their sizes and the
//! output's digest, the job its file's) and its reason says when they were deleted. Blobs no
//! row names — one published by an upload whose row a dead server never wrote, a console
//! compacted twice in a race — are removed once they are an hour old. Blobs are
//! content-addressed and shared by equal uploads: one is removed only when no row of any job
//! names it, looked at under the blob's name lock (`Blobs::remove_unless_fresh_or_named`; that
//! lock is this process's: servers sharing a data directory are not coordinated by it).

use crate::blobs::BlobError;
use crate::db::DbError;
use crate::service::App;
use construir_api::types::JobId;
use sqlx::Row;
use std::time::Duration;

/// A blob published less than this long ago is never removed by either pass: the row naming it
/// is written right after its publication (`Blobs::publish` marks an equal blob found there as
/// just published too), and this is far longer than that takes.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// Jobs looked at per query (the pass pages through all of them).
const PAGE: i64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl From<sqlx::Error> for RetentionError {
    fn from(e: sqlx::Error) -> Self {
        RetentionError::Db(e.into())
    }
}

/// Whether any row names blob `sha256`. Every column that holds a blob's digest is here: one
/// left out would have its blobs collected under it. Published images' rows (never deleted)
/// name their manifest, kernel and qcow2 blobs; `jobs.image_digest` is a manifest's sha256,
/// named by its `images` row.
pub async fn referenced(app: &App, sha256: &str) -> Result<bool, DbError> {
    let row = sqlx::query(
        "SELECT 1 FROM jobs WHERE sha256 = $1 AND file_deleted_ms IS NULL UNION ALL \
         SELECT 1 FROM attempts WHERE output_sha256 = $1 UNION ALL \
         SELECT 1 FROM attempts WHERE output_index_sha256 = $1 UNION ALL \
         SELECT 1 FROM attempts WHERE console_sha256 = $1 UNION ALL \
         SELECT 1 FROM images WHERE manifest_sha256 = $1 UNION ALL \
         SELECT 1 FROM images WHERE kernel_sha256 = $1 UNION ALL \
         SELECT 1 FROM images WHERE qcow2_sha256 = $1 LIMIT 1",
    )
    .bind(sha256)
    .fetch_optional(app.db.pool())
    .await?;
    Ok(row.is_some())
}

/// Removes `sha256` unless a row names it or it was published since the grace began, both
/// looked at under its name's lock (an upload of equal bytes either marked it first, or waits
/// and writes it anew). True if it is gone.
pub(crate) async fn remove_unnamed(
    app: &App,
    sha256: &str,
    now_ms: i64,
) -> Result<bool, RetentionError> {
    let fresh = now_ms - ORPHAN_GRACE.as_millis() as i64;
    app.blobs
        .remove_unless_fresh_or_named(sha256, fresh, async {
            Ok::<_, RetentionError>(referenced(app, sha256).await?)
        })
        .await
}

/// Inside `tx`: drops the console pieces of job `id`'s attempts and unnames every blob they
/// name (outputs, consoles, output indexes; an output's sha256 kept as deleted), the consoles
/// marked deleted at `now_ms`. The attempts, and the names they gave up.
pub(crate) async fn unname_attempts(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: JobId,
    now_ms: i64,
) -> Result<(Vec<construir_api::types::AttemptId>, Vec<String>), DbError> {
    let j = id.0 as i64;
    let rows = sqlx::query(
        "SELECT id, output_sha256, console_sha256, output_index_sha256 FROM attempts \
         WHERE job_id = $1",
    )
    .bind(j)
    .fetch_all(&mut **tx)
    .await?;
    let (mut attempts, mut unnamed) = (Vec::new(), Vec::new());
    for r in &rows {
        attempts.push(construir_api::types::AttemptId(
            r.try_get::<i64, _>(0)? as u64
        ));
        for column in 1..=3 {
            unnamed.extend(r.try_get::<Option<String>, _>(column)?);
        }
    }
    sqlx::query(
        "DELETE FROM log_pieces WHERE attempt_id IN \
         (SELECT id FROM attempts WHERE job_id = $1)",
    )
    .bind(j)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE attempts SET \
         deleted_output_sha256 = COALESCE(output_sha256, deleted_output_sha256), \
         output_sha256 = NULL, console_sha256 = NULL, output_index_sha256 = NULL, \
         console_deleted_ms = COALESCE(console_deleted_ms, $2) WHERE job_id = $1",
    )
    .bind(j)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok((attempts, unnamed))
}

/// Deletes the outputs, consoles and job files of jobs that ended at or before
/// `now_ms - keep`. Returns how many jobs it did. Safe to stop at any point: a job is marked in
/// the same transaction that unnames its blobs, its reason written after (a job marked and not
/// noted is noted by the next pass), and a blob unnamed but not removed is an orphan, collected
/// later.
pub async fn apply_retention(
    app: &App,
    now_ms: i64,
    keep: Duration,
) -> Result<usize, RetentionError> {
    let cutoff = now_ms - keep.as_millis() as i64;
    let mut after = 0i64;
    let mut done = 0;
    loop {
        // Ended before the cutoff means created before it: a cheap filter; the snapshot's end
        // time decides.
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE retention_noted IS NULL \
             AND state NOT IN ('queued', 'running') \
             AND created_ms <= $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(cutoff)
        .bind(after)
        .bind(PAGE)
        .fetch_all(app.db.pool())
        .await?;
        if rows.is_empty() {
            return Ok(done);
        }
        for r in &rows {
            let id = r.try_get::<i64, _>(0)?;
            after = id;
            match retire_job(app, JobId(id as u64), cutoff, now_ms).await {
                Ok(true) => done += 1,
                Ok(false) => {}
                // One job's trouble must not stop the others'.
                Err(e) => tracing::warn!("retention of job {id}: {e}"),
            }
        }
    }
}

/// What a job's reason says once retention has done it.
const NOTE: &str = "output, console and job file deleted by retention at";

/// Retention of one job, if it ended at or before `cutoff`: true if this call unnamed its
/// blobs (a job done before and only noted now is not counted).
async fn retire_job(
    app: &App,
    id: JobId,
    cutoff: i64,
    now_ms: i64,
) -> Result<bool, RetentionError> {
    let Some(job) = app.db.load_job(id).await? else {
        return Ok(false);
    };
    let ended = job
        .snapshot
        .ended_ms
        .filter(|_| job.snapshot.state.is_terminal());
    if ended.is_none_or(|t| t as i64 > cutoff) {
        return Ok(false);
    }
    let j = id.0 as i64;
    let mut tx = app.db.pool().begin().await?;
    // The first statement writes: SQLite takes the write lock here (waiting for another writer,
    // as busy_timeout says) instead of at a later write after a read, where a write another
    // connection committed since that read fails the transaction at once (SQLITE_BUSY_SNAPSHOT).
    let marked = sqlx::query(
        "UPDATE jobs SET retention_ms = COALESCE(retention_ms, $2), file_deleted_ms = $2 \
         WHERE id = $1 AND file_deleted_ms IS NULL",
    )
    .bind(j)
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    let mut unnamed = Vec::new();
    let did = marked.rows_affected() == 1;
    if did {
        let file = sqlx::query("SELECT sha256 FROM jobs WHERE id = $1")
            .bind(j)
            .fetch_one(&mut *tx)
            .await?;
        unnamed.push(file.try_get::<String, _>(0)?);
        unnamed.extend(unname_attempts(&mut tx, id, now_ms).await?.1);
        tx.commit().await?;
    } else {
        // Done already (by another server, or a pass killed before its note).
        tx.rollback().await?;
    }
    // Only now, the deletion committed, the record says so (a reader who finds nothing knows
    // why); by the time stored with the mark.
    let at = sqlx::query("SELECT file_deleted_ms FROM jobs WHERE id = $1")
        .bind(j)
        .fetch_one(app.db.pool())
        .await?
        .try_get::<Option<i64>, _>(0)?
        .unwrap_or(now_ms);
    let note = format!("{NOTE} {}", utc(at));
    let mut noted = false;
    for _ in 0..5 {
        let Some(job) = app.db.load_job(id).await? else {
            return Ok(did);
        };
        // The note exactly as this pass writes it, at the end: a runner's words in the reason
        // (an abort's, a report's) cannot pass for it.
        if job.snapshot.reason.ends_with(&note) {
            noted = true;
            break;
        }
        let mut snapshot = job.snapshot.clone();
        snapshot.reason = format!("{}; {note}", snapshot.reason);
        // Written only on the version read, as every snapshot write.
        if app.db.store_job(id, job.version, &snapshot).await? {
            noted = true;
            break;
        }
    }
    // Kept busy by other writers: the next pass notes it (the mark above stays).
    if noted {
        sqlx::query("UPDATE jobs SET retention_noted = 1 WHERE id = $1")
            .bind(j)
            .execute(app.db.pool())
            .await?;
    }
    unnamed.sort();
    unnamed.dedup();
    for sha in unnamed {
        // An equal upload of another job keeps it.
        remove_unnamed(app, &sha, now_ms).await?;
    }
    if did {
        tracing::info!("job {id}: {note}");
    }
    Ok(did)
}

/// Removes blobs that no row names and that were published before `now_ms` minus the grace.
/// Returns how many.
pub async fn collect_orphans(app: &App, now_ms: i64) -> Result<usize, RetentionError> {
    let fresh = now_ms - ORPHAN_GRACE.as_millis() as i64;
    let mut removed = 0;
    for blob in app.blobs.list().await? {
        if blob.modified_ms >= fresh || referenced(app, &blob.sha256).await? {
            continue;
        }
        // Looked at again under the blob's lock right before removing: an equal upload may
        // have just published it, and its row may be committed by now.
        if remove_unnamed(app, &blob.sha256, now_ms).await? {
            tracing::info!("orphan blob {} ({} bytes) removed", blob.sha256, blob.size);
            removed += 1;
        }
    }
    // What publications cut short by a kill left beside the blobs.
    app.blobs
        .remove_stale_staging(crate::blobs::STAGING_AGE)
        .await?;
    Ok(removed)
}

/// What a reader of a console retention deleted is told, in at most `room` bytes (the offsets
/// it stands for: a reader's offset moves at least as far as the bytes it is given).
pub fn console_deleted_note(at_ms: i64, room: u64) -> String {
    construir_api::log::fit(
        room,
        &[
            format!(
                "[construir: this console was deleted by retention at {}]\n",
                utc(at_ms)
            ),
            "[construir: deleted by retention]\n".to_string(),
        ],
    )
}

/// `2026-12-01T19:40:12Z` (Unix ms, UTC).
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_told_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_154_012_345), "2026-12-01T19:40:12Z");
    }
}
