//! One attempt, from the claim's answer to the report: check the offer against what this runner
//! lends, start it within the accept window, download the job, run it through the run core with
//! heartbeats and the live log alongside, upload the output and report. What the runner cannot
//! do (a misfit, a failed download, its own shutdown) it aborts, so the job goes back to the
//! queue at once, not blamed; an attempt whose lease is lost is dropped, nothing more sent.

use super::api::AttemptApi;
use super::caps::check_offer;
use super::client::ApiFailure;
use super::heartbeat::{self, Live, StopWhy};
use super::logs;
use super::retry::{Backoff, sleep_unless};
use super::transfer::{self, Output};
use super::{Ctx, SHUTDOWN_REASON};
use crate::dirs::{BACKEND_LOG, CONSOLE_LOG};
use crate::runcore::{Outcome, Ran, RunSpec, VmLimits, run_vm};
use crate::runner::{STOP, now_ms};
use construir_api::types::{
    ClaimResponse, MAX_REASON_BYTES, Phase, PhaseTimes, ReportRequest, ReportStatus,
    RunnerCapabilities,
};
use construir_contract::jobname::parse_job_name;
use construir_contract::text::printable;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The record's status as the API's: the job's outcomes, and the runner's own failures (any
/// status the API does not know is the backend's failure).
pub fn report_status(status: &str) -> ReportStatus {
    match status {
        "success" => ReportStatus::Success,
        "failed" => ReportStatus::Failed,
        "invalid-job" => ReportStatus::InvalidJob,
        "timed-out" => ReportStatus::TimedOut,
        "guest-failed" => ReportStatus::GuestFailed,
        "interrupted" => ReportStatus::Interrupted,
        "unknown-image" => ReportStatus::UnknownImage,
        "vmm-fault" => ReportStatus::VmmFault,
        "crashed-runner" => ReportStatus::CrashedRunner,
        _ => ReportStatus::BackendFailed,
    }
}

/// The report of a run, valid by the API's rules (a reason cut to size; exit statuses that do
/// not agree with the status are left out rather than refused).
pub fn report_of(outcome: &Outcome, note: Option<&str>, times: PhaseTimes) -> ReportRequest {
    let mut reason = match note {
        Some(n) if outcome.reason.is_empty() => n.to_string(),
        Some(n) => format!("{}; {n}", outcome.reason),
        None => outcome.reason.clone(),
    };
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let mut report = ReportRequest {
        status: report_status(&outcome.status),
        exit_code: outcome.exit_code.filter(|c| (0..=255).contains(c)),
        job_exit_status: outcome.job_exit_status,
        reason,
        times,
        output_sha256: None,
        output_tree_sha256: None,
        statement: None,
    };
    if report.validate().is_err() {
        report.job_exit_status = None;
    }
    report
}

/// The file name the job is kept under: its own name, with the image the server gives (the
/// launchers take the image from the name), checked like a queued job's.
pub fn local_name(offer: &ClaimResponse) -> Result<String, String> {
    let parsed = parse_job_name(&offer.job_name).map_err(|e| e.to_string())?;
    let ext = &offer.job_name[parsed.name.len() + 1 + parsed.image.len()..];
    let file = format!("{}_{}{ext}", parsed.name, offer.image);
    crate::intake::job_name_of(OsStr::new(&file))
}

/// Admits a claimed attempt: the offer checked against what the claim offered (the volunteer's
/// limits win, whatever the server sent), and its slot and memory taken. Called while the claim
/// turn is held, so the next claim already says what is left.
pub fn admit<'a>(
    ctx: &'a Ctx,
    offer: &ClaimResponse,
    offered: &RunnerCapabilities,
) -> Result<Reserved<'a>, String> {
    check_offer(offer, offered)
        .map_err(|misfit| format!("this runner cannot take it: {misfit}"))?;
    if !ctx.reserve(offer.limits.memory_mib) {
        return Err("this runner has no room left for it".into());
    }
    Ok(Reserved(ctx, offer.limits.memory_mib))
}

