//! The queue runner: recovery after a crash, the intake of queue/ (where strangers' files arrive:
//! one thread takes each entry once, into a run directory of its own), the arrival-ordered queue
//! fed by inotify and a start-up scan, N workers each running one job in its own VM process
//! (run.rs), and a clean stop on SIGTERM/SIGINT.

use crate::backend::Backend;
use crate::dirs::{
    QueueDirs, RECORD, Refusal, RunState, SUBMITTED, UNNAMED_JOB, is_job_candidate, is_run_id,
    rename_noreplace,
};
use crate::intake::{Writers, display_name, job_name_of, refusal_for, settled, writers};
use crate::run::{base_record, finish, move_finished};
use construir_contract::host::HostKind;
use construir_contract::record::Record;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::run::{apply_summary, backend_death, backend_summary};

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
    /// How long running jobs may go on after SIGTERM before they are stopped (and run again at
    /// the next start).
    pub grace: Duration,
    pub json: bool,
    /// Only the job of this name, then exit.
    pub once: Option<OsString>,
    /// The largest job file taken, in bytes (it is the job's disk).
    pub max_job_size: u64,
}

enum Msg {
    Arrived(OsString),
    /// The kernel's event queue overflowed: look at the whole queue again.
    Rescan,
    Finished,
}

/// How often queue/ is looked at whole, whatever inotify says (a lost event must not leave a
/// job waiting until the next start).
const RESCAN_EVERY: Duration = Duration::from_secs(30);

/// What is waiting for a free worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Work {
    /// An entry of queue/.
    New(OsString),
    /// A run in running/ that did not end (the runner stopped during it).
    Resume(String),
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn rel(cfg: &RunnerConfig, path: &Path) -> String {
    path.strip_prefix(&cfg.dirs.root)
        .unwrap_or(path)
        .display()
        .to_string()
}

pub fn emit(cfg: &RunnerConfig, event: serde_json::Value) {
    if cfg.json {
        println!("{event}");
    }
}

/// What became of an entry of queue/ at intake.
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Moved into this run, ready to start.
    Run(String),
    /// Refused, and recorded in this run in failed/.
    Refused(String),
    /// Gone: taken back by its owner, or a second sighting of a file already taken.
    Gone,
    /// Someone is still writing it, or it could not be taken just now: look again later.
    Later,
}

/// Takes one entry of queue/: unless someone is still writing it, moves it into a new run
/// directory (never over anything), then checks what it is there, where nobody else can swap it.
fn take(cfg: &RunnerConfig, name: &OsStr) -> Taken {
    let d = &cfg.dirs;
    let path = d.queue.join(name);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return Taken::Gone;
    };
    if meta.file_type().is_file() {
        match writers(&path) {
            Writers::Some => return Taken::Later,
            Writers::Unknown if !settled(&meta, SystemTime::now()) => return Taken::Later,
            _ => {}
        }
    }
    let shown = display_name(name);
    let file = job_name_of(name).unwrap_or_else(|_| UNNAMED_JOB.to_string());
    let run_id = match d.new_run() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("{shown}: cannot make a run directory ({e}); it stays queued");
            return Taken::Later;
        }
    };
    let mut state = RunState {
        job: shown.clone(),
        file,
        attempts: 0,
        taken_ms: now_ms(),
        refused: None,
    };
    let dir = d.run_dir(&run_id);
    let moved = d
        .write_state(&run_id, &state)
        .and_then(|()| rename_noreplace(&path, &dir.join(&state.file)));
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&dir);
        if e.kind() == std::io::ErrorKind::NotFound {
            return Taken::Gone;
        }
        tracing::error!(
            "{shown}: cannot take it from the queue ({e}); it stays there, tried again later"
        );
        return Taken::Later;
    }
    // Checked where it now is: a private directory, so what is checked is what runs.
    let refusal = match std::fs::symlink_metadata(dir.join(&state.file)) {
        Ok(meta) => refusal_for(name, &meta, cfg.max_job_size),
        Err(e) => Some(Refusal {
            status: "not-a-job".into(),
            reason: format!("cannot look at it: {e}"),
        }),
    };
    let Some(refusal) = refusal else {
        return Taken::Run(run_id);
    };
    tracing::warn!("{shown}: {} ({})", refusal.status, refusal.reason);
    state.refused = Some(refusal);
    if let Err(e) = d.write_state(&run_id, &state) {
        tracing::error!("{run_id}: cannot record the refusal ({e})");
    }
    fail_refused(cfg, &run_id, &state);
    Taken::Refused(run_id)
}

/// Records a refused job and moves its run to failed/.
fn fail_refused(cfg: &RunnerConfig, run_id: &str, state: &RunState) {
    let mut rec = base_record(cfg, run_id, state);
    if let Some(r) = &state.refused {
        rec.status = r.status.clone();
        rec.reason = r.reason.clone();
    }
    finish(cfg, run_id, state, rec, false);
}

