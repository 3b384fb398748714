//! Applying the state machine: read a job, compute the step (construir_api::state::step, pure),
//! write the new snapshot only if nobody wrote the job meanwhile, then carry out the effects
//! (wake the runners' long polls, answer waiting clients). Commit, then acknowledge: a caller
//! hears of a step only once it is stored. The sweeper ticks jobs whose deadlines passed.

use crate::blobs::Blobs;
use crate::db::{Db, DbError, now_ms};
use crate::jobs::StoredJob;
use crate::settings::Settings;
use construir_api::state::{Effect, Event, Refusal as StepRefusal, Settings as StepSettings, step};
use construir_api::types::JobId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// What every handler shares.
pub struct App {
    pub settings: Settings,
    pub db: Db,
    pub blobs: Blobs,
    /// Woken when a job may have become claimable.
    pub work: Notify,
    /// Woken when any job or console changed (waiting clients look again).
    pub changed: Notify,
}

pub type Shared = Arc<App>;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no such job")]
    NoJob,
    #[error(transparent)]
    Refused(#[from] StepRefusal),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the job kept changing under this request; try again")]
    Contended,
}

impl App {
    pub fn new(settings: Settings, db: Db, blobs: Blobs) -> Shared {
        Arc::new(App {
            settings,
            db,
            blobs,
            work: Notify::new(),
            changed: Notify::new(),
        })
    }

    /// The state machine's timing rules from the server's settings.
    pub fn step_settings(&self) -> StepSettings {
        StepSettings {
            lease_ms: self.settings.lease.as_millis() as u64,
            accept_window_ms: self.settings.accept_window.as_millis() as u64,
            ..StepSettings::DEFAULT
        }
    }

    /// Applies the event `make(job)` to job `id` and stores the result; returns the job as
    /// stored and the step's effects.
    pub async fn apply(
        &self,
        id: JobId,
        make: impl Fn(&StoredJob) -> Event,
    ) -> Result<(StoredJob, Vec<Effect>), ApplyError> {
        for _ in 0..20 {
            let mut job = self.db.load_job(id).await?.ok_or(ApplyError::NoJob)?;
            let event = make(&job);
            let t = step(
                &job.snapshot,
                &self.step_settings(),
                now_ms() as u64,
                &event,
            )?;
            if t.job == job.snapshot {
                return Ok((job, t.effects));
            }
            if self.db.store_job(id, job.version, &t.job).await? {
                job.snapshot = t.job;
                job.version += 1;
                self.carry_out(&t.effects);
                return Ok((job, t.effects));
            }
        }
        Err(ApplyError::Contended)
    }

    /// The effects that are not stores (those are the snapshot write itself).
    pub fn carry_out(&self, effects: &[Effect]) {
        if effects.iter().any(|e| matches!(e, Effect::WakeRunners)) {
            self.work.notify_waiters();
        }
        self.changed.notify_waiters();
    }

    /// Ticks every job whose deadline has passed: leases lapse, accept windows close, back-offs
    /// end, the unclaimed expire.
    pub async fn sweep(&self) -> Result<usize, DbError> {
        let due = self.db.due(now_ms() as u64).await?;
        let mut changed = 0;
        for id in due {
            // One job's trouble must not stop the others' ticks.
            match self.apply(id, |_| Event::Tick).await {
                Ok(_) => changed += 1,
                Err(e) => tracing::warn!("tick of job {id}: {e}"),
            }
        }
        Ok(changed)
    }

    /// Sweeps every second, and at once when a runner long-polls an empty queue.
    pub fn spawn_sweeper(self: &Shared) {
        let app = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                if let Err(e) = app.sweep().await {
                    tracing::warn!("sweep: {e}");
                }
            }
        });
    }
}
