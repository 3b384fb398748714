//! The queue's hostile cases, each against intake, a run and recovery directly (no VM: the
//! backend is a shell script with the launchers' command line).

use super::*;
use crate::dirs::{CONSOLE_LOG, RUN_STATE};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;

/// A stand-in backend: logs the job's content to the console, writes `OUT-<content>` over the
/// job, and reports success.
const FAKE_BACKEND: &str = r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in --job) job=$2; shift ;; --console) con=$2; shift ;; esac
  shift
done
content=$(cat "$job")
echo "console of $content" > "$con"
echo "backend message for $content" >&2
printf 'OUT-%s' "$content" > "$job"
echo '{"status":"success","reason":"job succeeded","job_exit_status":0}'
"#;

fn config(root: &Path) -> RunnerConfig {
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let manifest = serde_json::json!({
        "index": "t0", "description": "test", "disk": "t0.qcow2", "disk_format": "qcow2",
        "disk_sha256": "a".repeat(64), "virtual_size": 1 << 20, "kernel": "kernels/vmlinux-k",
        "kernel_sha256": "b".repeat(64), "memory_mib": 128, "vcpus": 1,
        "init_sha256": "c".repeat(64), "installed": [], "build_key": "k"
    });
    std::fs::write(images.join("t0.json"), manifest.to_string()).unwrap();
    let fake = root.join("fake-backend");
    std::fs::write(&fake, FAKE_BACKEND).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    RunnerConfig {
        dirs: QueueDirs::create(&root.join("farm")).unwrap(),
        jobs: 1,
        backend: Backend::Program { exe: fake },
        host: HostKind::NoKvm,
        timeout: Duration::from_secs(10),
        images_dir: images,
        max_attempts: 3,
        grace: Duration::from_secs(1),
        json: false,
        once: None,
        max_job_size: 1 << 20,
    }
}

