//! The pull mode: `construir-runner --server URL --token-file FILE`. The runner asks a
//! construir-server for work over outbound HTTP(S) only (no port opened, no database
//! credentials: it works behind NAT), runs each attempt through the same run core as the local
//! queue, and sends back the console, the output and the report.
//!
//! `--jobs` worker threads each claim for themselves, one claim at a time across the runner: a
//! claim says what is free, and a second claim in flight would say the same free memory twice.
//! The claim that is open is a long poll (~25 s), so a waiting job is taken within one
//! round-trip of a slot coming free.
//!
//! SIGTERM/SIGINT: no new claims (the open long poll is cut); attempts whose VM is not running
//! yet are aborted at once; running ones get `--grace`, then their VMs are stopped and the
//! attempts aborted, so the server queues them again at once, not blamed on the job and not
//! left to wait out the lease.

mod api;
mod attempt;
pub mod caps;
pub mod client;
pub mod heartbeat;
pub mod images;
pub mod logs;
pub mod retry;
pub mod sign;
pub mod transfer;

use crate::backend::Backend;
use crate::runcore::Children;
use crate::runner::STOP;
use api::RunnerApi;
use caps::{Budget, Lent};
use client::{ApiFailure, Client};
use construir_api::trust::KeyPair;
use construir_api::types::{ClaimRequest, ClaimResponse, RunnerCapabilities, RunnerId};
use construir_contract::host::HostKind;
use heartbeat::{Live, StopWhy};
use retry::{Backoff, sleep_unless};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The reason an attempt is aborted with when the runner stops.
pub const SHUTDOWN_REASON: &str = "runner stopped (SIGTERM)";

/// How long a claim may wait for work, in seconds (the API's maximum is 30).
pub const CLAIM_WAIT_S: u32 = 25;

/// After the grace period, how long deliveries and aborts may still be tried before the runner
/// exits anyway.
pub const AFTER_GRACE: Duration = Duration::from_secs(20);

/// The pull runner's settings.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The server's base URL, checked by [`client::server_base`].
    pub server: String,
    /// The runner's token (registers and claims only).
    pub token: String,
    /// The name it registers under.
    pub name: String,
    /// Its directory: attempts run in `DIR/remote/ATTEMPT/`.
    pub dir: PathBuf,
    pub images_dir: PathBuf,
    pub backend: Backend,
    pub host: HostKind,
    pub lent: Lent,
    pub grace: Duration,
    /// The most bytes `DIR/image-cache/` keeps of images fetched by digest (`--cache-size`; 0:
    /// fetch none).
    pub cache_size: u64,
}

/// What the workers share.
pub struct Ctx {
    pub cfg: RemoteConfig,
    /// Registers and claims, on a client of its own: the shutdown cuts its long poll.
    api: RunnerApi,
    /// Everything about attempts, on another client, which the shutdown leaves alone.
    calls: Client,
    runner: RunnerId,
    /// Signs its reports' statements.
    key: KeyPair,
    children: Arc<Children>,
    budget: Mutex<Budget>,
    /// The attempts being handled, by key, for the shutdown.
    attempts: Mutex<HashMap<String, Arc<Live>>>,
    /// One claim at a time (see the module's comment).
    claim_gate: Mutex<()>,
    /// Set at the shutdown: past it, nothing is tried again.
    deadline: Mutex<Option<Instant>>,
    /// A failure that ends the runner (another protocol version, a refused token).
    fatal: Mutex<Option<String>>,
    /// Images fetched by digest, and which attempts use them.
    pub images: images::ImageCache,
}

impl Ctx {
    fn capabilities(&self) -> RunnerCapabilities {
        let budget = self.budget.lock().expect("budget lock").clone();
        caps::capabilities(
            &self.cfg.lent,
            &budget,
            self.cfg.backend.name(),
            self.cfg.backend.speed_class(self.cfg.host),
            caps::images_in(&self.cfg.images_dir),
            caps::digests_in(self.images.root()),
            self.images.bound(),
        )
    }

    fn reserve(&self, memory_mib: u32) -> bool {
        self.budget
            .lock()
            .expect("budget lock")
            .reserve(&self.cfg.lent, memory_mib)
    }

    fn release(&self, memory_mib: u32) {
        self.budget.lock().expect("budget lock").release(memory_mib);
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .lock()
            .expect("deadline lock")
            .is_some_and(|d| Instant::now() > d)
    }

    /// Whether a delivery that failed for now may be tried again.
    fn may_retry(&self, live: &Live) -> bool {
        live.lease_may_hold() && !live.lost() && !self.past_deadline()
    }

    fn fail(&self, why: String) {
        self.fatal.lock().expect("fatal lock").get_or_insert(why);
        STOP.store(true, Ordering::SeqCst);
    }
}

/// Reads a token file: one line, not empty, at most 4 KiB. A file others may read is said.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("--token-file {}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= 4096,
        "--token-file {}: {} bytes; a token is one line",
        path.display(),
        meta.len()
    );
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "{} may be read by other users (mode {:o}): anyone who reads it can claim jobs as this runner",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "--token-file {}: expected one token on one line",
        path.display()
    );
    Ok(token.to_string())
}

