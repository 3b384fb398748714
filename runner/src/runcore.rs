//! The run core both modes share: one job file through one backend, from spawning the launcher
//! to what happened. It knows nothing of where jobs come from or where results go: the local
//! queue (run.rs) makes a record and moves a run directory; the pull mode (remote/) uploads and
//! reports.
//!
//! The backend runs as a child that dies with the thread that started it (even if the runner is
//! killed with SIGKILL), in its own process group (a Ctrl-C meant for the runner reaches it only
//! through the runner) and in its own network namespace (netns.rs). Its one-line JSON summary is
//! read (bounded, only known statuses), its messages kept up to a cap, and it is killed if it
//! outlives its job's limit plus the boot allowance.

use crate::backend::Backend;
use crate::netns;
use construir_contract::host::HostKind;
use construir_contract::outcome::EXIT_INTERRUPTED;
use construir_launcher::console::CappedSink;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes of a backend's messages kept per run (what a guest can make a VMM log is rate-limited
/// there too; this is the runner's own bound).
pub const BACKEND_LOG_CAP: u64 = 1 << 20;

/// The running backends: a key of the caller's (a run id, an attempt id) → the child's pid, so
/// that whoever stops runs (the grace period's end, a cancel) can signal them.
pub type Children = Mutex<HashMap<String, u32>>;

/// What a VM may use; `None` leaves the launcher's default (the image's memory and vCPUs, a
/// 16 MiB console).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmLimits {
    pub memory_mib: Option<u32>,
    pub vcpus: Option<u32>,
    pub console_cap: Option<u64>,
    /// The job's fixed clock (Unix seconds; a server's job has one), for `--clock`.
    pub clock: Option<u64>,
}

/// One run to make.
pub struct RunSpec<'a> {
    pub backend: &'a Backend,
    pub host: HostKind,
    pub images_dir: &'a Path,
    /// The job file: the VM's second disk, written over by the job.
    pub job: &'a Path,
    pub console: &'a Path,
    pub backend_log: &'a Path,
    /// The job's own time limit (boot time is allowed on top).
    pub timeout: Duration,
    pub limits: VmLimits,
    pub max_job_size: u64,
    /// Set when the runner itself stops this run (its shutdown, a cancel): a backend that then
    /// ends interrupted is [`Ran::Interrupted`], not a failure.
    pub stop: &'a AtomicBool,
    pub children: &'a Children,
    /// This run's key in `children`.
    pub key: &'a str,
}

/// What a run gave: the record's fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// success, failed, invalid-job, timed-out, guest-failed, interrupted (by someone else's
    /// signal), backend-failed, vmm-fault.
    pub status: String,
    /// The backend's exit code, if it exited.
    pub exit_code: Option<i32>,
    pub job_exit_status: Option<u16>,
    pub reason: String,
    pub accel: Option<String>,
    /// As the backend saw it (`hardware-kvm`, …); `None` if it did not say.
    pub host_kind: Option<String>,
    pub backend: Option<String>,
    /// Console bytes the guest wrote, as the backend counted them.
    pub console_bytes: Option<u64>,
    /// How long the VM process ran; `None` when none was started.
    pub vm_ms: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// The backend ended by itself, failed to start, or was killed at its hard limit.
    Done(Outcome),
    /// The runner's own stop ended it (the flag was set and the backend said interrupted): it
    /// is not the job's outcome.
    Interrupted(Outcome),
}