/// Brings the directory back to a consistent state after the runner died (even `kill -9`), and
/// returns the runs to start again, oldest first. Each entry of running/ is handled on its own, and
/// none can stop the runner from starting:
/// - a run with its record is moved to where its record says;
/// - a run the runner did not survive `max_attempts` times is failed (`crashed-runner`);
/// - any other run is started again; a job file left in running/ by an earlier release gets a
///   run of its own; anything else is left where it is, with a warning.
pub fn recover(cfg: &RunnerConfig) -> Vec<String> {
    let d = &cfg.dirs;
    let mut resume = Vec::new();
    let entries = match d.entries_in(&d.running) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("cannot read {}: {e}", d.running.display());
            return resume;
        }
    };
    for entry in entries {
        let shown = display_name(&entry);
        let path = d.running.join(&entry);
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        match entry.to_str() {
            Some(id) if is_dir && is_run_id(id) => {
                if let Some(id) = recover_run(cfg, id) {
                    resume.push(id);
                }
            }
            _ if !is_dir && job_name_of(&entry).is_ok() => {
                // running/NAME of an earlier release: give it a run directory.
                match adopt_legacy(cfg, &entry) {
                    Ok(id) => {
                        tracing::info!("{shown}: an earlier release's running job; now run {id}");
                        resume.push(id);
                    }
                    Err(e) => {
                        tracing::warn!("{shown} in running/: cannot adopt it ({e}); left there")
                    }
                }
            }
            _ => {
                tracing::warn!("{shown} in running/ is not a run the runner made; left where it is")
            }
        }
    }
    resume
}

/// One run directory found in running/ at start: `Some(id)` to start it again.
fn recover_run(cfg: &RunnerConfig, id: &str) -> Option<String> {
    let d = &cfg.dirs;
    let dir = d.run_dir(id);
    if let Ok(text) = std::fs::read(dir.join(RECORD)) {
        let success = serde_json::from_slice::<Record>(&text).is_ok_and(|r| r.status == "success");
        tracing::info!("run {id} had ended; moving it with its record");
        move_finished(cfg, id, success);
        return None;
    }
    let state = match d.read_state(id) {
        Ok(s) => s,
        Err(_) => {
            // Made, but the runner died before the job was moved in: nothing to keep.
            if std::fs::remove_dir(&dir).is_err() {
                tracing::warn!("run {id} has no readable state; left in running/");
            }
            return None;
        }
    };
    // Temporary files of a write the runner died in.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let submitted = dir.join(SUBMITTED);
    let job = if std::fs::symlink_metadata(&submitted).is_ok() {
        submitted
    } else {
        dir.join(&state.file)
    };
    let Ok(meta) = std::fs::symlink_metadata(&job) else {
        tracing::info!("run {id}: its job never arrived; removing the empty run");
        let _ = std::fs::remove_dir_all(&dir);
        return None;
    };
    let mut state = state;
    if state.refused.is_none() {
        // The runner may have died between taking an entry and recording that it is refused.
        state.refused = refusal_for(OsStr::new(&state.file), &meta, cfg.max_job_size);
    }
    if state.refused.is_some() {
        fail_refused(cfg, id, &state);
        return None;
    }
    if state.attempts >= cfg.max_attempts {
        tracing::warn!(
            "{} (run {id}): the runner stopped during it {} times: failing it",
            state.job,
            state.attempts
        );
        let mut rec = base_record(cfg, id, &state);
        rec.status = "crashed-runner".into();
        rec.reason = format!(
            "the runner stopped while this job ran, {} times; not retried (it may crash the host)",
            state.attempts
        );
        finish(cfg, id, &state, rec, false);
        return None;
    }
    tracing::info!(
        "{} (run {id}): was running when the runner stopped; it starts again (attempt {} of {})",
        state.job,
        state.attempts + 1,
        cfg.max_attempts
    );
    Some(id.to_string())
}

/// Moves `running/NAME` (the layout before run directories) into a run of its own, keeping its
/// start count from `state/NAME.attempts`.
fn adopt_legacy(cfg: &RunnerConfig, name: &OsStr) -> std::io::Result<String> {
    let d = &cfg.dirs;
    let file = job_name_of(name).map_err(std::io::Error::other)?;
    let legacy_count = d.root.join("state").join(format!("{file}.attempts"));
    let attempts = std::fs::read_to_string(&legacy_count)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let id = d.new_run()?;
    let state = RunState {
        job: file.clone(),
        file: file.clone(),
        attempts,
        taken_ms: now_ms(),
        refused: None,
    };
    d.write_state(&id, &state)?;
    if let Err(e) = rename_noreplace(&d.running.join(name), &d.run_dir(&id).join(&file)) {
        let _ = std::fs::remove_dir_all(d.run_dir(&id));
        return Err(e);
    }
    let _ = std::fs::remove_file(legacy_count);
    Ok(id)
}