/// Runs the pull runner until SIGTERM/SIGINT (then `Ok`), or until the server cannot be worked
/// with (another protocol version, a refused token: then the error).
pub fn run(cfg: RemoteConfig) -> anyhow::Result<()> {
    let client = Client::new(cfg.server.clone());
    let api = RunnerApi::new(client.clone(), cfg.token.clone());
    let calls = Client::new(cfg.server.clone());
    stale_attempts(&cfg.dir.join("remote"));
    let key = sign::runner_key(&cfg.dir)?;
    let Some(runner) = register(&api, &cfg.name, &key.public_hex())? else {
        return Ok(());
    };
    eprintln!(
        "construir-runner: registered at {}{} as {:?} (runner {runner}); {} job(s) at a time",
        client.base(),
        client::proxy_note(client.base())
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        cfg.name,
        cfg.lent.jobs
    );
    let workers = cfg.lent.jobs.max(1);
    let ctx = Arc::new(Ctx {
        api,
        calls,
        runner,
        key,
        children: Arc::default(),
        budget: Mutex::default(),
        attempts: Mutex::default(),
        claim_gate: Mutex::new(()),
        deadline: Mutex::new(None),
        fatal: Mutex::new(None),
        images: images::ImageCache::new(cfg.dir.join(images::CACHE_DIR), cfg.cache_size),
        cfg,
    });
    let handles: Vec<_> = (0..workers)
        .map(|slot| {
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name(format!("slot-{slot}"))
                .spawn(move || worker(&ctx))
                .expect("spawn a worker")
        })
        .collect();
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let stopped_at = Instant::now();
    let grace = ctx.cfg.grace;
    *ctx.deadline.lock().expect("deadline lock") = Some(stopped_at + grace + AFTER_GRACE);
    let running = ctx.attempts.lock().expect("attempts lock").len();
    if ctx.fatal.lock().expect("fatal lock").is_none() {
        eprintln!(
            "construir-runner: stopping: no new claims; {running} attempt(s) get {} s to finish",
            grace.as_secs()
        );
    }
    // The open long poll has nothing left to wait for.
    client.shutdown();
    let mut stopped = false;
    loop {
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        if !stopped && stopped_at.elapsed() > grace {
            stopped = true;
            for live in ctx.attempts.lock().expect("attempts lock").values() {
                eprintln!(
                    "construir-runner: grace period over: stopping attempt {}; the server queues it again",
                    live.key
                );
                live.stop_vm(StopWhy::Shutdown, &ctx.children);
            }
        }
        if stopped_at.elapsed() > grace + AFTER_GRACE + heartbeat::STOP_PATIENCE {
            eprintln!(
                "construir-runner: attempts did not end in time; exiting (their leases lapse)"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match ctx.fatal.lock().expect("fatal lock").take() {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

/// Run directories a dead runner left: their attempts' leases are lost with it.
fn stale_attempts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        tracing::info!(
            "removing {} (an attempt of a runner that stopped: its lease lapses and the server queues it again)",
            e.path().display()
        );
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// Registers, trying again while the server cannot be reached; `None` if stopped meanwhile.
fn register(api: &RunnerApi, name: &str, key: &str) -> anyhow::Result<Option<RunnerId>> {
    let mut backoff = Backoff::default();
    loop {
        match api.register(name, key) {
            Ok(id) => return Ok(Some(id)),
            Err(e) if e.is_transient() => {
                tracing::warn!("register at {}: {e}; trying again", api.client.base());
                if !sleep_unless(&STOP, backoff.next_delay()) {
                    return Ok(None);
                }
            }
            Err(e) => anyhow::bail!("register at {}: {e}", api.client.base()),
        }
    }
}

/// One slot: claim, handle, again, until the runner stops.
fn worker(ctx: &Ctx) {
    let mut backoff = Backoff::default();
    while !STOP.load(Ordering::SeqCst) {
        let claimed = {
            let _turn = ctx.claim_gate.lock().expect("claim gate");
            if STOP.load(Ordering::SeqCst) {
                return;
            }
            let offered = ctx.capabilities();
            claim(ctx, &offered).map(|answer| {
                answer.map(|offer| {
                    let admitted = attempt::admit(ctx, &offer, &offered);
                    (offer, admitted)
                })
            })
        };
        match claimed {
            Ok(Some((offer, admitted))) => {
                backoff.reset();
                attempt::handle(ctx, offer, admitted);
            }
            Ok(None) => backoff.reset(),
            Err(e) if STOP.load(Ordering::SeqCst) => {
                tracing::debug!("claim cut by the shutdown: {e}");
                return;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!("claim: {e}; trying again");
                sleep_unless(&STOP, backoff.next_delay());
            }
            Err(e) => {
                ctx.fail(format!("claim at {}: {e}", ctx.api.client.base()));
                return;
            }
        }
    }
}

/// One claim (a long poll), offering `capabilities`.
fn claim(
    ctx: &Ctx,
    capabilities: &RunnerCapabilities,
) -> Result<Option<construir_api::types::ClaimResponse>, ApiFailure> {
    // A runner that fetches images, or holds some by digest, has pinned jobs to offer for.
    if capabilities.images.is_empty()
        && !capabilities.fetch_images
        && capabilities.image_digests.is_empty()
    {
        tracing::warn!(
            "no images in {} and none fetched (--cache-size 0): nothing to offer; looking \
             again in 30 s",
            ctx.cfg.images_dir.display()
        );
        sleep_unless(&STOP, Duration::from_secs(30));
        return Ok(None);
    }
    ctx.api.claim(
        ctx.runner,
        &ClaimRequest {
            capabilities: capabilities.clone(),
            wait_s: CLAIM_WAIT_S,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_one_line() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("token");
        std::fs::write(&path, "  abc123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc123");
        for bad in ["", "\n", "two words\n", "a\nb\n"] {
            std::fs::write(&path, bad).unwrap();
            assert!(read_token(&path).is_err(), "{bad:?}");
        }
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        assert!(read_token(&path).is_err());
        assert!(read_token(&d.path().join("missing")).is_err());
    }
}
