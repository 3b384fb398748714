//! One run of a job, in its own directory under running/: the start count made durable first, the
//! backend started as a child that dies with the runner, its summary read (bounded, only known
//! statuses), its messages kept up to a cap, then the record written into the run's directory and
//! the directory moved, whole, to done/ or failed/.

use crate::dirs::{
    BACKEND_LOG, CONSOLE_LOG, RECORD, RunState, SUBMITTED, rename_noreplace, sync_dir, write_atomic,
};
use crate::runner::{RunnerConfig, STOP, emit, now_ms, rel};
use construir_contract::jobname::parse_job_name;
use construir_contract::manifest::Image;
use construir_contract::outcome::EXIT_INTERRUPTED;
use construir_contract::record::Record;
use construir_launcher::console::CappedSink;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bytes of a backend's messages kept per run (what a guest can make a VMM log is rate-limited
/// there too; this is the runner's own bound).
pub const BACKEND_LOG_CAP: u64 = 1 << 20;

pub fn base_record(cfg: &RunnerConfig, run_id: &str, state: &RunState) -> Record {
    Record {
        job: state.job.clone(),
        run_id: run_id.to_string(),
        backend: Some(cfg.backend.name().to_string()),
        host_kind: Some(cfg.host.as_str().to_string()),
        started_ms: now_ms(),
        attempts: state.attempts,
        ..Record::default()
    }
}

/// Writes the run's record into its directory, then moves the directory to done/ (success) or
/// failed/. Once the record is there, a runner that dies before the move finishes it at start.
pub fn finish(cfg: &RunnerConfig, run_id: &str, state: &RunState, mut rec: Record, success: bool) {
    let d = &cfg.dirs;
    let from = d.run_dir(run_id);
    let dest_root = if success { &d.done } else { &d.failed };
    let dest = dest_root.join(run_id);
    rec.run_id = run_id.to_string();
    let submitted = from.join(SUBMITTED);
    if std::fs::symlink_metadata(&submitted).is_ok() {
        let kept = if rec.vm_ms.is_some() {
            // A VM ran: its output (the copy it wrote over) is the result.
            std::fs::remove_file(&submitted)
        } else {
            // Never ran to the end (the runner kept dying, the image went away): keep the job as
            // it was submitted, not a copy some start may have half written.
            std::fs::rename(&submitted, from.join(&state.file))
        };
        if let Err(e) = kept {
            tracing::warn!("{run_id}: cannot tidy {}: {e}", submitted.display());
        }
    }
    rec.job_bytes = std::fs::symlink_metadata(from.join(&state.file))
        .map(|m| m.len())
        .unwrap_or(0);
    rec.job_file = rel(cfg, &dest.join(&state.file));
    rec.console_log = from
        .join(CONSOLE_LOG)
        .exists()
        .then(|| rel(cfg, &dest.join(CONSOLE_LOG)));
    rec.backend_log = from
        .join(BACKEND_LOG)
        .exists()
        .then(|| rel(cfg, &dest.join(BACKEND_LOG)));
    rec.ended_ms = now_ms();
    rec.runner_ms = rec.ended_ms.saturating_sub(rec.started_ms);
    let record_path = from.join(RECORD);
    if let Err(e) = write_atomic(
        &record_path,
        &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
    ) {
        tracing::error!(
            "{run_id}: cannot write {}: {e}; the run stays in running/",
            record_path.display()
        );
        return;
    }
    move_finished(cfg, run_id, success);
    eprintln!(
        "construir-runner: finished {} (run {run_id}): {} ({}) in {:.1} s -> {}",
        rec.job,
        rec.status,
        rec.reason,
        rec.runner_ms as f64 / 1000.0,
        rel(cfg, &dest)
    );
    emit(cfg, serde_json::json!({"event": "finished", "record": rec}));
}

/// Moves a run that has its record from running/ to done/ or failed/ (never over anything).
pub fn move_finished(cfg: &RunnerConfig, run_id: &str, success: bool) {
    let d = &cfg.dirs;
    let dest_root = if success { &d.done } else { &d.failed };
    if let Err(e) = rename_noreplace(&d.run_dir(run_id), &dest_root.join(run_id)) {
        tracing::error!(
            "{run_id}: cannot move the run to {}: {e}; it stays in running/ with its record",
            dest_root.display()
        );
        return;
    }
    sync_dir(Some(dest_root));
    sync_dir(Some(&d.running));
}

