//! The queue runner: recovery after a crash, the arrival-ordered queue fed by inotify
//! (close-after-write and moved-in events only, so a file still being written is never taken),
//! N workers each running one job in its own VM process, and a clean stop on SIGTERM/SIGINT.

use crate::backend::Backend;
use crate::dirs::{QueueDirs, is_job_candidate, unique_name, write_atomic};
use crate::record::Record;
use construir_abi::host::HostKind;
use construir_abi::jobname::parse_job_name;
use construir_abi::manifest::Image;
use construir_abi::outcome::EXIT_INTERRUPTED;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Set by SIGINT/SIGTERM.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub struct RunnerConfig {
    pub dirs: QueueDirs,
    pub jobs: usize,
    pub backend: Backend,
    pub host: HostKind,
    pub timeout: Duration,
    pub images_dir: PathBuf,
    /// A job whose runs the runner did not survive this many times is failed, not retried.
    pub max_attempts: u32,
    /// How long running jobs may go on after SIGTERM before they are stopped and re-queued.
    pub grace: Duration,
    pub json: bool,
    /// Only this job, then exit.
    pub once: Option<String>,
}

enum Msg {
    Arrived(String),
    Finished,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rel(cfg: &RunnerConfig, path: &Path) -> String {
    path.strip_prefix(&cfg.dirs.root)
        .unwrap_or(path)
        .display()
        .to_string()
}

fn emit(cfg: &RunnerConfig, event: serde_json::Value) {
    if cfg.json {
        println!("{event}");
    }
}

/// Brings the directory back to a consistent state after the runner died (even `kill -9`):
/// every job in running/ goes back to queue/, or to failed/ once it has been started
/// `max_attempts` times; a job in done/ or failed/ without a record gets one.
pub fn recover(cfg: &RunnerConfig) -> std::io::Result<()> {
    let d = &cfg.dirs;
    for name in d.jobs_in(&d.running)? {
        let attempts = d.attempts(&name);
        if attempts >= cfg.max_attempts {
            tracing::warn!("{name}: the runner stopped during it {attempts} times: failing it");
            let mut rec = base_record(cfg, &name, attempts);
            rec.status = "crashed-runner".into();
            rec.reason = format!(
                "the runner stopped while this job ran, {attempts} times; not retried (it may crash the host)"
            );
            finish(cfg, &d.running.join(&name), rec, false);
        } else {
            tracing::info!(
                "{name}: was running when the runner stopped; back to the queue (attempt {attempts} of {})",
                cfg.max_attempts
            );
            std::fs::rename(d.running.join(&name), d.queue.join(&name))?;
        }
    }
    for dir in [&d.done, &d.failed] {
        for name in d.jobs_in(dir)? {
            if !dir.join(format!("{name}.json")).exists() {
                let mut rec = base_record(cfg, &name, d.attempts(&name));
                rec.job_file = rel(cfg, &dir.join(&name));
                rec.status = if dir == &d.done {
                    "success".into()
                } else {
                    "failed".into()
                };
                rec.reason =
                    "the runner stopped after moving this job and before writing its record".into();
                write_atomic(
                    &dir.join(format!("{name}.json")),
                    &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
                )?;
                d.clear_attempts(&name);
            }
        }
    }
    Ok(())
}

fn base_record(cfg: &RunnerConfig, name: &str, attempts: u32) -> Record {
    Record {
        job: name.to_string(),
        backend: Some(cfg.backend.name().to_string()),
        host_kind: Some(cfg.host.as_str().to_string()),
        started_ms: now_ms(),
        attempts,
        ..Record::default()
    }
}

/// Moves the job to done/ (success) or failed/, then writes its record next to it.
fn finish(cfg: &RunnerConfig, from: &Path, mut rec: Record, success: bool) {
    let d = &cfg.dirs;
    let dir = if success { &d.done } else { &d.failed };
    let name = unique_name(dir, &rec.job);
    let dest = dir.join(&name);
    rec.job_bytes = std::fs::metadata(from).map(|m| m.len()).unwrap_or(0);
    if let Err(e) = std::fs::rename(from, &dest) {
        tracing::error!(
            "cannot move {} to {}: {e}; it stays where it is",
            from.display(),
            dest.display()
        );
        return;
    }
    rec.job_file = rel(cfg, &dest);
    rec.ended_ms = now_ms();
    rec.runner_ms = rec.ended_ms.saturating_sub(rec.started_ms);
    let record_path = dir.join(format!("{name}.json"));
    if let Err(e) = write_atomic(
        &record_path,
        &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
    ) {
        tracing::error!("cannot write {}: {e}", record_path.display());
    }
    d.clear_attempts(&rec.job);
    eprintln!(
        "construir-runner: finished {}: {} ({}) in {:.1} s -> {}",
        rec.job,
        rec.status,
        rec.reason,
        rec.runner_ms as f64 / 1000.0,
        rec.job_file
    );
    emit(cfg, serde_json::json!({"event": "finished", "record": rec}));
}

/// Runs one job from the queue to done/ or failed/ (or back to the queue if the runner stops).
fn handle(cfg: &RunnerConfig, name: &str, children: &Mutex<HashMap<String, u32>>) {
    let d = &cfg.dirs;
    let attempts = d.attempts(name) + 1;
    if let Err(e) = d.set_attempts(name, attempts) {
        tracing::error!("{name}: cannot record the attempt ({e}); leaving it queued");
        return;
    }
    let running = d.running.join(name);
    if let Err(e) = std::fs::rename(d.queue.join(name), &running) {
        // Gone (taken back by its owner, or a duplicate event): nothing to do.
        tracing::debug!("{name}: not in the queue any more ({e})");
        let _ = d.set_attempts(name, attempts - 1);
        return;
    }
    let mut rec = base_record(cfg, name, attempts);
    let job_name = match parse_job_name(name) {
        Ok(j) => j,
        Err(e) => {
            rec.status = "bad-name".into();
            rec.reason = e.to_string();
            return finish(cfg, &running, rec, false);
        }
    };
    rec.image = Some(job_name.image.clone());
    if let Err(e) = Image::load(&cfg.images_dir, &job_name.image) {
        rec.status = "unknown-image".into();
        rec.reason = e.to_string();
        return finish(cfg, &running, rec, false);
    }
    let console = d.logs.join(format!("{name}.log"));
    let backend_log = d.logs.join(format!("{name}.backend.log"));
    rec.console_log = Some(rel(cfg, &console));
    eprintln!(
        "construir-runner: started {name} (backend {}, image {}, attempt {attempts})",
        cfg.backend.name(),
        job_name.image
    );
    emit(
        cfg,
        serde_json::json!({"event": "started", "job": name, "backend": cfg.backend.name(), "image": job_name.image}),
    );
    let mut cmd = cfg
        .backend
        .command(&running, &cfg.images_dir, cfg.timeout, &console);
    let stderr = match std::fs::File::create(&backend_log) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    };
    let vm_start = Instant::now();
    // The VM process dies with this worker (even if the runner is killed with SIGKILL), so no VM
    // keeps writing into a job the restarted runner has put back in the queue.
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
        .stderr(stderr)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            rec.status = "backend-failed".into();
            rec.reason = format!("cannot start the {} backend: {e}", cfg.backend.name());
            return finish(cfg, &running, rec, false);
        }
    };
    children
        .lock()
        .expect("children lock")
        .insert(name.to_string(), child.id());
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut out);
        out
    });
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
    children.lock().expect("children lock").remove(name);
    rec.vm_ms = Some(vm_start.elapsed().as_millis() as u64);
    let out = reader.join().unwrap_or_default();
    let summary = backend_summary(&out);
    rec.exit_code = status.and_then(|s| s.code());
    if killed {
        rec.status = "timed-out".into();
        rec.reason = format!(
            "the {} backend did not end within {} s; the runner killed it",
            cfg.backend.name(),
            limit.as_secs()
        );
        return finish(cfg, &running, rec, false);
    }
    if rec.exit_code == Some(i32::from(EXIT_INTERRUPTED)) && STOP.load(Ordering::SeqCst) {
        // Stopped by our own shutdown: back to the queue, and this start does not count.
        tracing::info!("{name}: stopped by the runner's shutdown; back to the queue");
        let _ = std::fs::rename(&running, d.queue.join(name));
        let _ = d.set_attempts(name, attempts - 1);
        return;
    }
    match summary {
        Some(s) => apply_summary(&mut rec, &s),
        None => {
            let (status_name, why) = backend_death(status.and_then(|s| s.signal()));
            rec.status = status_name.into();
            rec.reason = format!(
                "the {} backend ended ({}) without a summary{why}; see {}",
                cfg.backend.name(),
                match status {
                    Some(s) => s.to_string(),
                    None => "unknown status".into(),
                },
                rel(cfg, &backend_log)
            );
        }
    }
    let success = rec.status == "success";
    finish(cfg, &running, rec, success);
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

