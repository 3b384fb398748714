//! An operator's actions: deleting a job (with every name it gives to blobs), banning a user
//! (with their runners) or a runner, and setting a password from the command line
//! (`construir-server user add|password`).
//!
//! A deleted job stays as a tombstone: its row (its id is never reused, its attempts' rows stay
//! whole for the state machine and the counts), renamed [`DELETED_NAME`], its snapshot ended
//! and its reason replaced, `deleted_ms` set. Every view and the website's list treat it as a
//! job that does not exist ([`crate::access::seen_job`], [`crate::listing`]).
//!
//! Deletion survives a kill at any point. It cancels the job first through the state machine (a
//! step of its own, committed: a kill after it leaves a canceled job, and deleting it again
//! finishes). Then ONE transaction, conditional on the job's version, writes the tombstone
//! (every attempt ended, none left to deliver even late), removes the console pieces and
//! unnames the job file, outputs, output indexes and consoles as retention does: either all of
//! it is stored or none. Only then is the deletion acknowledged. The blobs are removed after
//! the commit when they are past the orphan grace and no other job names them; the rest
//! (published within the last hour, or left by a kill right after the commit) are orphans that
//! the housekeeping's collection removes (`retention::collect_orphans`: a blob no row names,
//! last published over [`crate::retention::ORPHAN_GRACE`] ago, at the server's start and every
//! tenth housekeeping round, so within about ten minutes of the grace's end).

use crate::accounts::{MAX_PASSWORD, MIN_PASSWORD};
use crate::db::{Db, DbError, now_ms};
use crate::retention;
use crate::service::{ApplyError, Shared, Topic};
use construir_api::state::{Event, JobSnapshot};
use construir_api::types::{AttemptState, JobId, JobState, RunnerId};
use sqlx::Row;

/// What a deleted job's name becomes.
pub const DELETED_NAME: &str = "deleted";

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no job {0}")]
    NoJob(JobId),
    #[error("job {0} kept changing under the deletion: try again")]
    Contended(JobId),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for DeleteError {
    fn from(e: sqlx::Error) -> Self {
        DeleteError::Db(e.into())
    }
}

/// What deleting a job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Deleted by this call: the blobs it named (distinct digests), and how many of them are
    /// gone already (the rest are other jobs', or orphans the housekeeping collects).
    Deleted { named: usize, gone: usize },
    /// It had been deleted before, at this time.
    Gone { at_ms: i64 },
}

/// `s` as a deleted job's: ended (canceled, if it had not ended), every attempt that could
/// still deliver something (a live one, or a lapsed one within its late window) canceled, the
/// reason `reason`. Nothing is left for a runner to send: every attempt call is refused.
pub fn tombstone(s: &JobSnapshot, now_ms: u64, reason: String) -> JobSnapshot {
    let mut t = s.clone();
    for a in &mut t.attempts {
        let may_deliver =
            a.state.is_live() || (a.state == AttemptState::Expired && a.report.is_none());
        if may_deliver {
            a.state = AttemptState::Canceled;
            a.why = "the job was deleted".into();
            a.ended_ms = a.ended_ms.or(Some(now_ms));
            a.cancel_requested = false;
        }
    }
    if !t.state.is_terminal() {
        t.state = JobState::Canceled;
        t.ended_ms = Some(now_ms);
    }
    t.reason = reason;
    t.cancel_requested = false;
    t.retry_not_before_ms = None;
    t
}