fn record(cfg: &RunnerConfig, sub: &str, run_id: &str) -> Record {
    let path = cfg.dirs.root.join(sub).join(run_id).join(RECORD);
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The one run in `sub` (done/ or failed/) whose record names `job`, panicking unless exactly one.
fn only_run(cfg: &RunnerConfig, sub: &str) -> String {
    let runs: Vec<String> = std::fs::read_dir(cfg.dirs.root.join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(runs.len(), 1, "{sub}: {runs:?}");
    runs[0].clone()
}

fn queue(cfg: &RunnerConfig, name: &str, bytes: &[u8]) {
    let tmp = cfg.dirs.root.join(format!(".{name}.incoming"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, cfg.dirs.queue.join(name)).unwrap();
}

fn taken(cfg: &RunnerConfig, name: &str) -> String {
    match take(cfg, OsStr::new(name)) {
        Taken::Run(id) => id,
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn two_jobs_of_one_name_both_run_and_keep_their_own_output_record_and_log() {
    // Defect 1: the second job's rename into running/ used to replace the first job's file.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let children = Mutex::new(HashMap::new());
    queue(&cfg, "build_t0.tar.xz", b"A");
    let first = taken(&cfg, "build_t0.tar.xz");
    // The same name again, while the first is in running/.
    queue(&cfg, "build_t0.tar.xz", b"B");
    let second = taken(&cfg, "build_t0.tar.xz");
    assert_ne!(first, second);
    assert_eq!(
        std::fs::read(cfg.dirs.run_dir(&first).join("build_t0.tar.xz")).unwrap(),
        b"A",
        "the first job's file is untouched"
    );
    crate::run::run(&cfg, &second, &children);
    crate::run::run(&cfg, &first, &children);
    for (id, content) in [(&first, "A"), (&second, "B")] {
        let dir = cfg.dirs.done.join(id);
        assert_eq!(
            std::fs::read_to_string(dir.join("build_t0.tar.xz")).unwrap(),
            format!("OUT-{content}")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(CONSOLE_LOG)).unwrap(),
            format!("console of {content}\n")
        );
        assert!(
            std::fs::read_to_string(dir.join("backend.log"))
                .unwrap()
                .contains(&format!("backend message for {content}"))
        );
        let rec = record(&cfg, "done", id);
        assert_eq!(rec.status, "success");
        assert_eq!(rec.run_id, *id);
        assert_eq!(rec.job, "build_t0.tar.xz");
        assert_eq!(rec.job_file, format!("done/{id}/build_t0.tar.xz"));
        assert_eq!(rec.console_log, Some(format!("done/{id}/console.log")));
        assert_eq!(rec.attempts, 1);
    }
    assert_eq!(std::fs::read_dir(&cfg.dirs.running).unwrap().count(), 0);
}

#[test]
fn recovery_starts_a_run_again_without_touching_a_queued_job_of_the_same_name() {
    // Defect 1b: recovery used to rename running/N over a newly queued N.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    queue(&cfg, "a_t0.tar.xz", b"old");
    let id = taken(&cfg, "a_t0.tar.xz");
    let mut st = cfg.dirs.read_state(&id).unwrap();
    st.attempts = 1;
    cfg.dirs.write_state(&id, &st).unwrap();
    queue(&cfg, "a_t0.tar.xz", b"new");
    assert_eq!(recover(&cfg), vec![id.clone()]);
    assert_eq!(
        std::fs::read(cfg.dirs.queue.join("a_t0.tar.xz")).unwrap(),
        b"new"
    );
    assert_eq!(
        std::fs::read(cfg.dirs.run_dir(&id).join("a_t0.tar.xz")).unwrap(),
        b"old"
    );
    assert_eq!(
        cfg.dirs.read_state(&id).unwrap().attempts,
        1,
        "the count survives"
    );
}

#[test]
fn a_symlink_in_the_queue_fails_as_not_a_job_and_its_target_is_never_touched() {
    // Defect 2: a link renamed into queue/ was run read-write on its target.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let target = cfg.images_dir.join("t0.json");
    let before = std::fs::read(&target).unwrap();
    let link = cfg.dirs.root.join(".l.partial");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::fs::rename(&link, cfg.dirs.queue.join("evil_t0.tar.xz")).unwrap();
    assert!(matches!(
        take(&cfg, OsStr::new("evil_t0.tar.xz")),
        Taken::Refused(_)
    ));
    let id = only_run(&cfg, "failed");
    let rec = record(&cfg, "failed", &id);
    assert_eq!(rec.status, "not-a-job");
    assert!(rec.reason.contains("symbolic link"), "{}", rec.reason);
    let kept = cfg.dirs.failed.join(&id).join("evil_t0.tar.xz");
    assert!(
        std::fs::symlink_metadata(&kept)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        before,
        "the target is untouched"
    );

    // A hard link to someone else's file is refused the same way.
    std::fs::hard_link(&target, cfg.dirs.queue.join("hard_t0.tar.xz")).unwrap();
    let backdate = std::time::SystemTime::now() - Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&target)
        .unwrap()
        .set_modified(backdate)
        .unwrap();
    assert!(matches!(
        take(&cfg, OsStr::new("hard_t0.tar.xz")),
        Taken::Refused(_)
    ));
    assert_eq!(std::fs::read(&target).unwrap(), before);
    let statuses: Vec<String> = std::fs::read_dir(&cfg.dirs.failed)
        .unwrap()
        .map(|e| record(&cfg, "failed", e.unwrap().file_name().to_str().unwrap()).reason)
        .collect();
    assert!(
        statuses.iter().any(|r| r.contains("hard links")),
        "{statuses:?}"
    );
}

#[test]
fn a_directory_named_like_a_running_job_cannot_stop_the_runner_from_starting() {
    // Defect 3: recover() failed with EISDIR on every start.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    queue(&cfg, "long_t0.tar.xz", b"L");
    let id = taken(&cfg, "long_t0.tar.xz");
    std::fs::create_dir(cfg.dirs.queue.join("long_t0.tar.xz")).unwrap();
    // Junk in running/ that the runner did not make, and a run with no readable state.
    std::fs::create_dir(cfg.dirs.running.join("junk_t0.tar.xz")).unwrap();
    let broken = cfg.dirs.new_run().unwrap();
    std::fs::write(cfg.dirs.run_dir(&broken).join(RUN_STATE), b"{not json").unwrap();
    // A job file left in running/ by the layout before run directories.
    std::fs::write(cfg.dirs.running.join("legacy_t0.tar.xz"), b"legacy").unwrap();
    let resumed = recover(&cfg);
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert!(resumed.contains(&id));
    assert!(
        cfg.dirs.running.join("junk_t0.tar.xz").is_dir(),
        "left alone"
    );
    assert!(cfg.dirs.run_dir(&broken).is_dir(), "left alone");
    // The directory in the queue is refused at intake like any other non-file.
    assert!(matches!(
        take(&cfg, OsStr::new("long_t0.tar.xz")),
        Taken::Refused(_)
    ));
    let failed = only_run(&cfg, "failed");
    assert_eq!(record(&cfg, "failed", &failed).status, "not-a-job");
    // The whole loop starts too.
    let legacy = resumed.iter().find(|r| **r != id).unwrap();
    assert_eq!(
        std::fs::read(cfg.dirs.run_dir(legacy).join("legacy_t0.tar.xz")).unwrap(),
        b"legacy"
    );
}

#[test]
fn names_that_are_not_utf8_or_too_long_fail_as_bad_names_with_a_record() {
    // Defects 10 and 11: such jobs used to sit in the queue forever, with no record.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let raw = OsString::from_vec(b"caf\xe9_t0.tar.xz".to_vec());
    std::fs::write(cfg.dirs.queue.join(&raw), b"x").unwrap();
    let backdate = std::time::SystemTime::now() - Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(cfg.dirs.queue.join(&raw))
        .unwrap()
        .set_modified(backdate)
        .unwrap();
    assert!(matches!(take(&cfg, &raw), Taken::Refused(_)));
    let long = format!("{}_t0.tar.xz", "n".repeat(230));
    queue(&cfg, &long, b"y");
    assert!(matches!(take(&cfg, OsStr::new(&long)), Taken::Refused(_)));
    let mut reasons = Vec::new();
    for e in std::fs::read_dir(&cfg.dirs.failed).unwrap() {
        let id = e.unwrap().file_name().into_string().unwrap();
        let rec = record(&cfg, "failed", &id);
        assert_eq!(rec.status, "bad-name");
        assert!(cfg.dirs.failed.join(&id).join(UNNAMED_JOB).is_file());
        reasons.push((rec.job, rec.reason));
    }
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons
            .iter()
            .any(|(job, r)| job.starts_with("caf") && r.contains("UTF-8"))
    );
    assert!(reasons.iter().any(|(_, r)| r.contains("bytes long")));
    assert_eq!(std::fs::read_dir(&cfg.dirs.queue).unwrap().count(), 0);
}

#[test]
fn a_file_still_being_written_is_taken_only_once_closed_and_only_once() {
    // Suspected defect 11 (the start-up scan took files still being written; the scan and an
    // inotify event could both handle one file).
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let path = cfg.dirs.queue.join("slow_t0.tar.xz");
    let mut writer = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    writer.write_all(b"half").unwrap();
    assert_eq!(take(&cfg, OsStr::new("slow_t0.tar.xz")), Taken::Later);
    assert!(path.exists(), "left in the queue");
    writer.write_all(b" and the rest").unwrap();
    drop(writer);
    let id = taken(&cfg, "slow_t0.tar.xz");
    assert_eq!(
        std::fs::read(cfg.dirs.run_dir(&id).join("slow_t0.tar.xz")).unwrap(),
        b"half and the rest"
    );
    // The second sighting of the same file (scan and event) finds nothing, and changes nothing.
    assert_eq!(take(&cfg, OsStr::new("slow_t0.tar.xz")), Taken::Gone);
    assert_eq!(std::fs::read_dir(&cfg.dirs.running).unwrap().count(), 1);
    assert_eq!(cfg.dirs.read_state(&id).unwrap().attempts, 0);
}

#[test]
fn a_sparse_job_bigger_than_the_limit_fails_as_too_big() {
    // Suspected defect 12: a sparse multi-terabyte job became the guest's disk.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let tmp = cfg.dirs.root.join(".huge");
    std::fs::File::create(&tmp)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    std::fs::rename(&tmp, cfg.dirs.queue.join("huge_t0.tar.xz")).unwrap();
    assert!(matches!(
        take(&cfg, OsStr::new("huge_t0.tar.xz")),
        Taken::Refused(_)
    ));
    let id = only_run(&cfg, "failed");
    let rec = record(&cfg, "failed", &id);
    assert_eq!(rec.status, "too-big");
    assert!(rec.reason.contains("1099511627776"), "{}", rec.reason);
}

#[test]
fn recovery_fails_a_job_that_keeps_killing_the_runner_and_finishes_recorded_runs() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    queue(&cfg, "a_t0.tar.xz", b"job a");
    let a = taken(&cfg, "a_t0.tar.xz");
    let mut st = cfg.dirs.read_state(&a).unwrap();
    st.attempts = 3;
    cfg.dirs.write_state(&a, &st).unwrap();
    // A run whose record was written just before the runner died, before the move.
    queue(&cfg, "b_t0.tar.xz", b"job b");
    let b = taken(&cfg, "b_t0.tar.xz");
    let rec = Record {
        status: "success".into(),
        ..Record::default()
    };
    crate::dirs::write_atomic(
        &cfg.dirs.run_dir(&b).join(RECORD),
        &serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    assert!(recover(&cfg).is_empty());
    let rec = record(&cfg, "failed", &a);
    assert_eq!(rec.status, "crashed-runner");
    assert_eq!(rec.attempts, 3);
    assert_eq!(
        std::fs::read(cfg.dirs.failed.join(&a).join("a_t0.tar.xz")).unwrap(),
        b"job a"
    );
    assert_eq!(record(&cfg, "done", &b).status, "success");
    assert_eq!(std::fs::read_dir(&cfg.dirs.running).unwrap().count(), 0);
}

#[test]
fn bad_names_and_unknown_images_fail_without_a_vm() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let children = Mutex::new(HashMap::new());
    queue(&cfg, "no-index.tar.xz", b"data");
    assert!(matches!(
        take(&cfg, OsStr::new("no-index.tar.xz")),
        Taken::Refused(_)
    ));
    let id = only_run(&cfg, "failed");
    assert_eq!(record(&cfg, "failed", &id).status, "bad-name");
    queue(&cfg, "x_i9.tar.xz", b"data");
    let id = taken(&cfg, "x_i9.tar.xz");
    crate::run::run(&cfg, &id, &children);
    let rec = record(&cfg, "failed", &id);
    assert_eq!(rec.status, "unknown-image");
    assert!(!rec.reason.is_empty());
    assert_eq!(
        std::fs::read(cfg.dirs.failed.join(&id).join("x_i9.tar.xz")).unwrap(),
        b"data",
        "the job file is kept"
    );
}

#[test]
fn a_start_after_an_interrupted_one_runs_on_the_job_as_submitted() {
    // A VM writes its output over its disk: the runner dying mid-write must not leave the next
    // start a half-overwritten job.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let children = Mutex::new(HashMap::new());
    queue(&cfg, "w_t0.tar.xz", b"pristine");
    let id = taken(&cfg, "w_t0.tar.xz");
    let dir = cfg.dirs.run_dir(&id);
    // What an interrupted first start leaves: the submitted file aside, a damaged copy.
    std::fs::rename(dir.join("w_t0.tar.xz"), dir.join(crate::dirs::SUBMITTED)).unwrap();
    std::fs::write(dir.join("w_t0.tar.xz"), b"OUT-half").unwrap();
    let mut st = cfg.dirs.read_state(&id).unwrap();
    st.attempts = 1;
    cfg.dirs.write_state(&id, &st).unwrap();
    assert_eq!(recover(&cfg), vec![id.clone()]);
    crate::run::run(&cfg, &id, &children);
    let done = cfg.dirs.done.join(&id);
    assert_eq!(
        std::fs::read_to_string(done.join("w_t0.tar.xz")).unwrap(),
        "OUT-pristine"
    );
    assert_eq!(record(&cfg, "done", &id).attempts, 2);
    let mut files: Vec<String> = std::fs::read_dir(&done)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "backend.log",
            "console.log",
            "record.json",
            "run.json",
            "w_t0.tar.xz"
        ]
    );
}