/// Runs `spec.job` through the backend and returns what happened.
pub fn run_vm(spec: &RunSpec<'_>) -> Ran {
    let backend = spec.backend;
    let mut cmd = backend.command_with(
        spec.job,
        spec.images_dir,
        spec.timeout,
        spec.console,
        spec.max_job_size,
        &spec.limits,
    );
    let isolation = netns::mode().isolation;
    // Its own process group: a Ctrl-C meant for the runner reaches the VMs only through the
    // runner's grace period.
    cmd.process_group(0);
    // SAFETY: netns::enter calls only unshare, and prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            netns::enter(isolation)?;
            // The VM process dies with the thread that started it (even if the runner is
            // killed with SIGKILL), so no VM keeps writing into a job started again elsewhere.
            // After unshare: a change of credentials would clear it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let vm_start = Instant::now();
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Ran::Done(Outcome {
                status: "backend-failed".into(),
                reason: format!("cannot start the {} backend: {e}", backend.name()),
                ..Outcome::default()
            });
        }
    };
    spec.children
        .lock()
        .expect("children lock")
        .insert(spec.key.to_string(), child.id());
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
    let log_path = spec.backend_log.to_path_buf();
    let log_writer = std::thread::spawn(move || keep_capped(stderr, &log_path));
    let limit = backend.hard_limit(spec.timeout, spec.host);
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
    spec.children
        .lock()
        .expect("children lock")
        .remove(spec.key);
    let vm_ms = Some(vm_start.elapsed().as_millis() as u64);
    let out = reader.join().unwrap_or_default();
    let _ = log_writer.join();
    let exit_code = status.and_then(|s| s.code());
    if killed {
        return Ran::Done(Outcome {
            status: "timed-out".into(),
            reason: format!(
                "the {} backend did not end within {} s; the runner killed it",
                backend.name(),
                limit.as_secs()
            ),
            exit_code,
            vm_ms,
            ..Outcome::default()
        });
    }
    if exit_code == Some(i32::from(EXIT_INTERRUPTED)) && spec.stop.load(Ordering::SeqCst) {
        return Ran::Interrupted(Outcome {
            status: "interrupted".into(),
            reason: "stopped by the runner".into(),
            exit_code,
            vm_ms,
            ..Outcome::default()
        });
    }
    let mut outcome = match backend_summary(&out) {
        Some(s) => from_summary(&s),
        None => {
            let (status_name, why) = backend_death(status.and_then(|s| s.signal()));
            Outcome {
                status: status_name.into(),
                reason: format!(
                    "the {} backend ended ({}) without a summary{why}; see its log ({})",
                    backend.name(),
                    match status {
                        Some(s) => s.to_string(),
                        None => "unknown status".into(),
                    },
                    crate::dirs::BACKEND_LOG,
                ),
                ..Outcome::default()
            }
        }
    };
    outcome.exit_code = exit_code;
    outcome.vm_ms = vm_ms;
    Ran::Done(outcome)
}

