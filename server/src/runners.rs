//! Runners as the storage knows them beyond registration: the public key a runner's statements
//! are checked with (bound at its first registration with one, never replaced), its standing
//! (how its votes fared against quorums), its revocation, and `GET /api/v1/runners`.

use crate::db::{Db, DbError, now_ms};
use crate::http::{Caller, Refusal};
use crate::service::Shared;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use construir_api::codes;
use construir_api::types::{RunnerId, RunnerView, Standing, UserId};
use sqlx::Row;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/runners", get(list))
        .route("/runners/{id}/revoke", post(revoke))
}

/// What binding a key to a runner came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBinding {
    /// The runner now has (or already had) this key.
    Bound,
    /// It is bound to another key: this one is refused.
    Other(String),
}

/// Raises the standing of the runners whose votes agreed with a quorum, lowers that of those
/// outvoted; inside the transaction that stores the quorum's step.
pub async fn record_standing(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    agreed: &[RunnerId],
    disagreed: &[RunnerId],
) -> Result<(), DbError> {
    // In the order of their ids: two quorums stored at once on PostgreSQL lock the runners'
    // rows in one order, and so never wait on each other in a circle.
    let mut votes: Vec<(RunnerId, bool)> = agreed.iter().map(|r| (*r, true)).collect();
    votes.extend(disagreed.iter().map(|r| (*r, false)));
    votes.sort();
    for (r, agreed) in votes {
        let update = match agreed {
            true => {
                "UPDATE runners SET agreed = agreed + 1, agreed_in_row = agreed_in_row + 1 \
                 WHERE id = $1"
            }
            false => {
                "UPDATE runners SET disagreed = disagreed + 1, agreed_in_row = 0 WHERE id = $1"
            }
        };
        sqlx::query(update)
            .bind(r.0 as i64)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Db {
    /// Binds `key` to `runner` unless it has one; a runner's key is never replaced (its
    /// statements are checked against it, and a stolen token must not bring its own key).
    pub async fn bind_runner_key(
        &self,
        runner: RunnerId,
        key: &str,
    ) -> Result<KeyBinding, DbError> {
        sqlx::query("UPDATE runners SET public_key = $1 WHERE id = $2 AND public_key IS NULL")
            .bind(key)
            .bind(runner.0 as i64)
            .execute(self.pool())
            .await?;
        Ok(match self.runner_key(runner).await? {
            Some(k) if k == key => KeyBinding::Bound,
            Some(k) => KeyBinding::Other(k),
            None => KeyBinding::Other(String::new()),
        })
    }

    /// How many of `runner`'s votes in a row agreed with a quorum (0 for an unknown runner).
    pub async fn agreed_in_row(&self, runner: RunnerId) -> Result<u64, DbError> {
        let row = sqlx::query("SELECT agreed_in_row FROM runners WHERE id = $1")
            .bind(runner.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .map_or(0, |n| n.max(0) as u64))
    }

    /// Whether `runner` holds an unended job alone, or a vote it cast alone there is being
    /// checked (adaptive replication).
    pub async fn holds_alone(&self, runner: RunnerId) -> Result<bool, DbError> {
        let row = sqlx::query("SELECT 1 FROM attempts WHERE runner_id = $1 AND alone = 1 LIMIT 1")
            .bind(runner.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }

    /// Whether `runner` has been revoked.
    pub async fn runner_revoked(&self, runner: RunnerId) -> Result<bool, DbError> {
        let row = sqlx::query("SELECT revoked_ms FROM runners WHERE id = $1")
            .bind(runner.0 as i64)
            .fetch_optional(self.pool())
            .await?;
        Ok(row
            .map(|r| r.try_get::<Option<i64>, _>(0))
            .transpose()?
            .flatten()
            .is_some())
    }

    /// Revokes `runner` (only `owner`'s, unless `owner` is none: an admin); false if there is
    /// no such runner of theirs.
    pub async fn revoke_runner(
        &self,
        runner: RunnerId,
        owner: Option<UserId>,
    ) -> Result<bool, DbError> {
        let done = sqlx::query(
            "UPDATE runners SET revoked_ms = COALESCE(revoked_ms, $1) \
             WHERE id = $2 AND ($3 < 0 OR user_id = $3)",
        )
        .bind(now_ms())
        .bind(runner.0 as i64)
        .bind(owner.map_or(-1, |o| o.0 as i64))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The unended jobs in which `runner` has an attempt.
    pub async fn unended_jobs_of_runner(
        &self,
        runner: RunnerId,
    ) -> Result<Vec<construir_api::types::JobId>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT a.job_id FROM attempts a JOIN jobs j ON j.id = a.job_id \
             WHERE a.runner_id = $1 AND j.state IN ('queued', 'running')",
        )
        .bind(runner.0 as i64)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(construir_api::types::JobId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Revoked runners with attempts in unended jobs.
    pub async fn revoked_with_unended_jobs(&self) -> Result<Vec<RunnerId>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.id FROM runners r JOIN attempts a ON a.runner_id = r.id \
             JOIN jobs j ON j.id = a.job_id \
             WHERE r.revoked_ms IS NOT NULL AND j.state IN ('queued', 'running') LIMIT 100",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok(RunnerId(r.try_get::<i64, _>(0)? as u64)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }

    /// Every runner, oldest first, with its owner's name and its standing.
    pub async fn list_runners(&self) -> Result<Vec<RunnerView>, DbError> {
        let rows = sqlx::query(
            "SELECT r.id, r.user_id, u.name, r.name, r.registered_ms, r.last_seen_ms, \
             r.public_key, r.agreed_in_row, r.agreed, r.disagreed, r.revoked_ms \
             FROM runners r JOIN users u ON u.id = r.user_id ORDER BY r.id LIMIT 10000",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RunnerView {
                    id: RunnerId(r.try_get::<i64, _>(0)? as u64),
                    owner: UserId(r.try_get::<i64, _>(1)? as u64),
                    owner_name: r.try_get(2)?,
                    name: r.try_get(3)?,
                    registered_ms: r.try_get::<i64, _>(4)? as u64,
                    last_seen_ms: r.try_get::<i64, _>(5)? as u64,
                    public_key: r.try_get(6)?,
                    standing: Standing {
                        agreed_in_row: r.try_get::<i64, _>(7)? as u64,
                        agreed: r.try_get::<i64, _>(8)? as u64,
                        disagreed: r.try_get::<i64, _>(9)? as u64,
                    },
                    revoked: r.try_get::<Option<i64>, _>(10)?.is_some(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(DbError::from)
    }
}

#[utoipa::path(get, path = "/api/v1/runners", tag = "runners",
    responses((status = 200, description = "every runner, with its standing", body = [RunnerView]), (status = 401, description = "no or bad token", body = construir_api::ApiError)),
    security(("token" = [])))]
pub async fn list(
    State(app): State<Shared>,
    _caller: Caller,
) -> Result<Json<Vec<RunnerView>>, Refusal> {
    Ok(Json(app.db.list_runners().await?))
}

#[utoipa::path(post, path = "/api/v1/runners/{id}/revoke", tag = "runners", params(("id" = u64, Path, description = "the runner")),
    responses((status = 200, description = "revoked: it claims and reports nothing more, and results it took part in say so"), (status = 404, description = "no such runner of the caller's", body = construir_api::ApiError), (status = 401, description = "no or bad token", body = construir_api::ApiError)),
    security(("token" = [])))]
pub async fn revoke(
    State(app): State<Shared>,
    caller: Caller,
    Path(id): Path<u64>,
) -> Result<Json<serde_json::Value>, Refusal> {
    // A person's call: a runner token (which sits on the volunteer's machine, and may be what
    // was stolen) cannot revoke runners.
    if caller.0.role == "runner" {
        return Err(Refusal::new(
            codes::FORBIDDEN,
            "a runner token cannot revoke runners: use a submitter or admin token of the owner",
        ));
    }
    let owner = (caller.0.role != "admin").then_some(UserId(caller.0.user_id as u64));
    if !app.db.revoke_runner(RunnerId(id), owner).await? {
        return Err(Refusal::new(
            codes::NOT_FOUND,
            format!("no runner {id} of yours"),
        ));
    }
    tracing::info!("runner {id} revoked by {}", caller.0.user);
    tell_revoked(&app, RunnerId(id)).await?;
    Ok(Json(serde_json::json!({"revoked": id})))
}

/// Tells every unended job that `runner` took part in that it was revoked (its live attempts
/// end, its votes stop counting). The housekeeping does it again for every revoked runner, so a
/// server killed half-way finishes it; a job told twice changes nothing the second time.
pub async fn tell_revoked(app: &Shared, runner: RunnerId) -> Result<(), Refusal> {
    for job in app.db.unended_jobs_of_runner(runner).await? {
        match app
            .apply(job, |_| construir_api::state::Event::RunnerRevoked {
                runner,
            })
            .await
        {
            Ok(_) | Err(crate::service::ApplyError::NoJob) => {}
            Err(e) => tracing::warn!("telling job {job} that runner {runner} was revoked: {e}"),
        }
    }
    Ok(())
}

/// [`tell_revoked`] for every revoked runner that has attempts in unended jobs.
pub async fn tell_all_revoked(app: &Shared) -> Result<(), DbError> {
    for runner in app.db.revoked_with_unended_jobs().await? {
        if let Err(e) = tell_revoked(app, runner).await {
            tracing::warn!("telling the jobs of revoked runner {runner}: {e:?}");
        }
    }
    Ok(())
}
