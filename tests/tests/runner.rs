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
            || dir.join("state").is_dir(),
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
        let path = self.dir.join(sub).join(format!("{name}.json"));
        serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap()
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
        construir_abi::archive::read_file(&disk[..], "out.txt", 1 << 20)
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
        names
            .iter()
            .all(|n| d.path().join("done").join(format!("{n}.json")).exists())
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
            output(&d.path().join("done").join(name)),
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
        d.path().join("done").join(format!("{name}.json")).exists()
    });
    assert_eq!(runner.record("done", name)["status"], "success");
    assert_eq!(output(&d.path().join("done").join(name)), "copied slowly\n");
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
        d.path().join("running/long_t0.tar.xz").exists()
    });
    std::thread::sleep(Duration::from_secs(1));
    runner.signal(libc::SIGKILL);
    runner.child.wait().unwrap();
    // The VM dies with the runner: nothing keeps writing into the job.
    wait_for("the orphaned VM to end", Duration::from_secs(10), || {
        vm_processes_for("long_t0.tar.xz") == 0
    });
    assert!(d.path().join("running/long_t0.tar.xz").exists());
    assert!(d.path().join("queue/queued_t0.tar.xz").exists());

    let runner = Runner::start(d.path(), &["--jobs", "1"]);
    wait_for("both jobs done", Duration::from_secs(180), || {
        ["long_t0.tar.xz", "queued_t0.tar.xz"]
            .iter()
            .all(|n| d.path().join("done").join(format!("{n}.json")).exists())
    });
    let long = runner.record("done", "long_t0.tar.xz");
    assert_eq!(long["status"], "success");
    assert_eq!(long["attempts"], 2, "{long}");
    assert_eq!(
        output(&d.path().join("done/long_t0.tar.xz")),
        "survived a runner crash\n"
    );
    assert_eq!(runner.record("done", "queued_t0.tar.xz")["attempts"], 1);
    runner.stop();
}

#[test]
fn sigterm_puts_a_running_job_back_after_the_grace_period() {
    let d = tempfile::tempdir().unwrap();
    let mut runner = Runner::start(d.path(), &["--jobs", "1", "--grace", "2s"]);
    drop_job(d.path(), "endless_t0.tar.xz", &job_bytes("never", 600));
    wait_for("the job to run", Duration::from_secs(30), || {
        d.path().join("running/endless_t0.tar.xz").exists()
    });
    std::thread::sleep(Duration::from_secs(2));
    runner.signal(libc::SIGTERM);
    wait_for("the runner to exit", Duration::from_secs(60), || {
        runner.child.try_wait().unwrap().is_some()
    });
    assert!(
        d.path().join("queue/endless_t0.tar.xz").exists(),
        "the job went back to the queue"
    );
    assert_eq!(
        std::fs::read_dir(d.path().join("running")).unwrap().count(),
        0
    );
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
            .all(|(n, _, _)| d.path().join("failed").join(format!("{n}.json")).exists())
    });
    for (name, bytes, status) in &jobs {
        let rec = runner.record("failed", name);
        assert_eq!(rec["status"], *status, "{rec}");
        assert!(!rec["reason"].as_str().unwrap().is_empty());
        let kept = std::fs::read(d.path().join("failed").join(name)).unwrap();
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
            .all(|n| farm.join(format!("failed/{n}_t0.tar.xz.json")).exists())
    });
    let rec = runner.record("failed", "crashy_t0.tar.xz");
    assert_eq!(rec["status"], "vmm-fault", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("without a summary") && reason.contains("crashed"),
        "{rec}"
    );
    let log = std::fs::read_to_string(farm.join("logs/crashy_t0.tar.xz.backend.log")).unwrap();
    assert!(log.contains("boom"));
    let rec = runner.record("failed", "sys_t0.tar.xz");
    assert_eq!(rec["status"], "vmm-fault", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("seccomp"), "{rec}");
    // Ended by itself without a summary: the backend failed, the VMM was not killed.
    let rec = runner.record("failed", "plain_t0.tar.xz");
    assert_eq!(rec["status"], "backend-failed", "{rec}");
    runner.stop();
}