/// Deletes job `id` (see the module's rules), by admin `by` (named in the log and the
/// tombstone's reason).
pub async fn delete_job(app: &Shared, id: JobId, by: &str) -> Result<Deletion, DeleteError> {
    if let Some(at_ms) = app.db.job_deleted_at(id).await? {
        return Ok(Deletion::Gone { at_ms });
    }
    // Through the state machine first: the runners holding it are told, its waiters woken. An
    // ended job refuses (nothing to do); a running one stays running until its runner stops,
    // which the tombstone below does not wait for.
    match app.apply(id, |_| Event::Cancel).await {
        Ok(_) | Err(ApplyError::Refused(_)) | Err(ApplyError::Contended) => {}
        Err(ApplyError::NoJob) => return Err(DeleteError::NoJob(id)),
        Err(ApplyError::Db(e)) => return Err(e.into()),
    }
    for _ in 0..20 {
        let Some(job) = app.db.load_job(id).await? else {
            return Err(DeleteError::NoJob(id));
        };
        let now = now_ms();
        let reason = format!("deleted by {by} at {}", retention::utc(now));
        let t = tombstone(&job.snapshot, now as u64, reason);
        let snapshot = serde_json::to_string(&t)
            .map_err(|e| DbError::Refused(format!("a snapshot as JSON: {e}")))?;
        let j = id.0 as i64;
        let mut tx = app.db.pool().begin().await?;
        // The first statement writes, so SQLite takes the write lock here (see retention's
        // `retire_job`); only on the version read, as every snapshot write.
        let marked = sqlx::query(
            "UPDATE jobs SET deleted_ms = $1, name = $2, snapshot = $3, state = $4, wanted = 0, \
             next_deadline_ms = NULL, live_runner = NULL, live_started = NULL, \
             file_deleted_ms = COALESCE(file_deleted_ms, $1), retention_noted = 1, \
             version = version + 1 WHERE id = $5 AND version = $6 AND deleted_ms IS NULL",
        )
        .bind(now)
        .bind(DELETED_NAME)
        .bind(&snapshot)
        .bind(t.state.as_str())
        .bind(j)
        .bind(job.version)
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() != 1 {
            // Written meanwhile (a runner's step, or another deletion): look again.
            tx.rollback().await?;
            if let Some(at_ms) = app.db.job_deleted_at(id).await? {
                return Ok(Deletion::Gone { at_ms });
            }
            continue;
        }
        // Retention's unnaming, and the attempts' live marks with the ended snapshot (what
        // claims count; `store_job_within` keeps them so for every other write).
        let (attempts, mut named) = retention::unname_attempts(&mut tx, id, now).await?;
        named.push(job.facts.sha256.clone());
        sqlx::query("UPDATE attempts SET live = 0, alone = 0 WHERE job_id = $1")
            .bind(j)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!("job {id} deleted by {by}");
        // Whoever follows the job or one of its consoles looks again, and finds it gone.
        app.wake(Topic::Job(id));
        for a in &attempts {
            app.wake(Topic::Console(*a));
        }
        named.sort();
        named.dedup();
        let gone = remove_unnamed(app, &named, now).await;
        return Ok(Deletion::Deleted {
            named: named.len(),
            gone,
        });
    }
    Err(DeleteError::Contended(id))
}

/// Removes those of `shas` no row names and published before the orphan grace began, under
/// each one's name lock (as retention does); returns how many are gone. Errors are logged: the
/// orphan collection removes what is left.
async fn remove_unnamed(app: &Shared, shas: &[String], now: i64) -> usize {
    let mut gone = 0;
    for sha in shas {
        match retention::remove_unnamed(app, sha, now).await {
            Ok(true) => gone += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!("removing blob {sha} of a deleted job: {e}"),
        }
    }
    gone
}

#[derive(Debug, thiserror::Error)]
pub enum BanError {
    #[error("no user {0}")]
    NoUser(String),
    #[error("you cannot ban yourself")]
    Yourself,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What banning a user came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Banned {
    /// False if they were banned already (their runners are revoked all the same).
    pub now: bool,
    /// Their runners, all revoked now.
    pub runners: usize,
}

/// Bans user `name` (not `by_user_id` themselves): their tokens and sessions stop working at
/// once, their runners are revoked and the jobs those took part in told. The runners are
/// revoked before the ban and once more after it (one registered in between): a kill at any
/// point leaves either a user not banned (banning again finishes), or a ban with every runner
/// revoked (the housekeeping tells their jobs what a kill left untold).
pub async fn ban_user(app: &Shared, name: &str, by_user_id: i64) -> Result<Banned, BanError> {
    let account = app
        .db
        .account(name)
        .await?
        .ok_or_else(|| BanError::NoUser(name.to_string()))?;
    if account.id == by_user_id {
        return Err(BanError::Yourself);
    }
    let mut runners = revoke_all_of(app, account.id).await?;
    let now = app.db.ban_user(account.id).await?;
    for r in revoke_all_of(app, account.id).await? {
        if !runners.contains(&r) {
            runners.push(r);
        }
    }
    tracing::info!("user {name} banned; {} runners revoked", runners.len());
    for r in &runners {
        if let Err(e) = crate::runners::tell_revoked(app, *r).await {
            tracing::warn!("telling the jobs of revoked runner {r}: {e:?}");
        }
    }
    Ok(Banned {
        now,
        runners: runners.len(),
    })
}

async fn revoke_all_of(app: &Shared, user_id: i64) -> Result<Vec<RunnerId>, DbError> {
    let mut runners: Vec<RunnerId> = app.db.runners_of(user_id).await?.into_iter().collect();
    runners.sort_by_key(|r| r.0);
    for r in &runners {
        app.db.revoke_runner(*r, None).await?;
    }
    Ok(runners)
}

/// Revokes `runner` (an admin's call: anyone's); false if there is no such runner.
pub async fn revoke_runner(app: &Shared, runner: RunnerId) -> Result<bool, DbError> {
    if !app.db.revoke_runner(runner, None).await? {
        return Ok(false);
    }
    tracing::info!("runner {runner} revoked by an admin");
    if let Err(e) = crate::runners::tell_revoked(app, runner).await {
        tracing::warn!("telling the jobs of revoked runner {runner}: {e:?}");
    }
    Ok(true)
}

/// A user as the admin page lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: i64,
    pub name: String,
    pub admin: bool,
    pub banned_ms: Option<i64>,
    pub created_ms: i64,
    /// Their jobs not deleted.
    pub jobs: i64,
    pub runners: i64,
}