/// Runs the queue until stopped (or, with `once`, until that job is done: then its run's id).
pub fn run(cfg: RunnerConfig) -> anyhow::Result<Option<String>> {
    let cfg = Arc::new(cfg);
    let resumed = recover(&cfg);
    let (tx, rx) = mpsc::channel::<Msg>();
    let watch_tx = tx.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else {
            let _ = watch_tx.send(Msg::Rescan);
            return;
        };
        if event.need_rescan() {
            let _ = watch_tx.send(Msg::Rescan);
            return;
        }
        // A file closed after writing, or renamed into the queue, may be complete (intake checks
        // that nobody still writes it).
        let complete = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
                | EventKind::Create(_)
        );
        if complete
            && let Some(path) = event.paths.last()
            && let Some(name) = path.file_name()
        {
            let _ = watch_tx.send(Msg::Arrived(name.to_os_string()));
        }
    })?;
    watcher.watch(&cfg.dirs.queue, RecursiveMode::NonRecursive)?;

    let wanted = |name: &OsStr| cfg.once.as_deref().is_none_or(|o| o == name);
    let mut pending: VecDeque<Work> = VecDeque::new();
    let mut queued: HashSet<OsString> = HashSet::new();
    if cfg.once.is_none() {
        pending.extend(resumed.into_iter().map(Work::Resume));
    } else if !resumed.is_empty() {
        eprintln!(
            "construir-runner: {} unfinished run(s) in running/ start again at the next start without --once",
            resumed.len()
        );
    }
    for name in cfg.dirs.entries_in(&cfg.dirs.queue)? {
        if wanted(&name) && queued.insert(name.clone()) {
            pending.push_back(Work::New(name));
        }
    }
    let children: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut later: Vec<OsString> = Vec::new();
    let mut looked_again = Instant::now();
    let mut active = 0usize;
    let mut once_done = false;
    let mut once_run: Option<String> = None;
    let mut scanned = Instant::now();
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
        if !later.is_empty() && looked_again.elapsed() > Duration::from_secs(1) {
            looked_again = Instant::now();
            for name in later.drain(..) {
                if queued.insert(name.clone()) {
                    pending.push_front(Work::New(name));
                }
            }
        }
        while stop_at.is_none() && active < cfg.jobs {
            let Some(work) = pending.pop_front() else {
                break;
            };
            let run_id = match work {
                Work::Resume(id) => id,
                Work::New(name) => {
                    queued.remove(&name);
                    match take(&cfg, &name) {
                        Taken::Run(id) => id,
                        Taken::Later => {
                            later.push(name);
                            continue;
                        }
                        Taken::Refused(id) => {
                            if cfg.once.is_some() {
                                once_done = true;
                                once_run = Some(id);
                            }
                            continue;
                        }
                        Taken::Gone => continue,
                    }
                }
            };
            if cfg.once.is_some() {
                once_done = true;
                once_run = Some(run_id.clone());
            }
            active += 1;
            let (cfg, tx, children) = (cfg.clone(), tx.clone(), children.clone());
            std::thread::spawn(move || {
                crate::run::run(&cfg, &run_id, &children);
                let _ = tx.send(Msg::Finished);
            });
        }
        if let Some(at) = stop_at {
            if active == 0 {
                break;
            }
            if at.elapsed() > cfg.grace && !signalled {
                signalled = true;
                for (run_id, pid) in children.lock().expect("children lock").iter() {
                    eprintln!(
                        "construir-runner: grace period over: stopping run {run_id}; it runs again at the next start"
                    );
                    // SAFETY: signalling our own child process.
                    unsafe { libc::kill(*pid as libc::pid_t, libc::SIGTERM) };
                }
            }
        }
        if once_done && pending.is_empty() && later.is_empty() && active == 0 {
            break;
        }
        let mut rescan = scanned.elapsed() > RESCAN_EVERY;
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Msg::Arrived(name)) => {
                if wanted(&name) && is_job_candidate(&name) && queued.insert(name.clone()) {
                    pending.push_back(Work::New(name));
                }
            }
            Ok(Msg::Rescan) => rescan = true,
            Ok(Msg::Finished) => active -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if rescan && stop_at.is_none() {
            scanned = Instant::now();
            match cfg.dirs.entries_in(&cfg.dirs.queue) {
                Ok(names) => {
                    for name in names {
                        if wanted(&name) && !later.contains(&name) && queued.insert(name.clone()) {
                            pending.push_back(Work::New(name));
                        }
                    }
                }
                Err(e) => tracing::warn!("cannot read {}: {e}", cfg.dirs.queue.display()),
            }
        }
    }
    Ok(once_run)
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
