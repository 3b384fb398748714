//! Consoles of attempts: while an attempt is live its console arrives in pieces at byte offsets,
//! kept as rows of `log_pieces` (so any server process can serve them), capped to the job's
//! head and rolling tail (`construir_api::log::ConsoleCap`). Once the attempt has ended its kept
//! bytes are compacted into one blob, named on the attempt's row in the same transaction that
//! deletes its pieces: a reader finds them in exactly one place, and a server killed half-way
//! leaves pieces that the next compaction (at restart, by the sweeper) takes again.

use crate::blobs::{BlobError, Blobs};
use crate::db::{Db, DbError};
use construir_api::log::{ConsoleCap, ConsolePlan, ReadPart, dropped_marker};
use construir_api::types::{AttemptId, JobId};
use sqlx::Row;

/// A piece that continues the row before it is merged into that row while the row stays within
/// this many bytes: a runner sending its console a byte at a time makes rows of this size, not
/// a row per byte; and small, because each merge rewrites the row (an honest runner sends what
/// is new every second: a few hundred bytes should not cost a 64 KiB rewrite each time).
pub const PIECE_ROW_BYTES: usize = 8 << 10;

/// The most rows one read fetches (a reader given fewer bytes than it asked for goes on from
/// right after the last byte it got).
pub const READ_ROWS: i64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl From<sqlx::Error> for LogError {
    fn from(e: sqlx::Error) -> Self {
        LogError::Db(e.into())
    }
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// Another piece was stored first: plan again from the new size.
    Raced,
    /// The console is closed (compacted, or deleted by retention): the attempt has ended.
    Closed,
}

/// Where an attempt's console is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleHome {
    Pieces,
    Blob {
        sha256: String,
        size: u64,
    },
    /// Retention deleted it at this time.
    Deleted {
        at_ms: i64,
    },
}

/// A reader's answer: bytes (with drop markers), the offset to ask for next, what the server has
/// received in all, and where the bytes came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleRead {
    pub bytes: Vec<u8>,
    pub next: u64,
    pub received: u64,
    pub home: ConsoleHome,
}

/// An ended attempt whose console is still in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncompacted {
    pub attempt: AttemptId,
    pub job: JobId,
    /// Tells two rows apart that had the same id: a claim that lost drops its row, and the
    /// next claim's row may get the id again.
    pub token_sha256: String,
}

fn home(sha: Option<String>, size: Option<i64>, deleted: Option<i64>) -> ConsoleHome {
    match (deleted, sha) {
        (Some(at_ms), _) => ConsoleHome::Deleted { at_ms },
        (None, Some(sha256)) => ConsoleHome::Blob {
            sha256,
            size: size.unwrap_or(0) as u64,
        },
        (None, None) => ConsoleHome::Pieces,
    }
}

impl Db {
    /// Console bytes received so far for an attempt (all of them, kept or not).
    pub async fn console_size(&self, attempt: AttemptId) -> Result<u64, DbError> {
        let row = sqlx::query("SELECT console_size FROM attempts WHERE id = $1")
            .bind(attempt.0 as i64)
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }

    /// Stores a piece as `plan` says (planned from `expected` received bytes under `cap`): its
    /// head and tail parts, and forgets the tail bytes the rolling tail left behind; only if the
    /// attempt still has `expected` bytes and an open console (one writer wins; the other plans
    /// again).
    pub async fn append_log(
        &self,
        attempt: AttemptId,
        cap: ConsoleCap,
        expected: u64,
        plan: &ConsolePlan,
        piece: &[u8],
    ) -> Result<Appended, DbError> {
        let a = attempt.0 as i64;
        let mut tx = self.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE attempts SET console_size = $1 WHERE id = $2 AND console_size = $3 \
             AND console_sha256 IS NULL AND console_deleted_ms IS NULL",
        )
        .bind(plan.next_offset as i64)
        .bind(a)
        .bind(expected as i64)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            let row = sqlx::query(
                "SELECT console_sha256, console_deleted_ms FROM attempts WHERE id = $1",
            )
            .bind(a)
            .fetch_optional(&mut *tx)
            .await?;
            let closed = match row {
                Some(r) => {
                    r.try_get::<Option<String>, _>(0)?.is_some()
                        || r.try_get::<Option<i64>, _>(1)?.is_some()
                }
                None => true,
            };
            return Ok(if closed {
                Appended::Closed
            } else {
                Appended::Raced
            });
        }
        if let Some(cut) = plan.forget_before {
            // Tail rows never reach into the head (a write is split at the head's end), so
            // rows from `cap.head` on are the tail's.
            sqlx::query(
                "DELETE FROM log_pieces WHERE attempt_id = $1 AND start_offset >= $2 \
                 AND start_offset + LENGTH(bytes) <= $3",
            )
            .bind(a)
            .bind(cap.head as i64)
            .bind(cut as i64)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE log_pieces SET bytes = SUBSTR(bytes, CAST($3 - start_offset + 1 AS INTEGER)), \
                 start_offset = $3 WHERE attempt_id = $1 AND start_offset >= $2 \
                 AND start_offset < $3 AND start_offset + LENGTH(bytes) > $3",
            )
            .bind(a)
            .bind(cap.head as i64)
            .bind(cut as i64)
            .execute(&mut *tx)
            .await?;
        }
        for w in plan.writes.iter().filter(|w| w.len > 0) {
            let bytes = &piece[w.skip as usize..(w.skip + w.len) as usize];
            // Onto the row that ends where this starts, on the same side of the head's end
            // (tail rows never reach into the head: the rolling tail forgets by rows from
            // `cap.head` on), while that row stays small. In this transaction, whose first
            // statement wrote: nobody changes the row between this read and the write.
            let side = if w.at >= cap.head { cap.head } else { 0 };
            let before = sqlx::query(
                "SELECT start_offset, bytes FROM log_pieces WHERE attempt_id = $1 \
                 AND start_offset < $2 AND start_offset >= $3 \
                 ORDER BY start_offset DESC LIMIT 1",
            )
            .bind(a)
            .bind(w.at as i64)
            .bind(side as i64)
            .fetch_optional(&mut *tx)
            .await?;
            let merge = match before {
                Some(r) => {
                    let start = r.try_get::<i64, _>(0)?;
                    let mut row: Vec<u8> = r.try_get(1)?;
                    (start as u64 + row.len() as u64 == w.at
                        && row.len() + bytes.len() <= PIECE_ROW_BYTES)
                        .then(|| {
                            row.extend_from_slice(bytes);
                            (start, row)
                        })
                }
                None => None,
            };
            match merge {
                Some((start, row)) => {
                    sqlx::query(
                        "UPDATE log_pieces SET bytes = $3 WHERE attempt_id = $1 \
                         AND start_offset = $2",
                    )
                    .bind(a)
                    .bind(start)
                    .bind(row)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    sqlx::query(
                        "INSERT INTO log_pieces (attempt_id, start_offset, bytes) \
                         VALUES ($1, $2, $3)",
                    )
                    .bind(a)
                    .bind(w.at as i64)
                    .bind(bytes.to_vec())
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(Appended::Stored)
    }

    /// Stored piece bytes `[from, to)` of an attempt, at most `max` of them from at most
    /// [`READ_ROWS`] rows, appended to `out`; the offset reached (right after the last byte
    /// appended: a reader stopped short by the row limit goes on from there).
    async fn read_pieces(
        conn: &mut sqlx::AnyConnection,
        attempt: AttemptId,
        from: u64,
        to: u64,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64, DbError> {
        let budget = max.saturating_sub(out.len()) as u64;
        let to = to.min(from.saturating_add(budget));
        let rows = sqlx::query(
            "SELECT start_offset, bytes FROM log_pieces WHERE attempt_id = $1 \
             AND start_offset + LENGTH(bytes) > $2 AND start_offset < $3 ORDER BY start_offset \
             LIMIT $4",
        )
        .bind(attempt.0 as i64)
        .bind(from as i64)
        .bind(to as i64)
        .bind(READ_ROWS)
        .fetch_all(&mut *conn)
        .await?;
        let mut at = from;
        for r in rows {
            let start = r.try_get::<i64, _>(0)? as u64;
            let bytes: Vec<u8> = r.try_get(1)?;
            if start > at {
                tracing::warn!("attempt {attempt}: console bytes {at}..{start} are missing");
                break;
            }
            let skip = ((at - start) as usize).min(bytes.len());
            let take = (bytes.len() - skip).min((to - at) as usize);
            out.extend_from_slice(&bytes[skip..skip + take]);
            at += take as u64;
            if at >= to {
                break;
            }
        }
        Ok(at)
    }

    /// Ended attempts whose consoles are still in pieces (or not yet compacted at all), oldest
    /// first. The live attempt of a running job is left out here; whether an attempt of a
    /// queued job has ended is for the caller to check in the job's snapshot.
    pub async fn uncompacted(&self, limit: i64) -> Result<Vec<Uncompacted>, DbError> {
        let rows = sqlx::query(
            "SELECT a.id, a.job_id, a.token_sha256 FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.console_sha256 IS NULL AND a.console_deleted_ms IS NULL \
             AND (j.state <> 'running' OR a.id < (SELECT MAX(b.id) FROM attempts b \
             WHERE b.job_id = a.job_id)) ORDER BY a.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Uncompacted {
                    attempt: AttemptId(r.try_get::<i64, _>(0)? as u64),
                    job: JobId(r.try_get::<i64, _>(1)? as u64),
                    token_sha256: r.try_get(2)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}

/// Console bytes of an attempt for a reader at `from` (the runner's offsets), at most about
/// `max` of them: kept bytes in order, with a marker where the cap dropped some; from the pieces
/// while the attempt runs, from its blob once compacted.
pub async fn read_console(
    db: &Db,
    blobs: &Blobs,
    attempt: AttemptId,
    cap: ConsoleCap,
    from: u64,
    max: usize,
) -> Result<ConsoleRead, LogError> {
    // One read transaction: the size, the console's home and the pieces as one moment saw them
    // (an append or a compaction between two looks cannot mix two states).
    let mut tx = db.pool().begin().await?;
    let row = sqlx::query(
        "SELECT console_size, console_sha256, console_blob_size, console_deleted_ms \
         FROM attempts WHERE id = $1",
    )
    .bind(attempt.0 as i64)
    .fetch_one(&mut *tx)
    .await?;
    let received = row.try_get::<i64, _>(0)? as u64;
    let home = home(row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
    let layout = cap.layout(received);
    let (parts, end) = layout.read_from(from);
    let mut bytes = Vec::new();
    let mut next = from;
    match &home {
        ConsoleHome::Deleted { .. } => {
            next = end;
        }
        ConsoleHome::Pieces | ConsoleHome::Blob { .. } => {
            for part in parts {
                match part {
                    ReadPart::Dropped(n) => {
                        bytes.extend_from_slice(dropped_marker(n).as_bytes());
                        next += n;
                    }
                    ReadPart::Stored { from: a, to } => {
                        let reached = match &home {
                            ConsoleHome::Blob { sha256, .. } => {
                                let budget = max.saturating_sub(bytes.len()) as u64;
                                let to = to.min(a.saturating_add(budget));
                                let got = blobs
                                    .read_range(sha256, layout.packed(a)..layout.packed(to))
                                    .await?;
                                bytes.extend_from_slice(&got);
                                a + got.len() as u64
                            }
                            _ => Db::read_pieces(&mut tx, attempt, a, to, max, &mut bytes).await?,
                        };
                        next = reached;
                        if reached < to {
                            break;
                        }
                    }
                }
                if bytes.len() >= max {
                    break;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(ConsoleRead {
        bytes,
        next: next.max(from),
        received,
        home,
    })
}

/// Compacts an ended attempt's console into one blob: its kept bytes streamed from the pieces
/// into a temporary file, published, then, in one transaction, the blob named on the attempt
/// (only if the console is still the one read) and the pieces deleted. Killed at any point the
/// pieces are still there (or already gone with the blob named): doing it again is safe, and an
/// equal blob is stored once. Returns the blob's digest.
pub async fn compact(
    db: &Db,
    blobs: &Blobs,
    attempt: AttemptId,
    cap: ConsoleCap,
) -> Result<Option<String>, LogError> {
    for _ in 0..10 {
        let row = sqlx::query(
            "SELECT console_size, console_sha256, console_deleted_ms FROM attempts WHERE id = $1",
        )
        .bind(attempt.0 as i64)
        .fetch_optional(db.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if let Some(sha) = row.try_get::<Option<String>, _>(1)? {
            return Ok(Some(sha));
        }
        if row.try_get::<Option<i64>, _>(2)?.is_some() {
            return Ok(None);
        }
        let received = row.try_get::<i64, _>(0)? as u64;
        let written = write_pieces(db, blobs, attempt).await?;
        let expected = cap.layout(received).kept();
        if written.size != expected {
            // Not the bytes the layout says: a race with a last append (the check below sees
            // it) or pieces lost before; what is there is kept either way.
            tracing::warn!(
                "attempt {attempt}: {} console bytes in pieces, {expected} expected",
                written.size
            );
        }
        blobs.publish(&written).await?;
        let mut tx = db.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE attempts SET console_sha256 = $1, console_blob_size = $2 WHERE id = $3 \
             AND console_size = $4 AND console_sha256 IS NULL AND console_deleted_ms IS NULL",
        )
        .bind(&written.sha256)
        .bind(written.size as i64)
        .bind(attempt.0 as i64)
        .bind(received as i64)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            sqlx::query("DELETE FROM log_pieces WHERE attempt_id = $1")
                .bind(attempt.0 as i64)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::debug!(
                "attempt {attempt}: console compacted into {} ({} bytes)",
                written.sha256,
                written.size
            );
            return Ok(Some(written.sha256.clone()));
        }
        // A last piece came in between, or another server compacted it: look again. The blob
        // published for nothing is an orphan, collected once old.
    }
    Err(LogError::Db(DbError::Refused(format!(
        "attempt {attempt}: its console kept changing during compaction"
    ))))
}

/// The attempt's pieces, in order, into a temporary blob file.
async fn write_pieces(
    db: &Db,
    blobs: &Blobs,
    attempt: AttemptId,
) -> Result<crate::blobs::Received, LogError> {
    let mut writer = blobs.writer().await?;
    let mut after = -1i64;
    loop {
        // A page at a time: a console of tens of MiB is never held whole in memory (rows are
        // at most a piece, or a merged row of PIECE_ROW_BYTES).
        let rows = sqlx::query(
            "SELECT start_offset, bytes FROM log_pieces WHERE attempt_id = $1 \
             AND start_offset > $2 ORDER BY start_offset LIMIT 16",
        )
        .bind(attempt.0 as i64)
        .bind(after)
        .fetch_all(db.pool())
        .await?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            after = r.try_get::<i64, _>(0)?;
            let bytes: Vec<u8> = r.try_get(1)?;
            writer.write(&bytes).await?;
        }
    }
    Ok(writer.finish().await?)
}