/// The statuses a backend's summary may give (construir_abi::outcome); anything else is recorded
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
const SUMMARY_TEXT_MAX: usize = 1000;

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

/// Runs the queue until stopped (or, with `once`, until that job is done).
pub fn run(cfg: RunnerConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    recover(&cfg)?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let watch_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Only a file closed after writing, or renamed into the queue, is complete.
        let complete = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        );
        if complete
            && let Some(path) = event.paths.last()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            let _ = watch_tx.send(Msg::Arrived(name.to_string()));
        }
    })?;
    watcher.watch(&cfg.dirs.queue, RecursiveMode::NonRecursive)?;

    let mut pending: VecDeque<String> = VecDeque::new();
    let mut queued: HashSet<String> = HashSet::new();
    for name in cfg.dirs.jobs_in(&cfg.dirs.queue)? {
        if cfg.once.as_deref().is_none_or(|o| o == name) && queued.insert(name.clone()) {
            pending.push_back(name);
        }
    }
    let children: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut active = 0usize;
    let mut stop_at: Option<Instant> = None;
    let mut signalled = false;
    loop {
        if STOP.load(Ordering::SeqCst) && stop_at.is_none() {
            stop_at = Some(Instant::now());
            eprintln!(
                "construir-runner: stopping: no new jobs; {active} running job(s) get {} s to finish",
                cfg.grace.as_secs()
            );
        }
        while stop_at.is_none() && active < cfg.jobs {
            let Some(name) = pending.pop_front() else {
                break;
            };
            queued.remove(&name);
            active += 1;
            let (cfg, tx, children) = (cfg.clone(), tx.clone(), children.clone());
            std::thread::spawn(move || {
                handle(&cfg, &name, &children);
                let _ = tx.send(Msg::Finished);
            });
        }
        if let Some(at) = stop_at {
            if active == 0 {
                break;
            }
            if at.elapsed() > cfg.grace && !signalled {
                signalled = true;
                for (name, pid) in children.lock().expect("children lock").iter() {
                    eprintln!(
                        "construir-runner: grace period over: stopping {name}; it goes back to the queue"
                    );
                    // SAFETY: signalling our own child process.
                    unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
                }
            }
        }
        if cfg.once.is_some() && pending.is_empty() && active == 0 {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Msg::Arrived(name)) => {
                let wanted = cfg.once.as_deref().is_none_or(|o| o == name);
                if wanted
                    && is_job_candidate(&name)
                    && cfg.dirs.queue.join(&name).is_file()
                    && queued.insert(name.clone())
                {
                    pending.push_back(name);
                }
            }
            Ok(Msg::Finished) => active -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
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

    fn config(root: &Path) -> RunnerConfig {
        RunnerConfig {
            dirs: QueueDirs::create(root).unwrap(),
            jobs: 1,
            backend: Backend::Program {
                exe: "/bin/false".into(),
            },
            host: HostKind::NoKvm,
            timeout: Duration::from_secs(10),
            images_dir: root.join("images"),
            max_attempts: 3,
            grace: Duration::from_secs(1),
            json: false,
            once: None,
        }
    }

    #[test]
    fn recovery_requeues_then_fails_a_job_that_keeps_killing_the_runner() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        std::fs::write(cfg.dirs.running.join("a_t0.tar.xz"), b"job a").unwrap();
        cfg.dirs.set_attempts("a_t0.tar.xz", 1).unwrap();
        std::fs::write(cfg.dirs.running.join("b_t0.tar.xz"), b"job b").unwrap();
        cfg.dirs.set_attempts("b_t0.tar.xz", 3).unwrap();
        // Moved to done/ but no record yet.
        std::fs::write(cfg.dirs.done.join("c_t0.tar.xz"), b"job c").unwrap();
        recover(&cfg).unwrap();
        assert_eq!(
            std::fs::read(cfg.dirs.queue.join("a_t0.tar.xz")).unwrap(),
            b"job a"
        );
        assert_eq!(
            cfg.dirs.attempts("a_t0.tar.xz"),
            1,
            "the count survives the requeue"
        );
        assert_eq!(
            std::fs::read(cfg.dirs.failed.join("b_t0.tar.xz")).unwrap(),
            b"job b"
        );
        let rec: Record = serde_json::from_slice(
            &std::fs::read(cfg.dirs.failed.join("b_t0.tar.xz.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec.status, "crashed-runner");
        assert_eq!(rec.attempts, 3);
        let rec: Record =
            serde_json::from_slice(&std::fs::read(cfg.dirs.done.join("c_t0.tar.xz.json")).unwrap())
                .unwrap();
        assert!(rec.reason.contains("before writing its record"));
        assert_eq!(std::fs::read_dir(&cfg.dirs.running).unwrap().count(), 0);
    }

    #[test]
    fn bad_names_and_unknown_images_fail_without_a_vm() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        std::fs::create_dir_all(&cfg.images_dir).unwrap();
        let children = Mutex::new(HashMap::new());
        for (name, status) in [
            ("no-index.tar.xz", "bad-name"),
            ("x_i9.tar.xz", "unknown-image"),
        ] {
            std::fs::write(cfg.dirs.queue.join(name), b"data").unwrap();
            handle(&cfg, name, &children);
            let rec: Record = serde_json::from_slice(
                &std::fs::read(cfg.dirs.failed.join(format!("{name}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(rec.status, status);
            assert!(!rec.reason.is_empty());
            assert_eq!(
                std::fs::read(cfg.dirs.failed.join(name)).unwrap(),
                b"data",
                "the job file is kept"
            );
            assert_eq!(cfg.dirs.attempts(name), 0);
        }
    }
}