#[test]
fn a_job_that_keeps_killing_the_runner_is_failed_as_it_was_submitted() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    queue(&cfg, "k_t0.tar.xz", b"as submitted");
    let id = taken(&cfg, "k_t0.tar.xz");
    let dir = cfg.dirs.run_dir(&id);
    std::fs::rename(dir.join("k_t0.tar.xz"), dir.join(crate::dirs::SUBMITTED)).unwrap();
    std::fs::write(dir.join("k_t0.tar.xz"), b"damaged").unwrap();
    let mut st = cfg.dirs.read_state(&id).unwrap();
    st.attempts = 3;
    cfg.dirs.write_state(&id, &st).unwrap();
    assert!(recover(&cfg).is_empty());
    assert_eq!(record(&cfg, "failed", &id).status, "crashed-runner");
    assert_eq!(
        std::fs::read(cfg.dirs.failed.join(&id).join("k_t0.tar.xz")).unwrap(),
        b"as submitted"
    );
    assert!(
        !cfg.dirs
            .failed
            .join(&id)
            .join(crate::dirs::SUBMITTED)
            .exists()
    );
}

#[test]
fn one_runner_per_directory() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let held = cfg.dirs.lock().unwrap();
    let e = cfg.dirs.lock().unwrap_err();
    assert!(e.to_string().contains("another construir-runner"), "{e}");
    drop(held);
    cfg.dirs.lock().unwrap();
}

#[test]
fn recovery_refuses_an_entry_the_runner_died_before_recording() {
    // Killed between moving a symlink into its run and recording the refusal: it must not be
    // started as a job.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let id = cfg.dirs.new_run().unwrap();
    let st = RunState {
        job: "l_t0.tar.xz".into(),
        file: "l_t0.tar.xz".into(),
        ..RunState::default()
    };
    cfg.dirs.write_state(&id, &st).unwrap();
    std::os::unix::fs::symlink(&cfg.images_dir, cfg.dirs.run_dir(&id).join("l_t0.tar.xz")).unwrap();
    std::fs::write(cfg.dirs.run_dir(&id).join(".tmp-1-1"), b"half a record").unwrap();
    assert!(recover(&cfg).is_empty());
    assert_eq!(record(&cfg, "failed", &id).status, "not-a-job");
    assert!(!cfg.dirs.failed.join(&id).join(".tmp-1-1").exists());
}