/// Copies a backend's messages into `path`, up to [`BACKEND_LOG_CAP`] bytes; the rest is read,
/// counted and dropped (one line says so), so the backend never blocks and the disk never fills.
pub fn keep_capped(mut from: impl Read, path: &Path) {
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

/// What a backend's summary says, taking only what has the expected shape (exit code and VM
/// time are the caller's).
pub fn from_summary(s: &serde_json::Value) -> Outcome {
    let text = |k: &str| {
        s.get(k).and_then(|v| v.as_str()).map(|t| {
            let mut end = t.len().min(SUMMARY_TEXT_MAX);
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            t[..end].to_string()
        })
    };
    Outcome {
        status: text("status")
            .filter(|st| BACKEND_STATUSES.contains(&st.as_str()))
            .unwrap_or_else(|| "backend-failed".into()),
        reason: text("reason").unwrap_or_default(),
        job_exit_status: s
            .get("job_exit_status")
            .and_then(|v| v.as_u64())
            .and_then(|v| u16::try_from(v).ok()),
        accel: text("accel"),
        host_kind: text("host_kind"),
        backend: text("backend"),
        console_bytes: s.get("console_bytes").and_then(|v| v.as_u64()),
        exit_code: None,
        vm_ms: None,
    }
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
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    /// A backend that prints its arguments to its console, then a summary or nothing.
    fn fake(dir: &Path, body: &str) -> Backend {
        let exe = dir.join("backend");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in --console) con=$2; shift ;; esac; shift; done\n{body}\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        Backend::Program { exe }
    }

    fn run_with(backend: &Backend, dir: &Path, stop: &AtomicBool, limits: VmLimits) -> Ran {
        let children: Children = Mutex::new(HashMap::new());
        let job = dir.join("j_t0.tar.xz");
        std::fs::write(&job, b"job").unwrap();
        run_vm(&RunSpec {
            backend,
            host: HostKind::NoKvm,
            images_dir: dir,
            job: &job,
            console: &dir.join("console.log"),
            backend_log: &dir.join("backend.log"),
            timeout: Duration::from_secs(5),
            limits,
            max_job_size: 1 << 20,
            stop,
            children: &children,
            key: "k",
        })
    }

    #[test]
    fn a_summary_becomes_the_outcome_with_the_exit_code_and_vm_time() {
        let d = tempfile::tempdir().unwrap();
        let b = fake(
            d.path(),
            r#"echo hi > "$con"; echo '{"status":"failed","reason":"job failed with exit status 3","job_exit_status":3,"accel":"tcg","console_bytes":3}'; exit 3"#,
        );
        let Ran::Done(o) = run_with(&b, d.path(), &AtomicBool::new(false), VmLimits::default())
        else {
            panic!("not interrupted")
        };
        assert_eq!(
            (o.status.as_str(), o.exit_code, o.job_exit_status),
            ("failed", Some(3), Some(3))
        );
        assert_eq!(o.accel.as_deref(), Some("tcg"));
        assert_eq!(o.console_bytes, Some(3));
        assert!(o.vm_ms.is_some());
    }

    #[test]
    fn an_interrupted_backend_is_interrupted_only_when_the_runner_stopped_it() {
        let d = tempfile::tempdir().unwrap();
        let b = fake(d.path(), "exit 106");
        let stop = AtomicBool::new(true);
        assert!(matches!(
            run_with(&b, d.path(), &stop, VmLimits::default()),
            Ran::Interrupted(_)
        ));
        // Someone else's signal: the backend's word (no summary here) is the outcome.
        stop.store(false, Ordering::SeqCst);
        let Ran::Done(o) = run_with(&b, d.path(), &stop, VmLimits::default()) else {
            panic!("the runner did not stop it")
        };
        assert_eq!(o.status, "backend-failed");
    }

    #[test]
    fn memory_vcpus_and_console_cap_reach_the_launcher() {
        let d = tempfile::tempdir().unwrap();
        let b = fake(d.path(), "");
        let Backend::Program { exe } = &b else {
            unreachable!()
        };
        // Print the arguments as the summary's reason.
        std::fs::write(
            exe,
            "#!/bin/sh\necho \"{\\\"status\\\":\\\"success\\\",\\\"reason\\\":\\\"$*\\\"}\"\n",
        )
        .unwrap();
        let limits = VmLimits {
            memory_mib: Some(256),
            vcpus: Some(2),
            console_cap: Some(4096),
            clock: Some(1_700_000_000),
        };
        let Ran::Done(o) = run_with(&b, d.path(), &AtomicBool::new(false), limits) else {
            panic!()
        };
        assert!(o.reason.contains("--clock 1700000000"), "{}", o.reason);
        assert!(o.reason.contains("--memory 256M"), "{}", o.reason);
        assert!(o.reason.contains("--vcpus 2"), "{}", o.reason);
        assert!(o.reason.contains("--console-cap 4096"), "{}", o.reason);
    }

    #[test]
    fn the_backend_runs_off_the_network() {
        let d = tempfile::tempdir().unwrap();
        let b = fake(
            d.path(),
            r#"n=$(tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ,); echo "{\"status\":\"success\",\"reason\":\"$n\"}""#,
        );
        let Ran::Done(o) = run_with(&b, d.path(), &AtomicBool::new(false), VmLimits::default())
        else {
            panic!()
        };
        assert_eq!(o.status, "success");
        if netns::mode().isolation == netns::Isolation::None {
            eprintln!("NOT CHECKED: no network namespace can be made here");
        } else {
            assert_eq!(o.reason, "lo,", "the backend's interfaces");
        }
    }

    #[test]
    fn a_flooding_backend_log_is_capped() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join(crate::dirs::BACKEND_LOG);
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

    #[test]
    fn a_backend_that_cannot_start_is_backend_failed_without_vm_time() {
        let d = tempfile::tempdir().unwrap();
        let b = Backend::Program {
            exe: d.path().join("missing"),
        };
        let Ran::Done(o) = run_with(&b, d.path(), &AtomicBool::new(false), VmLimits::default())
        else {
            panic!()
        };
        assert_eq!(o.status, "backend-failed");
        assert_eq!(o.vm_ms, None);
    }
}