/// Handles one claimed attempt to its end.
pub fn handle(ctx: &Ctx, offer: ClaimResponse, admitted: Result<Reserved<'_>, String>) {
    let api = AttemptApi::new(
        ctx.calls.clone(),
        offer.attempt_id,
        offer.attempt_token.clone(),
    );
    let key = offer.attempt_id.to_string();
    tracing::info!(
        "attempt {key}: job {} ({}, image {}, {} bytes, {} MiB, {} vCPU, {} s)",
        offer.job_id,
        printable(&offer.job_name),
        printable(&offer.image),
        offer.size,
        offer.limits.memory_mib,
        offer.limits.vcpus,
        offer.limits.timeout_s
    );
    let _reserved = match admitted {
        Ok(r) => r,
        Err(why) => return give_up(ctx, &api, &why),
    };
    let file = match local_name(&offer) {
        Ok(f) => f,
        Err(why) => return give_up(ctx, &api, &format!("the job's name is refused: {why}")),
    };
    if STOP.load(Ordering::SeqCst) {
        return give_up(ctx, &api, SHUTDOWN_REASON);
    }
    if let Err(e) = start(&api, &offer) {
        tracing::warn!("attempt {key}: cannot start it: {e}; dropped");
        return;
    }
    let dir = ctx.cfg.dir.join("remote").join(&key);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = make_private_dir(&dir) {
        return give_up(ctx, &api, &format!("cannot make {}: {e}", dir.display()));
    }
    let live = Arc::new(Live::new(
        key.clone(),
        dir.join(CONSOLE_LOG),
        // Whatever the server says: a time past the end of the clock would panic.
        Duration::from_secs(offer.lease_s.clamp(1, 24 * 3600)),
    ));
    ctx.attempts
        .lock()
        .expect("attempts lock")
        .insert(key.clone(), live.clone());
    let beats = heartbeat::spawn(
        api.clone(),
        live.clone(),
        ctx.children.clone(),
        Duration::from_secs(offer.heartbeat_interval_s.clamp(1, 3600)),
    );
    run_and_deliver(ctx, &api, &offer, &live, &dir, &file);
    live.finish();
    let _ = beats.join();
    ctx.attempts.lock().expect("attempts lock").remove(&key);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!("attempt {key}: cannot remove {}: {e}", dir.display());
    }
}

