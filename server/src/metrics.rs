//! `GET /metrics` in Prometheus' text format, next to `/healthz`.
//!
//! Two kinds of figures. Counters of what this server process did (claims handed out, jobs
//! submitted, outputs uploaded and their bytes, attempts ended by how, leases lapsed): each
//! server of a farm counts its own, and Prometheus sums them (`sum(rate(…))`). Gauges read from
//! the database at each scrape (jobs per state, the queue's length, runners seen lately): the
//! farm's, the same from every server (`max(…)` across them). Nothing per user or per job: the
//! page holds counts only, so it may be scraped without a token.

use crate::db::{Db, DbError};
use construir_api::types::{AttemptState, JobState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::Row;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// Runners that claimed or beat within this long count as seen lately.
const SEEN_LATELY_MS: i64 = 5 * 60 * 1000;

pub struct Metrics {
    registry: Registry,
    pub claims: Counter,
    pub submissions: Counter,
    pub uploads: Counter,
    pub upload_bytes: Counter,
    pub attempts_ended: Family<StateLabel, Counter>,
    pub leases_lapsed: Counter,
    jobs: Family<StateLabel, Gauge>,
    queued: Gauge,
    runners_seen: Gauge,
    /// When the database's figures were last read (ms): read at most every [`FRESH_MS`], so a
    /// scrape loop from anyone costs the database nothing more.
    read_ms: std::sync::Mutex<i64>,
}

/// How long the database's figures are reused.
const FRESH_MS: i64 = 10_000;

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every job state, so each has a line (0 included) from the first scrape.
const JOB_STATES: [JobState; 8] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Canceled,
    JobState::Errored,
    JobState::Expired,
    JobState::Inconclusive,
];

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("construir");
        let m = Metrics {
            registry: Registry::default(),
            claims: Counter::default(),
            submissions: Counter::default(),
            uploads: Counter::default(),
            upload_bytes: Counter::default(),
            attempts_ended: Family::default(),
            leases_lapsed: Counter::default(),
            jobs: Family::default(),
            queued: Gauge::default(),
            runners_seen: Gauge::default(),
            read_ms: std::sync::Mutex::new(i64::MIN),
        };
        registry.register(
            "claims",
            "Attempts handed to runners by this server",
            m.claims.clone(),
        );
        registry.register(
            "submissions",
            "Jobs submitted through this server",
            m.submissions.clone(),
        );
        registry.register(
            "uploads",
            "Outputs uploaded to this server",
            m.uploads.clone(),
        );
        registry.register(
            "upload_bytes",
            "Bytes of the outputs uploaded to this server",
            m.upload_bytes.clone(),
        );
        registry.register(
            "attempts_ended",
            "Attempts that stopped being live, by the state they ended in (stored by this server)",
            m.attempts_ended.clone(),
        );
        registry.register(
            "leases_lapsed",
            "Attempts whose lease lapsed or that were not started in time (stored by this server)",
            m.leases_lapsed.clone(),
        );
        registry.register(
            "jobs",
            "Jobs in each state, in the farm's database (deleted ones left out)",
            m.jobs.clone(),
        );
        registry.register(
            "queue_length",
            "Jobs waiting for a runner (queued, or running and wanting more replicas)",
            m.queued.clone(),
        );
        registry.register(
            "runners_seen",
            "Runners that claimed or beat in the last five minutes",
            m.runners_seen.clone(),
        );
        Metrics { registry, ..m }
    }

    /// An attempt stopped being live, ending in `state`.
    pub fn attempt_ended(&self, state: AttemptState) {
        self.attempts_ended
            .get_or_create(&StateLabel {
                state: state.as_str().to_string(),
            })
            .inc();
        if state == AttemptState::Expired {
            self.leases_lapsed.inc();
        }
    }

    /// The page: the database's figures (read again when older than ten seconds), then
    /// everything encoded.
    pub async fn render(&self, db: &Db) -> Result<String, DbError> {
        let now = crate::db::now_ms();
        let stale = {
            let mut read = self.read_ms.lock().unwrap_or_else(|p| p.into_inner());
            let stale = now.saturating_sub(*read) >= FRESH_MS;
            if stale {
                *read = now;
            }
            stale
        };
        if stale && let Err(e) = self.read_database(db).await {
            *self.read_ms.lock().unwrap_or_else(|p| p.into_inner()) = i64::MIN;
            return Err(e);
        }
        let mut page = String::new();
        prometheus_client::encoding::text::encode(&mut page, &self.registry)
            .expect("writing to a String does not fail");
        Ok(page)
    }

    async fn read_database(&self, db: &Db) -> Result<(), DbError> {
        let rows =
            sqlx::query("SELECT state, COUNT(*) FROM jobs WHERE deleted_ms IS NULL GROUP BY state")
                .fetch_all(db.pool())
                .await?;
        for s in JOB_STATES {
            self.jobs
                .get_or_create(&StateLabel {
                    state: s.as_str().to_string(),
                })
                .set(0);
        }
        for r in &rows {
            let state: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            self.jobs.get_or_create(&StateLabel { state }).set(n);
        }
        let queued = sqlx::query("SELECT COUNT(*) FROM jobs WHERE wanted > 0")
            .fetch_one(db.pool())
            .await?
            .try_get::<i64, _>(0)?;
        self.queued.set(queued);
        let seen = sqlx::query("SELECT COUNT(*) FROM runners WHERE last_seen_ms >= $1")
            .bind(crate::db::now_ms() - SEEN_LATELY_MS)
            .fetch_one(db.pool())
            .await?
            .try_get::<i64, _>(0)?;
        self.runners_seen.set(seen);
        Ok(())
    }
}
