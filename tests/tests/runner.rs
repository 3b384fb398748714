//! construir-runner end to end: real VMs through the QEMU backend (TCG on this host: these tests
//! are about the queue, not the VMM), the runner as a child process, jobs dropped into its queue.

use construir_tests::*;
use construir_tools::pack::{JobFile, job_archive};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Runner {
    child: Child,
    dir: PathBuf,
}

impl Runner {
    fn start(dir: &Path, extra: &[&str]) -> Runner {
        let images = images_dir("t0");
        let child = Command::new(binary("construir-runner"))
            .arg("--dir")
            .arg(dir)
            .args(["--backend", "qemu", "--images-dir"])
            .arg(&images)
            .args(if extra.contains(&"--jobs") {
                &[][..]
            } else {
                &["--jobs", "2"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the runner");
        // The runner makes its directories and starts watching before it takes jobs.
        wait_for(
            "the runner's queue directory",
            Duration::from_secs(20),
            || dir.join("failed").is_dir(),
        );
        std::thread::sleep(Duration::from_millis(300));
        Runner {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("the runner did not stop within 60 s of SIGTERM");
    }

    fn record(&self, sub: &str, name: &str) -> serde_json::Value {
        self.run(sub, name).1
    }

    /// The run directory and record of the job `name` in `sub`.
    fn run(&self, sub: &str, name: &str) -> (PathBuf, serde_json::Value) {
        run_of(&self.dir, sub, name).unwrap_or_else(|| panic!("no run of {name} in {sub}/"))
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job that writes `text` into out.txt, after sleeping `sleep` seconds.
fn job_bytes(text: &str, sleep: u32) -> Vec<u8> {
    let script = format!(
        "#!/bin/sh\nset -e\nsleep {sleep}\ncd /tmp\necho '{text}' > out.txt\ntar -cJf /dev/sdb out.txt\n"
    );
    let mut bytes = job_archive(&[JobFile::script(&script)]).unwrap();
    bytes.resize(1 << 20, 0);
    bytes
}

/// Drops a job the recommended way: written elsewhere, renamed into the queue.
fn drop_job(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.incoming"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("queue").join(name)).unwrap();
}

fn output(path: &Path) -> String {
    let disk = std::fs::read(path).unwrap();
    String::from_utf8(
        construir_contract::archive::read_file(&disk[..], "out.txt", 1 << 20)
            .unwrap()
            .expect("out.txt"),
    )
    .unwrap()
}

#[test]
fn three_jobs_dropped_while_it_runs_all_end_in_done() {
    let d = tempfile::tempdir().unwrap();
    let runner = Runner::start(d.path(), &[]);
    let names = ["one_t0.tar.xz", "two_t0.tar.xz", "three_t0.tar.xz"];
    for name in names {
        drop_job(d.path(), name, &job_bytes(name, 0));
    }
    wait_for("three records in done/", Duration::from_secs(180), || {
        names.iter().all(|n| run_of(d.path(), "done", n).is_some())
    });
    for name in names {
        let rec = runner.record("done", name);
        assert_eq!(rec["status"], "success", "{rec}");
        assert_eq!(rec["exit_code"], 0);
        assert_eq!(rec["backend"], "qemu");
        assert_eq!(rec["image"], "t0");
        assert_eq!(rec["attempts"], 1);
        assert!(rec["vm_ms"].as_u64().unwrap() <= rec["runner_ms"].as_u64().unwrap());
        let log = d.path().join(rec["console_log"].as_str().unwrap());
        assert!(
            std::fs::read_to_string(log)
                .unwrap()
                .contains("construir-init")
        );
        assert_eq!(
            output(&runner.run("done", name).0.join(name)),
            format!("{name}\n")
        );
    }
    assert_eq!(
        std::fs::read_dir(d.path().join("queue")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(d.path().join("running")).unwrap().count(),
        0
    );
    runner.stop();
}

#[test]
fn a_job_copied_in_slowly_is_not_started_before_it_is_complete() {
    let d = tempfile::tempdir().unwrap();
    let runner = Runner::start(d.path(), &[]);
    let name = "slow_t0.tar.xz";
    let bytes = job_bytes("copied slowly", 0);
    let target = d.path().join("queue").join(name);
    {
        let mut f = std::fs::File::create(&target).unwrap();
        f.write_all(&bytes[..bytes.len() / 3]).unwrap();
        f.flush().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            target.exists(),
            "the runner took a file that was still being written"
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("running")).unwrap().count(),
            0
        );
        f.write_all(&bytes[bytes.len() / 3..]).unwrap();
    }
    wait_for("the slow job's record", Duration::from_secs(120), || {
        run_of(d.path(), "done", name).is_some()
    });
    assert_eq!(runner.record("done", name)["status"], "success");
    assert_eq!(
        output(&runner.run("done", name).0.join(name)),
        "copied slowly\n"
    );
    runner.stop();
}

fn vm_processes_for(job: &str) -> usize {
    let out = Command::new("pgrep").args(["-f", job]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn kill_9_mid_job_then_restart_accounts_for_every_job() {
    let d = tempfile::tempdir().unwrap();
    let mut runner = Runner::start(d.path(), &["--jobs", "1"]);
    drop_job(
        d.path(),
        "long_t0.tar.xz",
        &job_bytes("survived a runner crash", 8),
    );
    drop_job(
        d.path(),
        "queued_t0.tar.xz",
        &job_bytes("waited its turn", 0),
    );
    wait_for("the long job to run", Duration::from_secs(30), || {
        running_run(d.path(), "long_t0.tar.xz").is_some()
    });
    std::thread::sleep(Duration::from_secs(1));
    runner.signal(libc::SIGKILL);
    runner.child.wait().unwrap();
    // The VM dies with the runner: nothing keeps writing into the job.
    wait_for("the orphaned VM to end", Duration::from_secs(10), || {
        vm_processes_for("long_t0.tar.xz") == 0
    });
    assert!(running_run(d.path(), "long_t0.tar.xz").is_some());
    assert!(d.path().join("queue/queued_t0.tar.xz").exists());

    let runner = Runner::start(d.path(), &["--jobs", "1"]);
    wait_for("both jobs done", Duration::from_secs(180), || {
        ["long_t0.tar.xz", "queued_t0.tar.xz"]
            .iter()
            .all(|n| run_of(d.path(), "done", n).is_some())
    });
    let long = runner.record("done", "long_t0.tar.xz");
    assert_eq!(long["status"], "success");
    assert_eq!(long["attempts"], 2, "{long}");
    assert_eq!(
        output(
            &runner
                .run("done", "long_t0.tar.xz")
                .0
                .join("long_t0.tar.xz")
        ),
        "survived a runner crash\n"
    );
    assert_eq!(runner.record("done", "queued_t0.tar.xz")["attempts"], 1);
    runner.stop();
}

#[test]
fn sigterm_stops_a_running_job_after_the_grace_period_and_it_does_not_count() {
    let d = tempfile::tempdir().unwrap();
    let mut runner = Runner::start(d.path(), &["--jobs", "1", "--grace", "2s"]);
    drop_job(d.path(), "endless_t0.tar.xz", &job_bytes("never", 600));
    wait_for("the job to run", Duration::from_secs(30), || {
        running_run(d.path(), "endless_t0.tar.xz").is_some()
    });
    std::thread::sleep(Duration::from_secs(2));
    runner.signal(libc::SIGTERM);
    wait_for("the runner to exit", Duration::from_secs(60), || {
        runner.child.try_wait().unwrap().is_some()
    });
    // It stays in its run, to start again at the next start, and this start does not count.
    let run = running_run(d.path(), "endless_t0.tar.xz").expect("the run is kept in running/");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(state["attempts"], 0, "{state}");
    assert!(run_of(d.path(), "failed", "endless_t0.tar.xz").is_none());
}

#[test]
fn bad_names_unknown_images_garbage_and_timeouts_end_in_failed_with_reasons() {
    let d = tempfile::tempdir().unwrap();
    let runner = Runner::start(d.path(), &["--timeout", "4s"]);
    let jobs: [(&str, Vec<u8>, &str); 4] = [
        ("no-image-index.tar.xz", job_bytes("x", 0), "bad-name"),
        ("unknown_i9.tar.xz", job_bytes("x", 0), "unknown-image"),
        ("garbage_t0.tar.xz", random_bytes(200_000, 9), "invalid-job"),
        ("sleepy_t0.tar.xz", job_bytes("x", 600), "timed-out"),
    ];
    for (name, bytes, _) in &jobs {
        drop_job(d.path(), name, bytes);
    }
    wait_for("four records in failed/", Duration::from_secs(180), || {
        jobs.iter()
            .all(|(n, _, _)| run_of(d.path(), "failed", n).is_some())
    });
    for (name, bytes, status) in &jobs {
        let rec = runner.record("failed", name);
        assert_eq!(rec["status"], *status, "{rec}");
        assert!(!rec["reason"].as_str().unwrap().is_empty());
        let (run, _) = runner.run("failed", name);
        let file = if *status == "bad-name" { "job" } else { name };
        let kept = std::fs::read(run.join(file)).unwrap();
        assert_eq!(
            &kept[..bytes.len().min(512)],
            &bytes[..bytes.len().min(512)],
            "the job file is kept"
        );
    }
    assert!(d.path().join("done").read_dir().unwrap().next().is_none());
    runner.stop();
}

#[test]
fn a_backend_that_crashes_or_prints_garbage_fails_the_job_with_its_reason() {
    let d = tempfile::tempdir().unwrap();
    // A stand-in backend with the launchers' command line: garbage on stdout, then a crash, or
    // the death seccomp gives a VMM that makes a forbidden system call (SIGSYS).
    let fake = d.path().join("fake-backend");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'this is not a summary'\necho 'boom' >&2\n\
         case \"$*\" in *sys_t0*) kill -SYS $$ ;; *plain_t0*) exit 7 ;; *) kill -SEGV $$ ;; esac\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let farm = d.path().join("farm");
    let runner = Runner::start(&farm, &["--backend-program", fake.to_str().unwrap()]);
    drop_job(&farm, "crashy_t0.tar.xz", &job_bytes("x", 0));
    drop_job(&farm, "sys_t0.tar.xz", &job_bytes("x", 0));
    drop_job(&farm, "plain_t0.tar.xz", &job_bytes("x", 0));
    wait_for("the records", Duration::from_secs(30), || {
        ["crashy", "sys", "plain"]
            .iter()
            .all(|n| run_of(&farm, "failed", &format!("{n}_t0.tar.xz")).is_some())
    });
    let rec = runner.record("failed", "crashy_t0.tar.xz");
    assert_eq!(rec["status"], "vmm-fault", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("without a summary") && reason.contains("crashed"),
        "{rec}"
    );
    let log = std::fs::read_to_string(farm.join(rec["backend_log"].as_str().unwrap())).unwrap();
    assert!(log.contains("boom"));
    let rec = runner.record("failed", "sys_t0.tar.xz");
    assert_eq!(rec["status"], "vmm-fault", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("seccomp"), "{rec}");
    // Ended by itself without a summary: the backend failed, the VMM was not killed.
    let rec = runner.record("failed", "plain_t0.tar.xz");
    assert_eq!(rec["status"], "backend-failed", "{rec}");
    runner.stop();
}

#[test]
fn same_named_jobs_a_symlink_and_a_directory_through_the_running_runner() {
    let d = tempfile::tempdir().unwrap();
    // A stand-in backend that takes a second, then writes OUT-<job content> over the job.
    let fake = d.path().join("fake-backend");
    std::fs::write(
        &fake,
        "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in --job) job=$2; shift ;; esac; shift; done\n\
         c=$(cat \"$job\"); sleep 1; printf 'OUT-%s' \"$c\" > \"$job\"\n\
         echo '{\"status\":\"success\",\"reason\":\"job succeeded\",\"job_exit_status\":0}'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let farm = d.path().join("farm");
    let runner = Runner::start(&farm, &["--backend-program", fake.to_str().unwrap()]);
    let victim = d.path().join("victim.json");
    std::fs::write(&victim, b"{\"a runner-owned file\": 1}").unwrap();
    drop_job(&farm, "build_t0.tar.xz", b"first");
    wait_for("the first job to run", Duration::from_secs(20), || {
        running_run(&farm, "build_t0.tar.xz").is_some()
    });
    drop_job(&farm, "build_t0.tar.xz", b"second");
    let link = farm.join(".link.partial");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    std::fs::rename(&link, farm.join("queue/link_t0.tar.xz")).unwrap();
    std::fs::create_dir(farm.join("queue/dir_t0.tar.xz")).unwrap();
    wait_for(
        "both runs and the refusals",
        Duration::from_secs(60),
        || {
            runs_of(&farm, "done", "build_t0.tar.xz").len() == 2
                && run_of(&farm, "failed", "link_t0.tar.xz").is_some()
                && run_of(&farm, "failed", "dir_t0.tar.xz").is_some()
        },
    );
    let mut outputs: Vec<Vec<u8>> = runs_of(&farm, "done", "build_t0.tar.xz")
        .iter()
        .map(|(run, rec)| {
            assert_eq!(rec["status"], "success", "{rec}");
            std::fs::read(run.join("build_t0.tar.xz")).unwrap()
        })
        .collect();
    outputs.sort();
    assert_eq!(outputs, [b"OUT-first".to_vec(), b"OUT-second".to_vec()]);
    assert_eq!(
        runner.record("failed", "link_t0.tar.xz")["status"],
        "not-a-job"
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"{\"a runner-owned file\": 1}",
        "the link's target is untouched"
    );
    assert_eq!(std::fs::read_dir(farm.join("queue")).unwrap().count(), 0);
    runner.stop();
}
