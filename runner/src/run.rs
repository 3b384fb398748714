//! One run of a job in the local queue mode, in its own directory under running/: the start count
//! made durable first, the job run by the run core (runcore.rs: the backend child, its summary, its
//! capped messages), then the record written into the run's directory and the directory moved,
//! whole, to done/ or failed/.

use crate::dirs::{
    BACKEND_LOG, CONSOLE_LOG, RECORD, RunState, SUBMITTED, rename_noreplace, sync_dir, write_atomic,
};
use crate::runcore::{Children, Outcome, Ran, RunSpec, VmLimits, from_summary, run_vm};
use crate::runner::{RunnerConfig, STOP, emit, now_ms, rel};
use construir_contract::jobname::parse_job_name;
use construir_contract::manifest::Image;
use construir_contract::record::Record;

pub use crate::runcore::{BACKEND_LOG_CAP, SUMMARY_TEXT_MAX, backend_death, backend_summary};

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
pub fn run(cfg: &RunnerConfig, run_id: &str, children: &Children) {
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
    let ran = run_vm(&RunSpec {
        backend: &cfg.backend,
        host: cfg.host,
        images_dir: &cfg.images_dir,
        job: &job,
        console: &console,
        backend_log: &backend_log,
        timeout: cfg.timeout,
        limits: VmLimits::default(),
        max_job_size: cfg.max_job_size,
        stop: &STOP,
        children,
        key: run_id,
    });
    let outcome = match ran {
        Ran::Done(outcome) => outcome,
        Ran::Interrupted(_) => {
            // Stopped by our own shutdown: it stays in running/, is started again at the next
            // start, and this start does not count.
            tracing::info!(
                "{name} (run {run_id}): stopped by the runner's shutdown; it runs again at the next start"
            );
            state.attempts -= 1;
            if let Err(e) = d.write_state(run_id, &state) {
                tracing::warn!("{run_id}: cannot take back the start ({e})");
            }
            return;
        }
    };
    apply_outcome(&mut rec, outcome);
    let success = rec.status == "success";
    finish(cfg, run_id, &state, rec, success);
}

/// Fills the record from what the run core says.
pub fn apply_outcome(rec: &mut Record, o: Outcome) {
    rec.vm_ms = o.vm_ms;
    rec.exit_code = o.exit_code;
    take_fields(rec, o);
}

/// Fills the record from a backend's summary, taking only what has the expected shape.
pub fn apply_summary(rec: &mut Record, s: &serde_json::Value) {
    take_fields(rec, from_summary(s));
}

/// The outcome's own fields; the backend's names win over the runner's when it gave them.
fn take_fields(rec: &mut Record, o: Outcome) {
    rec.status = o.status;
    rec.reason = o.reason;
    rec.job_exit_status = o.job_exit_status;
    rec.accel = o.accel;
    rec.host_kind = o.host_kind.or(rec.host_kind.take());
    rec.backend = o.backend.or(rec.backend.take());
    rec.console_bytes = o.console_bytes;
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
}