/// Runs one job from its run directory to done/ or failed/ (or leaves it in running/ for the next
/// start, if the runner stops it).
pub fn run(cfg: &RunnerConfig, run_id: &str, children: &Mutex<HashMap<String, u32>>) {
    let d = &cfg.dirs;
    let mut state = match d.read_state(run_id) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{run_id}: cannot read its state ({e}); left in running/");
            return;
        }
    };
    state.attempts += 1;
    if let Err(e) = d.write_state(run_id, &state) {
        tracing::error!("{run_id}: cannot record the start ({e}); left in running/");
        return;
    }
    let name = state.job.clone();
    let dir = d.run_dir(run_id);
    let job = dir.join(&state.file);
    let mut rec = base_record(cfg, run_id, &state);
    let image = match parse_job_name(&state.file) {
        Ok(j) => j.image,
        Err(e) => {
            rec.status = "bad-name".into();
            rec.reason = e.to_string();
            return finish(cfg, run_id, &state, rec, false);
        }
    };
    rec.image = Some(image.clone());
    if let Err(e) = Image::load(&cfg.images_dir, &image) {
        rec.status = "unknown-image".into();
        rec.reason = e.to_string();
        return finish(cfg, run_id, &state, rec, false);
    }
    let console = dir.join(CONSOLE_LOG);
    let backend_log = dir.join(BACKEND_LOG);
    eprintln!(
        "construir-runner: started {name} (run {run_id}, backend {}, image {image}, attempt {})",
        cfg.backend.name(),
        state.attempts
    );
    emit(
        cfg,
        serde_json::json!({"event": "started", "job": name, "run_id": run_id, "backend": cfg.backend.name(), "image": image}),
    );
    if let Err(e) = fresh_copy(&dir, &state.file) {
        rec.status = "host-error".into();
        rec.reason = format!("cannot copy the submitted job for this start: {e}");
        return finish(cfg, run_id, &state, rec, false);
    }
    let mut cmd = cfg.backend.command(
        &job,
        &cfg.images_dir,
        cfg.timeout,
        &console,
        cfg.max_job_size,
    );
    let vm_start = Instant::now();
    // The VM process dies with this worker (even if the runner is killed with SIGKILL), so no VM
    // keeps writing into a job the restarted runner starts again.
    // Its own process group: a Ctrl-C meant for the runner reaches the VMs only through the
    // runner's grace period.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            rec.status = "backend-failed".into();
            rec.reason = format!("cannot start the {} backend: {e}", cfg.backend.name());
            return finish(cfg, run_id, &state, rec, false);
        }
    };
    children
        .lock()
        .expect("children lock")
        .insert(run_id.to_string(), child.id());
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut out);
        // Whatever follows the first MiB is read and dropped, so the backend never blocks on a
        // full pipe.
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        out
    });
    let stderr = child.stderr.take().expect("piped");
    let log_writer = std::thread::spawn(move || keep_capped(stderr, &backend_log));
    let limit = cfg.backend.hard_limit(cfg.timeout, cfg.host);
    let mut killed = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(_) => break None,
        }
        if vm_start.elapsed() > limit {
            killed = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    children.lock().expect("children lock").remove(run_id);
    rec.vm_ms = Some(vm_start.elapsed().as_millis() as u64);
    let out = reader.join().unwrap_or_default();
    let _ = log_writer.join();
    let summary = backend_summary(&out);
    rec.exit_code = status.and_then(|s| s.code());
    if killed {
        rec.status = "timed-out".into();
        rec.reason = format!(
            "the {} backend did not end within {} s; the runner killed it",
            cfg.backend.name(),
            limit.as_secs()
        );
        return finish(cfg, run_id, &state, rec, false);
    }
    if rec.exit_code == Some(i32::from(EXIT_INTERRUPTED)) && STOP.load(Ordering::SeqCst) {
        // Stopped by our own shutdown: it stays in running/, is started again at the next start,
        // and this start does not count.
        tracing::info!(
            "{name} (run {run_id}): stopped by the runner's shutdown; it runs again at the next start"
        );
        state.attempts -= 1;
        if let Err(e) = d.write_state(run_id, &state) {
            tracing::warn!("{run_id}: cannot take back the start ({e})");
        }
        return;
    }
    match summary {
        Some(s) => apply_summary(&mut rec, &s),
        None => {
            let (status_name, why) = backend_death(status.and_then(|s| s.signal()));
            rec.status = status_name.into();
            rec.reason = format!(
                "the {} backend ended ({}) without a summary{why}; see its log ({BACKEND_LOG})",
                cfg.backend.name(),
                match status {
                    Some(s) => s.to_string(),
                    None => "unknown status".into(),
                },
            );
        }
    }
    let success = rec.status == "success";
    finish(cfg, run_id, &state, rec, success);
}

/// Gives this start its own copy of the submitted job (`file` in `dir`): the first start moves the
/// queued file aside as `submitted`; every start replaces `file` with a fresh copy of it.
fn fresh_copy(dir: &std::path::Path, file: &str) -> std::io::Result<()> {
    let job = dir.join(file);
    let submitted = dir.join(SUBMITTED);
    if std::fs::symlink_metadata(&submitted).is_err() {
        rename_noreplace(&job, &submitted)?;
    } else if std::fs::symlink_metadata(&job).is_ok() {
        // Left by an interrupted start: possibly half written over.
        std::fs::remove_file(&job)?;
    }
    crate::disk_copy::copy_sparse(&submitted, &job)?;
    sync_dir(Some(dir));
    Ok(())
}