/// A slot and memory taken for an attempt, given back when dropped.
pub struct Reserved<'a>(&'a Ctx, u32);

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Starts the attempt, trying again while the accept window lasts (by this runner's clock).
fn start(api: &AttemptApi, offer: &ClaimResponse) -> Result<(), ApiFailure> {
    let window = Duration::from_millis(offer.accept_by_ms.saturating_sub(now_ms()))
        .clamp(Duration::from_secs(5), Duration::from_secs(120));
    let until = Instant::now() + window;
    let mut backoff = Backoff::default();
    let mut tried = false;
    loop {
        match api.start() {
            Ok(_) => return Ok(()),
            // An earlier try got through and its answer was lost.
            Err(e) if tried && e.code() == Some(construir_api::codes::WRONG_STATE) => return Ok(()),
            Err(e) if e.is_transient() && Instant::now() < until => {
                tried = true;
                tracing::warn!("attempt {}: start: {e}; trying again", api.id);
                std::thread::sleep(
                    backoff
                        .next_delay()
                        .min(until.saturating_duration_since(Instant::now())),
                );
            }
            Err(e) => return Err(e),
        }
    }
}

fn run_and_deliver(
    ctx: &Ctx,
    api: &AttemptApi,
    offer: &ClaimResponse,
    live: &Arc<Live>,
    dir: &Path,
    file: &str,
) {
    let job = dir.join(file);
    let stopped = || live.why().is_some() || STOP.load(Ordering::SeqCst);
    let downloading = Instant::now();
    if let Err(e) = download(ctx, api, offer, live, &job, &stopped) {
        return match live.why() {
            Some(StopWhy::LeaseLost) => {}
            Some(StopWhy::Canceled) => give_up(ctx, api, "canceled before its VM started"),
            _ if STOP.load(Ordering::SeqCst) => give_up(ctx, api, SHUTDOWN_REASON),
            _ => give_up(ctx, api, &format!("the download failed: {e}")),
        };
    }
    let download_ms = downloading.elapsed().as_millis() as u64;
    // The image: --images-dir's, or the pinned digest's, fetched into the cache if need be.
    let images = match super::images::prepare(ctx, offer, live, &stopped) {
        Ok(images) => images,
        Err(e) if e.is_image() => {
            let outcome = Outcome {
                status: "unknown-image".into(),
                reason: e.to_string(),
                ..Outcome::default()
            };
            return deliver_report(
                ctx,
                api,
                live,
                offer,
                report_of(&outcome, None, PhaseTimes::default()),
            );
        }
        Err(e) => {
            return match live.why() {
                Some(StopWhy::LeaseLost) => {}
                Some(StopWhy::Canceled) => give_up(ctx, api, "canceled before its VM started"),
                _ if STOP.load(Ordering::SeqCst) => give_up(ctx, api, SHUTDOWN_REASON),
                _ => give_up(ctx, api, &format!("the image could not be fetched: {e}")),
            };
        }
    };
    if stopped() {
        return match live.why() {
            Some(StopWhy::LeaseLost) => {}
            Some(StopWhy::Canceled) => give_up(ctx, api, "canceled before its VM started"),
            _ => give_up(ctx, api, SHUTDOWN_REASON),
        };
    }
    let log = logs::spawn(api.clone(), live.clone(), ctx.children.clone());
    live.set_phase(Phase::Booting);
    let ran = run_vm(&RunSpec {
        backend: &ctx.cfg.backend,
        host: ctx.cfg.host,
        images_dir: images.dir(),
        job: &job,
        console: &live.console,
        backend_log: &dir.join(BACKEND_LOG),
        timeout: Duration::from_secs(offer.limits.timeout_s),
        limits: VmLimits {
            memory_mib: Some(offer.limits.memory_mib),
            vcpus: Some(offer.limits.vcpus),
            console_cap: Some(offer.limits.console_cap),
            clock: offer.clock_s,
        },
        max_job_size: ctx.cfg.lent.job_size,
        stop: &live.stop,
        children: &ctx.children,
        key: &live.key,
    });
    if live.lost() {
        log.finish();
        return tracing::info!("attempt {}: lease lost; dropped", live.key);
    }
    // Everything the console holds goes before the report, so the server has the whole log
    // once it has the result.
    log.finish();
    let outcome = match ran {
        Ran::Interrupted(_) => {
            return match live.why() {
                Some(StopWhy::LeaseLost) => {}
                Some(StopWhy::Canceled) => give_up(ctx, api, "canceled: the runner stopped its VM"),
                _ => give_up(ctx, api, SHUTDOWN_REASON),
            };
        }
        Ran::Done(outcome) => outcome,
    };
    tracing::info!(
        "attempt {}: {} ({}) in {:.1} s",
        live.key,
        printable(&outcome.status),
        printable(&outcome.reason),
        outcome.vm_ms.unwrap_or(0) as f64 / 1000.0
    );
    let status = report_status(&outcome.status);
    if !status.is_job_outcome() {
        // The server gets the status and reason; the volunteer gets the backend's own words.
        tracing::warn!(
            "attempt {}: the backend's log ends with:\n{}",
            live.key,
            log_tail(&dir.join(BACKEND_LOG), 2000)
        );
    }
    live.set_phase(Phase::Uploading);
    let uploading = Instant::now();
    let (note, output) = if status.is_job_outcome() && status != ReportStatus::InvalidJob {
        match upload_output(ctx, api, live, &job, offer.limits.output_size) {
            Ok(delivered) => delivered,
            // The job did its part; the runner could not deliver it. Not the job's outcome:
            // aborted, so the server queues it again instead of taking it without its output.
            Err(why) if !live.lost() => return give_up(ctx, api, &why),
            Err(_) => return,
        }
    } else {
        (None, None)
    };
    if live.lost() {
        return;
    }
    let times = PhaseTimes {
        download_ms: Some(download_ms),
        boot_ms: None,
        run_ms: outcome.vm_ms,
        upload_ms: Some(uploading.elapsed().as_millis() as u64),
    };
    let mut report = report_of(&outcome, note.as_deref(), times);
    // The server refuses a report whose output is not the one it received and hashed.
    if let Some((sha256, tree)) = output {
        report.output_sha256 = Some(sha256);
        report.output_tree_sha256 = tree;
    }
    deliver_report(ctx, api, live, offer, report);
}

/// The last `max` bytes of a log, as text.
fn log_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut text = Vec::new();
    let _ = f.take(max).read_to_end(&mut text);
    quoted(&String::from_utf8_lossy(&text))
}

