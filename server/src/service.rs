//! Applying the state machine: read a job, compute the step (construir_api::state::step, pure),
//! write the new snapshot only if nobody wrote the job meanwhile, then carry out the effects
//! (wake the runners' long polls, answer waiting clients, compact an ended attempt's console).
//! Commit, then acknowledge: a caller hears of a step only once it is stored. The sweeper ticks
//! jobs whose deadlines passed; housekeeping finishes what a dead server left (consoles not yet
//! compacted), applies retention and collects orphan blobs.

use crate::blobs::Blobs;
use crate::db::{Db, DbError, now_ms};
use crate::jobs::StoredJob;
use crate::settings::Settings;
use construir_api::log::ConsoleCap;
use construir_api::state::{Effect, Event, Refusal as StepRefusal, Settings as StepSettings, step};
use construir_api::types::{AttemptId, JobId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// What every handler shares.
pub struct App {
    pub settings: Settings,
    pub db: Db,
    pub blobs: Blobs,
    /// Woken when a job may have become claimable.
    pub work: Notify,
    /// Woken per job (a step was stored) and per attempt (a console piece came): a waiting
    /// client wakes for what it follows, not for every change in the server.
    pub watchers: Watchers,
    /// Attempt rows not in their job's snapshot, by when housekeeping first saw them so: one is
    /// taken as dead (and its console closed) only once older than a claim can take.
    unclaimed_rows: Mutex<HashMap<(AttemptId, String), i64>>,
    /// Set once the server is stopping: long polls answer at once (a claim "nothing", a log
    /// what it has), so a stop takes a moment, not the longest poll's remaining 25 s.
    stopping: std::sync::atomic::AtomicBool,
    stop: Notify,
    /// The key receipts are signed with (`DATA/server-key`).
    pub signer: crate::signing::ServerSigner,
    /// The other servers on the same PostgreSQL, told of what wakes (None on SQLite).
    peers: Option<crate::notify::Peers>,
    /// What `/metrics` shows.
    pub metrics: crate::metrics::Metrics,
    /// The claims in progress here: concurrent ones start at different jobs.
    pub claim_spread: crate::claim_spread::ClaimSpread,
    /// API requests per user (`--requests-per-second`; None: no limit). In this process: each
    /// server of a farm lets a user make that many.
    pub requests: Option<governor::DefaultKeyedRateLimiter<i64>>,
}

/// The server's signing key's file in its data directory.
pub const KEY_FILE: &str = "server-key";

/// What a client can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// A step of this job was stored.
    Job(JobId),
    /// Console bytes of this attempt were stored.
    Console(AttemptId),
}

/// One [`Notify`] per topic somebody waits for; a topic's entry goes when its last watcher
/// does, so the map holds only what is followed right now.
#[derive(Default)]
pub struct Watchers {
    map: Arc<Mutex<HashMap<Topic, Weak<Notify>>>>,
}

/// A watcher's hold on a topic.
pub struct Watch {
    topic: Topic,
    notify: Arc<Notify>,
    map: Arc<Mutex<HashMap<Topic, Weak<Notify>>>>,
}

impl Watchers {
    pub fn watch(&self, topic: Topic) -> Watch {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Dead entries (none should be left: a drop or a release removes them) are swept when
        // the map has doubled since the last sweep, so a watch costs O(1) amortised.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let notify = match map.get(&topic).and_then(Weak::upgrade) {
            Some(n) => n,
            None => {
                let n = Arc::new(Notify::new());
                map.insert(topic, Arc::downgrade(&n));
                n
            }
        };
        Watch {
            topic,
            notify,
            map: self.map.clone(),
        }
    }

    /// Wakes everyone waiting on `topic` (nobody: nothing to do).
    pub fn wake(&self, topic: Topic) {
        if let Some(n) = self.lookup(topic) {
            n.notify_waiters();
            self.release(topic, n);
        }
    }

    /// The topic's Notify, held outside the map's lock while it is woken.
    fn lookup(&self, topic: Topic) -> Option<Arc<Notify>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&topic).and_then(Weak::upgrade)
    }

    /// Lets go of a Notify [`Watchers::lookup`] gave: if its last watcher went meanwhile (its
    /// drop saw this hold and left the entry), the entry goes now.
    fn release(&self, topic: Topic, notify: Arc<Notify>) {
        drop(notify);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&topic).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&topic);
        }
    }

    /// Wakes everyone waiting on any topic (what woke them may have been missed).
    pub fn wake_all(&self) {
        let all: Vec<(Topic, Arc<Notify>)> = {
            let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter_map(|(t, w)| w.upgrade().map(|n| (*t, n)))
                .collect()
        };
        for (topic, n) in all {
            n.notify_waiters();
            self.release(topic, n);
        }
    }

    /// Topics somebody waits for.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Watch {
    /// A future woken by the next [`Watchers::wake`] of this topic, even one that comes before
    /// it is first polled (take it before looking, then wait on it).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Under the map's lock, so nobody takes this Notify again while the entry goes.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&self.notify) == 1 {
            map.remove(&self.topic);
        }
    }
}