impl Db {
    /// When job `id` was deleted, if it was.
    pub async fn job_deleted_at(&self, id: JobId) -> Result<Option<i64>, DbError> {
        let row = sqlx::query("SELECT deleted_ms FROM jobs WHERE id = $1")
            .bind(id.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<i64>, _>(0))
            .transpose()?
            .flatten())
    }

    /// The first `limit` users, oldest first, with how many jobs and runners each has.
    pub async fn users_overview(&self, limit: i64) -> Result<Vec<UserRow>, DbError> {
        let rows = sqlx::query(
            "SELECT u.id, u.name, u.admin, u.banned_ms, u.created_ms, \
             (SELECT COUNT(*) FROM jobs j WHERE j.owner = u.id AND j.deleted_ms IS NULL), \
             (SELECT COUNT(*) FROM runners r WHERE r.user_id = u.id) \
             FROM users u ORDER BY u.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UserRow {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    admin: r.try_get::<i64, _>(2)? != 0,
                    banned_ms: r.try_get(3)?,
                    created_ms: r.try_get(4)?,
                    jobs: r.try_get(5)?,
                    runners: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}

/// The password on one line of `input` (its line ending dropped, nothing else: spaces are the
/// password's).
pub fn read_password(input: &mut impl std::io::BufRead) -> Result<String, DbError> {
    let mut line = String::new();
    let n = input
        .read_line(&mut line)
        .map_err(|e| DbError::Refused(format!("reading the password from stdin: {e}")))?;
    if n == 0 {
        return Err(DbError::Refused(
            "no password on stdin: give it as one line".into(),
        ));
    }
    if let Some(l) = line.strip_suffix('\n') {
        line = l.strip_suffix('\r').unwrap_or(l).to_string();
    }
    Ok(line)
}

/// Sets user `name`'s password. `admin: Some(a)` (`user add`) makes the user if new and makes
/// them an admin or not; `None` (`user password`) takes an existing user and keeps whether
/// they are one. Returns what was done, for a person.
pub async fn set_user_password(
    db: &Db,
    name: &str,
    admin: Option<bool>,
    password: String,
) -> Result<String, DbError> {
    if password.len() < MIN_PASSWORD || password.len() > MAX_PASSWORD {
        return Err(DbError::Refused(format!(
            "that password has {} bytes: a password has {MIN_PASSWORD} to {MAX_PASSWORD}",
            password.len()
        )));
    }
    let before = db.account(name).await?;
    let (id, admin, made) = match (admin, &before) {
        (None, None) => {
            return Err(DbError::Refused(format!(
                "no user {name}: `user add {name}` makes one"
            )));
        }
        (None, Some(a)) => (a.id, a.admin, false),
        (Some(admin), _) => (db.ensure_user(name).await?, admin, before.is_none()),
    };
    let phc = tokio::task::spawn_blocking(move || crate::accounts::hash_password(&password))
        .await
        .map_err(|e| DbError::Refused(format!("hashing the password: {e}")))?
        .map_err(|e| DbError::Refused(e.to_string()))?;
    db.set_password(id, &phc, admin).await?;
    let was_admin = before.as_ref().is_some_and(|a| a.admin);
    let role = match (admin, was_admin) {
        (true, true) => "an admin",
        (true, false) if made => "an admin",
        (true, false) => "now an admin",
        (false, true) => "no longer an admin",
        (false, false) => "not an admin",
    };
    let mut done = format!(
        "user {name} {}: password set; {role}",
        if made { "made" } else { "already there" }
    );
    if before.is_some_and(|a| a.banned) {
        done.push_str(" (banned: they cannot sign in)");
    }
    Ok(done)
}