/// Lines of someone else's text for the runner's log: each escaped and indented, so none can
/// pass for a line of the runner's own.
fn quoted(text: &str) -> String {
    text.lines()
        .map(|line| format!("    | {}", printable(line)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Downloads the job, trying again (from the start) while the lease may hold.
fn download(
    ctx: &Ctx,
    api: &AttemptApi,
    offer: &ClaimResponse,
    live: &Live,
    job: &Path,
    stopped: &dyn Fn() -> bool,
) -> Result<(), transfer::DownloadError> {
    let mut backoff = Backoff::default();
    loop {
        let _ = std::fs::remove_file(job);
        match transfer::download(api, job, offer.size, &offer.sha256, stopped) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && ctx.may_retry(live) => {
                tracing::warn!("attempt {}: download: {e}; trying again", live.key);
                sleep_unless(&live.stop, backoff.next_delay());
            }
            Err(e) => return Err(e),
        }
    }
}

/// What the report says of the output: its sha256 and tree digest.
type Delivered = Option<(String, Option<String>)>;

/// Uploads the output; returns a note for the report when the job left none to upload, and
/// the sha256 (and tree digest) of the output the server has, for the report; or, when this
/// runner could not read or deliver it (its own failure, not the job's), why.
fn upload_output(
    ctx: &Ctx,
    api: &AttemptApi,
    live: &Live,
    job: &Path,
    output_size: u64,
) -> Result<(Option<String>, Delivered), String> {
    let (len, sha256) = match transfer::find_output(job, output_size) {
        Ok(Output::Archive { len, sha256 }) => (len, sha256),
        Ok(Output::None(why)) => return Ok((Some(why), None)),
        Err(e) => return Err(format!("cannot read the job's disk for its output: {e}")),
    };
    match retrying(ctx, live, "output", || {
        transfer::upload(api, job, len, &sha256)
    }) {
        Ok(()) => {
            tracing::info!("attempt {}: output uploaded ({len} bytes)", live.key);
            Ok((
                None,
                Some((sha256, super::sign::output_tree(job, len, output_size))),
            ))
        }
        Err(e) if e.is_lease_lost() => {
            live.stop_vm(StopWhy::LeaseLost, &ctx.children);
            Ok((None, None))
        }
        // One output per attempt: an earlier try got through and its answer was lost. The
        // report names ours, and the server refuses it if what it got was not this.
        Err(e) if e.code() == Some(construir_api::codes::WRONG_STATE) => Ok((
            None,
            Some((sha256, super::sign::output_tree(job, len, output_size))),
        )),
        Err(e) => Err(format!("the output was not delivered: {e}")),
    }
}

/// Signs the report (its statement) and delivers it.
fn deliver_report(
    ctx: &Ctx,
    api: &AttemptApi,
    live: &Live,
    offer: &ClaimResponse,
    mut report: ReportRequest,
) {
    let signer = super::sign::Signer {
        key: &ctx.key,
        runner: ctx.runner,
        backend: ctx.cfg.backend.name(),
        host_kind: ctx.cfg.backend.speed_class(ctx.cfg.host),
    };
    report.statement = signer.statement(offer, &report, &live.console, live.taken_ms);
    let report = &report;
    match retrying(ctx, live, "report", || api.report(report)) {
        Ok(()) => tracing::info!("attempt {}: reported {}", live.key, report.status),
        Err(e) if e.code() == Some(construir_api::codes::ALREADY_REPORTED) => {
            // An earlier try got through; its answer was lost.
        }
        Err(e) => tracing::error!("attempt {}: the report was not delivered: {e}", live.key),
    }
}

/// Calls `f` until it succeeds, fails for good, or the lease can no longer hold.
fn retrying<T>(
    ctx: &Ctx,
    live: &Live,
    what: &str,
    mut f: impl FnMut() -> Result<T, ApiFailure>,
) -> Result<T, ApiFailure> {
    let mut backoff = Backoff::default();
    loop {
        match f() {
            Err(e) if e.is_transient() && ctx.may_retry(live) => {
                tracing::warn!("attempt {}: {what}: {e}; trying again", live.key);
                std::thread::sleep(backoff.next_delay());
            }
            result => return result,
        }
    }
}

/// Aborts the attempt (the job goes back to the queue, not blamed), trying a few times.
pub fn give_up(ctx: &Ctx, api: &AttemptApi, reason: &str) {
    tracing::info!("attempt {}: aborting: {}", api.id, printable(reason));
    let mut backoff = Backoff::default();
    for tries in 0..5 {
        match api.abort(reason) {
            Ok(()) => return,
            // An earlier try got through and its answer was lost.
            Err(e) if tries > 0 && e.is_lease_lost() => return,
            Err(e) if e.is_transient() && !ctx.past_deadline() => {
                tracing::warn!("attempt {}: abort: {e}; trying again", api.id);
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => {
                return tracing::warn!("attempt {}: abort not delivered: {e}", api.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::{AttemptId, JobId, JobLimits};

    fn offer(name: &str, image: &str) -> ClaimResponse {
        ClaimResponse {
            attempt_id: AttemptId(1),
            attempt_token: "t".into(),
            job_id: JobId(1),
            job_name: name.into(),
            image: image.into(),
            image_digest: None,
            sha256: "0".repeat(64),
            size: 1,
            limits: JobLimits::DEFAULT,
            accept_by_ms: 0,
            lease_until_ms: 0,
            heartbeat_interval_s: 30,
            lease_s: 90,
            clock_s: None,
        }
    }

    #[test]
    fn the_job_is_kept_under_its_name_with_the_servers_image() {
        assert_eq!(
            local_name(&offer("hello_i0.tar.xz", "i0")).unwrap(),
            "hello_i0.tar.xz"
        );
        assert_eq!(
            local_name(&offer("a_b_i0.tgz", "t0")).unwrap(),
            "a_b_t0.tgz"
        );
        for hostile in [
            "../x_i0.tar.xz",
            ".hidden_i0.tar.xz",
            "a/b_i0.tar.xz",
            "x\n_i0.tar.xz",
        ] {
            assert!(local_name(&offer(hostile, "i0")).is_err(), "{hostile:?}");
        }
        assert!(local_name(&offer("hello_i0.tar.xz", "../../etc")).is_err());
    }

    #[test]
    fn someone_elses_lines_are_quoted_escaped() {
        let tail =
            "vmm: guest said \x1b[2Jhi\n2026-01-01T00:00:00Z INFO attempt 9: reported success\n";
        let q = quoted(tail);
        assert_eq!(
            q,
            "    | vmm: guest said \\x1b[2Jhi\n    | 2026-01-01T00:00:00Z INFO attempt 9: reported success"
        );
        assert!(q.lines().all(|l| l.starts_with("    | ")));
    }

    #[test]
    fn outcomes_become_valid_reports() {
        let o = |status: &str, exit: Option<u16>| Outcome {
            status: status.into(),
            exit_code: Some(2),
            job_exit_status: exit,
            reason: "why".into(),
            ..Outcome::default()
        };
        let r = report_of(&o("failed", Some(2)), None, PhaseTimes::default());
        assert_eq!(
            (r.status, r.job_exit_status),
            (ReportStatus::Failed, Some(2))
        );
        r.validate().unwrap();
        // A summary that contradicts itself is reported without the exit status.
        let r = report_of(&o("success", Some(3)), Some("note"), PhaseTimes::default());
        assert_eq!((r.status, r.job_exit_status), (ReportStatus::Success, None));
        assert_eq!(r.reason, "why; note");
        r.validate().unwrap();
        assert_eq!(report_status("vmm-fault"), ReportStatus::VmmFault);
        assert_eq!(report_status("host-error"), ReportStatus::BackendFailed);
        assert!(!report_status("backend-failed").is_job_outcome());
        let long = Outcome {
            reason: "é".repeat(MAX_REASON_BYTES),
            ..o("timed-out", None)
        };
        let r = report_of(&long, None, PhaseTimes::default());
        assert!(r.reason.len() <= MAX_REASON_BYTES);
        r.validate().unwrap();
    }
}