/// Copies a backend's messages into `path`, up to [`BACKEND_LOG_CAP`] bytes; the rest is read,
/// counted and dropped (one line says so), so the backend never blocks and the disk never fills.
fn keep_capped(mut from: impl Read, path: &std::path::Path) {
    let file: Box<dyn std::io::Write> = match std::fs::File::create(path) {
        Ok(f) => Box::new(f),
        Err(e) => {
            tracing::warn!(
                "cannot create {}: {e}; the backend's messages are dropped",
                path.display()
            );
            Box::new(std::io::sink())
        }
    };
    let mut sink = CappedSink::new(file, BACKEND_LOG_CAP);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sink.accept(&buf[..n]).is_err() {
                    // The log cannot be written: keep draining the pipe.
                    sink = CappedSink::new(Box::new(std::io::sink()), 0);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// The backend's one-line JSON summary: the last line of its standard output that is a JSON
/// object with a `status`. Whatever else the output holds is ignored.
pub fn backend_summary(out: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(out).lines().rev().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(|v| v.is_object() && v.get("status").is_some())
    })
}

/// The statuses a backend's summary may give (construir_contract::outcome); anything else is recorded
/// as `backend-failed`.
const BACKEND_STATUSES: &[&str] = &[
    "success",
    "failed",
    "invalid-job",
    "timed-out",
    "guest-failed",
    "interrupted",
];

/// Longest text taken from a summary into a record.
pub const SUMMARY_TEXT_MAX: usize = 1000;

/// Fills the record from a backend's summary, taking only what has the expected shape.
pub fn apply_summary(rec: &mut Record, s: &serde_json::Value) {
    let text = |k: &str| {
        s.get(k).and_then(|v| v.as_str()).map(|t| {
            let mut end = t.len().min(SUMMARY_TEXT_MAX);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            t[..end].to_string()
        })
    };
    rec.status = text("status")
        .filter(|st| BACKEND_STATUSES.contains(&st.as_str()))
        .unwrap_or_else(|| "backend-failed".into());
    rec.reason = text("reason").unwrap_or_default();
    rec.job_exit_status = s
        .get("job_exit_status")
        .and_then(|v| v.as_u64())
        .and_then(|v| u16::try_from(v).ok());
    rec.accel = text("accel");
    rec.host_kind = text("host_kind").or(rec.host_kind.take());
    rec.backend = text("backend").or(rec.backend.take());
    rec.console_bytes = s.get("console_bytes").and_then(|v| v.as_u64());
}

/// How a backend that ended without a summary is recorded. Killed by a signal, the VMM process
/// itself failed (`vmm-fault`): its seccomp filter (SIGSYS: a system call outside its allow-list,
/// a VMM bug or an escape attempt), its file-size limit (SIGXFSZ), a crash, or the OOM killer.
pub fn backend_death(signal: Option<i32>) -> (&'static str, &'static str) {
    match signal {
        Some(libc::SIGSYS) => (
            "vmm-fault",
            ": killed by its seccomp filter (a system call outside its allow-list)",
        ),
        Some(libc::SIGXFSZ) => ("vmm-fault", ": it hit its file-size limit"),
        Some(libc::SIGSEGV | libc::SIGBUS | libc::SIGABRT | libc::SIGILL) => {
            ("vmm-fault", ": it crashed")
        }
        Some(libc::SIGKILL) => ("vmm-fault", ": killed (out of memory, or by hand)"),
        Some(_) => ("vmm-fault", ": killed by a signal"),
        None => ("backend-failed", ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_taken_only_in_the_expected_shape() {
        let mut rec = Record::default();
        let out = b"noise\n{\"status\":\"success\",\"reason\":\"job succeeded\",\"job_exit_status\":0}\nnot json {\n";
        apply_summary(&mut rec, &backend_summary(out).unwrap());
        assert_eq!(
            (rec.status.as_str(), rec.job_exit_status),
            ("success", Some(0))
        );
        let hostile = serde_json::json!({"status": "pwned", "reason": "x".repeat(100_000), "job_exit_status": 70000});
        apply_summary(&mut rec, &hostile);
        assert_eq!(rec.status, "backend-failed");
        assert_eq!(rec.reason.len(), SUMMARY_TEXT_MAX);
        assert_eq!(rec.job_exit_status, None);
        assert!(backend_summary(b"[1,2]\n\"status\"\n").is_none());
    }

    #[test]
    fn a_killed_vmm_is_a_vmm_fault() {
        let (status, why) = backend_death(Some(libc::SIGSYS));
        assert_eq!(status, "vmm-fault");
        assert!(why.contains("seccomp"));
        assert_eq!(backend_death(Some(libc::SIGXFSZ)).0, "vmm-fault");
        assert_eq!(backend_death(Some(libc::SIGSEGV)).0, "vmm-fault");
        assert_eq!(backend_death(None).0, "backend-failed");
    }

    #[test]
    fn a_flooding_backend_log_is_capped() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(BACKEND_LOG);
        let flood = std::io::repeat(b'x').take(8 * BACKEND_LOG_CAP);
        keep_capped(flood, &log);
        let len = std::fs::metadata(&log).unwrap().len();
        assert!(
            len > BACKEND_LOG_CAP && len < BACKEND_LOG_CAP + 200,
            "{len} bytes kept"
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("capped"), "one line says so");
    }
}