pub type Shared = Arc<App>;

/// How often housekeeping runs (leftover consoles, retention).
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// Orphan blobs are looked for every this many housekeeping rounds.
const ORPHAN_ROUNDS: u64 = 10;
/// Far longer than a claim takes between its attempt row's insertion and its `Claim` step's
/// store (or the row's removal when the claim is lost).
pub const CLAIM_GRACE: Duration = Duration::from_secs(60);

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
    /// The server on `db` and `blobs`, with the signing key of its data directory (made there on
    /// the first start).
    pub fn new(
        settings: Settings,
        db: Db,
        blobs: Blobs,
    ) -> Result<Shared, crate::signing::SigningError> {
        let signer = crate::signing::ServerSigner::load_or_create(&settings.data.join(KEY_FILE))?;
        let name = blobs.tmp_owner().to_string();
        let settings_rate = settings.requests_per_second;
        Ok(Arc::new_cyclic(|me| App {
            peers: db
                .url()
                .map(|url| crate::notify::start(url, name, me.clone())),
            settings,
            db,
            blobs,
            work: Notify::new(),
            watchers: Watchers::default(),
            unclaimed_rows: Mutex::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            stop: Notify::new(),
            signer,
            metrics: crate::metrics::Metrics::new(),
            claim_spread: Default::default(),
            requests: std::num::NonZeroU32::new(settings_rate).map(|per_second| {
                let burst = per_second.saturating_mul(std::num::NonZeroU32::new(5).expect("5"));
                governor::RateLimiter::keyed(
                    governor::Quota::per_second(per_second).allow_burst(burst),
                )
            }),
        }))
    }

    /// Wakes the runners' long polls, here and on the other servers: a job may be claimable.
    pub fn wake_work(&self) {
        self.work.notify_waiters();
        if let Some(p) = &self.peers {
            p.tell(crate::notify::Wake::Work);
        }
    }

    /// Wakes whoever follows `topic`, here and on the other servers.
    pub fn wake(&self, topic: Topic) {
        self.watchers.wake(topic);
        if let Some(p) = &self.peers {
            p.tell(crate::notify::Wake::Topic(topic));
        }
    }

    /// The server stops: every long poll, waiting or to come, answers at once.
    pub fn begin_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify_waiters();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once the server is stopping (at once if it is).
    pub async fn stopped(&self) {
        // Registered before the look, so a stop between the two still wakes it.
        let stop = self.stop.notified();
        if self.is_stopping() {
            return;
        }
        stop.await;
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
        self.apply_keeping(id, make, None).await
    }

    /// [`App::apply`], keeping `statement` (an attempt's signed statement, as JSON) in the same
    /// transaction as the step.
    pub async fn apply_keeping(
        &self,
        id: JobId,
        make: impl Fn(&StoredJob) -> Event,
        statement: Option<(AttemptId, &str)>,
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
            if self
                .db
                .store_job_within(id, job.version, &t.job, None, &t.effects, statement)
                .await?
            {
                job.snapshot = t.job;
                job.version += 1;
                self.stored(&job, &t.effects);
                return Ok((job, t.effects));
            }
        }
        Err(ApplyError::Contended)
    }

    /// Everything that follows a stored step of `job` (as now stored): its effects, its
    /// waiters woken, the consoles of the attempts it ended compacted. Whoever stores a step
    /// without [`App::apply`] calls this after the write.
    pub fn stored(&self, job: &StoredJob, effects: &[Effect]) {
        for e in effects {
            if let Effect::AttemptEnded(_, state) = e {
                self.metrics.attempt_ended(*state);
            }
        }
        self.carry_out(effects);
        self.wake(Topic::Job(job.facts.id));
        self.compact_ended(job, effects);
    }

    /// The effects that are not stores (those are the snapshot write itself) and need no more
    /// than the effects: the runners' long polls. (The job's waiters and its consoles need the
    /// job: [`App::stored`].)
    pub fn carry_out(&self, effects: &[Effect]) {
        if effects.iter().any(|e| matches!(e, Effect::WakeRunners)) {
            self.wake_work();
        }
    }

    /// Compacts the console of every attempt this step ended, in the background (a report is
    /// not held up by it); one a dead server never compacted is the housekeeping's.
    fn compact_ended(&self, job: &StoredJob, effects: &[Effect]) {
        let cap = ConsoleCap::new(job.facts.limits.console_cap);
        for e in effects {
            if let Effect::AttemptEnded(attempt, _) = e {
                let (db, blobs, attempt) = (self.db.clone(), self.blobs.clone(), *attempt);
                tokio::spawn(async move {
                    if let Err(e) = crate::logs::compact(&db, &blobs, attempt, cap).await {
                        tracing::warn!("compacting the console of attempt {attempt}: {e}");
                    }
                });
            }
        }
    }

    /// Compacts the consoles of ended attempts still in pieces: what a server killed between
    /// ending an attempt and compacting it left. Returns how many were compacted.
    pub async fn compact_leftovers(&self) -> Result<usize, crate::logs::LogError> {
        self.compact_leftovers_at(now_ms()).await
    }

    /// [`App::compact_leftovers`] as at `now` (ms).
    pub async fn compact_leftovers_at(&self, now: i64) -> Result<usize, crate::logs::LogError> {
        let mut done = 0;
        let mut unclaimed = HashMap::new();
        for u in self.db.uncompacted(500).await? {
            let Some(job) = self.db.load_job(u.job).await? else {
                continue;
            };
            let ended = match job.snapshot.attempt(u.attempt) {
                Some(a) => !a.state.is_live(),
                // An attempt row its job never took: a claim under way, or one a dead server
                // left (empty either way). An ended job takes no claim any more; otherwise the
                // row may be a claim between its row and its step (another runner's, the job
                // queued again meanwhile): dead only once older than any claim takes.
                None if job.snapshot.state.is_terminal() => true,
                None => {
                    let seen = self
                        .unclaimed_rows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&(u.attempt, u.token_sha256.clone()))
                        .copied()
                        .unwrap_or(now);
                    unclaimed.insert((u.attempt, u.token_sha256.clone()), seen);
                    now - seen >= CLAIM_GRACE.as_millis() as i64
                }
            };
            if !ended {
                continue;
            }
            let cap = ConsoleCap::new(job.facts.limits.console_cap);
            match crate::logs::compact(&self.db, &self.blobs, u.attempt, cap).await {
                Ok(_) => {
                    unclaimed.remove(&(u.attempt, u.token_sha256.clone()));
                    done += 1;
                }
                // One attempt's trouble must not stop the others'.
                Err(e) => tracing::warn!("compacting the console of attempt {}: {e}", u.attempt),
            }
        }
        // Only the rows still unclaimed now are remembered.
        *self
            .unclaimed_rows
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = unclaimed;
        Ok(done)
    }

    /// What the sweeper does besides ticks, less often: leftovers first (so retention finds
    /// consoles in their final place), then retention, then, when `collect` says so, orphan
    /// blobs.
    pub async fn housekeep(self: &Shared, collect: bool) {
        if let Some(limiter) = &self.requests {
            // Users not seen for a while hold no state (their next request starts afresh).
            limiter.retain_recent();
        }
        if let Err(e) = self.compact_leftovers().await {
            tracing::warn!("compacting leftover consoles: {e}");
        }
        if let Err(e) = crate::indexing::catch_up(self, 20).await {
            tracing::warn!("indexing outputs a stopped server left unindexed: {e}");
        }
        if let Err(e) = crate::indexing::tell_leftovers(self, 200).await {
            tracing::warn!("telling jobs of their replicas' indexes: {e}");
        }
        if let Err(e) = crate::runners::tell_all_revoked(self).await {
            tracing::warn!("telling jobs of revoked runners: {e}");
        }
        let now = now_ms();
        if let Some(keep) = self.settings.retention {
            match crate::retention::apply_retention(self, now, keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("retention: outputs and consoles of {n} jobs deleted"),
                Err(e) => tracing::warn!("retention: {e}"),
            }
        }
        if collect {
            match crate::retention::collect_orphans(self, now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} orphan blobs removed"),
                Err(e) => tracing::warn!("collecting orphan blobs: {e}"),
            }
        }
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

    /// Sweeps every second; housekeeps at start (what a dead server left) and every minute,
    /// on a task of its own so a long retention pass never delays a lease's lapse.
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
        let app = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HOUSEKEEPING_EVERY);
            let mut round = 0u64;
            loop {
                every.tick().await;
                // Listing every blob is the costly part: every tenth round.
                app.housekeep(round.is_multiple_of(ORPHAN_ROUNDS)).await;
                round += 1;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wake holds the topic's Notify outside the map's lock; the last watcher dropped in
    /// that moment leaves the entry to the wake, which removes it.
    #[test]
    fn a_watch_dropped_while_its_topic_is_woken_leaves_no_entry() {
        let w = Watchers::default();
        let t = Topic::Job(JobId(1));
        let watch = w.watch(t);
        let held = w.lookup(t).expect("watched");
        drop(watch);
        assert_eq!(w.len(), 1, "the drop saw the wake's hold");
        held.notify_waiters();
        w.release(t, held);
        assert!(w.is_empty());
        // Watched again meanwhile: the entry is the new watcher's, and stays.
        let watch = w.watch(t);
        let held = w.lookup(t).unwrap();
        drop(watch);
        let again = w.watch(t);
        w.release(t, held);
        assert_eq!(w.len(), 1);
        drop(again);
        assert!(w.is_empty());
    }

    #[test]
    fn many_wakes_and_drops_at_once_leave_an_empty_map() {
        let w = Arc::new(Watchers::default());
        std::thread::scope(|s| {
            for i in 0..4u64 {
                let w = w.clone();
                s.spawn(move || {
                    for n in 0..5000u64 {
                        let t = Topic::Console(AttemptId(n % 7 + i));
                        if i % 2 == 0 {
                            drop(w.watch(t));
                        } else {
                            w.wake(t);
                        }
                    }
                });
            }
        });
        assert!(w.is_empty());
    }
}
