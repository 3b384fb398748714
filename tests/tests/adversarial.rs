//! Hostile jobs through construir-runner, with the backend it picks for this host (construir-vmm
//! on hardware KVM, QEMU with TCG elsewhere — TCG on this workplace's emulated-KVM machines).
//! Each job ends in done/ or failed/ with the status its behaviour deserves, the runner keeps
//! taking jobs, the image's base disk is unchanged, and nothing outside the runner's directory
//! changes on the host.

use construir_contract::archive;
use construir_contract::manifest::Image;
use construir_tests::*;
use construir_tools::pack::{JobFile, job_archive};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const JOB_BYTES: usize = 4 << 20;

fn job(script: &str) -> Vec<u8> {
    let mut bytes = job_archive(&[JobFile::script(script)]).unwrap();
    bytes.resize(JOB_BYTES, 0);
    bytes
}

fn drop_job(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.incoming"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join("queue").join(name)).unwrap();
}

/// Name, size and modification time of every file under `dir`.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

fn record(dir: &Path, name: &str) -> (String, serde_json::Value) {
    for sub in ["done", "failed"] {
        if let Some((_, rec)) = run_of(dir, sub, name) {
            return (sub.to_string(), rec);
        }
    }
    panic!("no record for {name}");
}

/// The job file of `name`'s run in `sub`, as the job left it.
fn job_file(dir: &Path, sub: &str, name: &str) -> PathBuf {
    let (run, _) = run_of(dir, sub, name).unwrap_or_else(|| panic!("no run of {name} in {sub}/"));
    run.join(name)
}

fn output_file(dir: &Path, sub: &str, name: &str, file: &str) -> Option<String> {
    let disk = std::fs::read(job_file(dir, sub, name)).unwrap();
    archive::read_file(&disk[..], file, 1 << 20)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[test]
fn hostile_jobs_end_with_the_right_status_and_change_nothing_on_the_host() {
    let images = images_dir("t0");
    let t0 = Image::load(&images, "t0").unwrap();
    let base_before = sha256_hex(&std::fs::read(t0.disk_path()).unwrap());
    let images_before = tree(&images);
    let farm = tempfile::tempdir().unwrap();
    let dir = farm.path();

    // A marker only the host has: a job that can read the host's files would find it.
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = format!("construir-host-secret-{}", std::process::id());
    std::fs::write(secret_dir.path().join("secret.txt"), &secret).unwrap();
    let (half_a, half_b) = secret.split_at(secret.len() / 2);

    let jobs: Vec<(&str, String)> = vec![
        // Processes until the kernel runs out of PIDs or memory; the time limit ends it.
        ("forkbomb_t0.tar.xz", "#!/bin/sh\nb() { b | b & }\nb\nsleep 1000\n".into()),
        // Fills the root file system (a throw-away overlay) and then the whole job disk.
        ("fill_t0.tar.xz", "#!/bin/sh\ndd if=/dev/zero of=/big bs=1M 2>/dev/null\ndd if=/dev/zero of=/dev/vdb bs=1M 2>/dev/null\nexit 0\n".into()),
        // Writes past the job disk's end: the guest kernel refuses, the file does not grow.
        ("pastend_t0.tar.xz", format!("#!/bin/sh\ndd if=/dev/zero of=/dev/vdb bs=512 seek={} count=8 || exit 9\nexit 0\n", JOB_BYTES / 512)),
        // Floods the console until its time limit.
        ("flood_t0.tar.xz", "#!/bin/sh\nwhile :; do echo AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA; done\n".into()),
        // Never exits.
        ("forever_t0.tar.xz", "#!/bin/sh\nexec sleep 100000\n".into()),
        // Exits at once, writing nothing: its job file comes back as it went in.
        ("silent_t0.tar.xz", "#!/bin/sh\nexit 0\n".into()),
        // Overwrites its job disk with garbage.
        ("garbage_t0.tar.xz", "#!/bin/sh\nhead -c 1048576 /dev/urandom > /dev/vdb\nexit 0\n".into()),
        // Tries every way out to a network.
        // (The kernel has AF_UNIX and no other family: the only interface is an unusable `lo`.)
        ("network_t0.tar.xz", "#!/bin/sh\ncd /tmp\nfor c in 'ip link' 'ping -c 1 -W 1 10.0.2.2' 'nc -w 1 10.0.2.2 80' 'wget -T 1 http://10.0.2.2/' 'ifconfig lo 127.0.0.1 up'; do\n  if busybox $c >/dev/null 2>err; then echo \"REACHED: $c\"; else echo \"refused: $c: $(head -c 200 err)\"; fi\ndone > out.txt\necho \"interfaces: $(ls /sys/class/net | tr '\\n' ' ')\" >> out.txt\necho \"lo flags: $(cat /sys/class/net/lo/flags)\" >> out.txt\ntar -cf /dev/vdb out.txt\n".into()),
        // Looks for the host's files.
        ("snoop_t0.tar.xz", format!("#!/bin/sh\ncd /tmp\nm={half_a}\nm=\"${{m}}{half_b}\"\nfind / -xdev -type f 2>/dev/null | xargs grep -l \"$m\" > found.txt 2>/dev/null\nls /mnt /media /home /host 2>&1 >> seen.txt\ncat /proc/mounts >> seen.txt\ntar -cf /dev/vdb found.txt seen.txt\n")),
        // Tries to leave a change in the image for the next job.
        ("taint_t0.tar.xz", "#!/bin/sh\necho evil > /etc/evil\necho evil >> /bin/busybox\nsync\nexit 0\n".into()),
    ];
    let runner = Command::new(binary("construir-runner"))
        .arg("--dir")
        .arg(dir)
        .args([
            "--backend",
            "auto",
            "--jobs",
            "2",
            "--timeout",
            "20s",
            "--images-dir",
        ])
        .arg(&images)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut runner = scopeguard(runner);
    let start = Instant::now();
    while !dir.join("failed").is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the runner did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut dropped = BTreeMap::new();
    for (name, script) in &jobs {
        let bytes = job(script);
        drop_job(dir, name, &bytes);
        dropped.insert(*name, bytes);
    }
    let all_recorded = |names: &[&str]| {
        names
            .iter()
            .all(|n| run_of(dir, "done", n).is_some() || run_of(dir, "failed", n).is_some())
    };
    let names: Vec<&str> = jobs.iter().map(|(n, _)| *n).collect();
    let deadline = Duration::from_secs(30 * 60);
    while !all_recorded(&names) {
        assert!(
            start.elapsed() < deadline,
            "hostile jobs not all recorded after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // After the hostile ones, the runner still runs jobs, and the image is pristine for them.
    drop_job(
        dir,
        "after_t0.tar.xz",
        &job(
            "#!/bin/sh\ncd /tmp\n{ test -e /etc/evil && echo tainted || echo clean; sha256sum /bin/busybox; } > out.txt\ntar -cf /dev/vdb out.txt\n",
        ),
    );
    while !all_recorded(&["after_t0.tar.xz"]) {
        assert!(
            start.elapsed() < deadline + Duration::from_secs(300),
            "the runner stopped taking jobs"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The record of `name`, which must be in `want_dir` with `want_status`.
    let expect = |name: &str, want_dir: &str, want_status: &str| {
        let (sub, rec) = record(dir, name);
        eprintln!("{name}: {sub}/ {} ({})", rec["status"], rec["reason"]);
        assert_eq!(
            (sub.as_str(), rec["status"].as_str()),
            (want_dir, Some(want_status)),
            "{name}: {rec}"
        );
        rec
    };

    expect("forkbomb_t0.tar.xz", "failed", "timed-out");

    expect("fill_t0.tar.xz", "done", "success");
    let filled = std::fs::read(job_file(dir, "done", "fill_t0.tar.xz")).unwrap();
    assert_eq!(filled.len(), JOB_BYTES, "the job file changed size");
    assert!(
        filled.iter().all(|&b| b == 0),
        "the job disk was not filled"
    );

    let rec = expect("pastend_t0.tar.xz", "failed", "failed");
    assert_eq!(rec["job_exit_status"].as_u64(), Some(9), "{rec}");
    assert_eq!(
        std::fs::metadata(job_file(dir, "failed", "pastend_t0.tar.xz"))
            .unwrap()
            .len(),
        JOB_BYTES as u64
    );

    let rec = expect("flood_t0.tar.xz", "failed", "timed-out");
    let log = dir.join(rec["console_log"].as_str().unwrap());
    let log_len = std::fs::metadata(&log).unwrap().len();
    assert!(
        log_len > 100_000,
        "the flood did not reach the console log ({log_len} bytes)"
    );
    assert!(
        log_len <= construir_launcher::console::DEFAULT_CONSOLE_CAP + (1 << 20),
        "console log of {log_len} bytes"
    );

    expect("forever_t0.tar.xz", "failed", "timed-out");

    expect("silent_t0.tar.xz", "done", "success");
    assert!(
        std::fs::read(job_file(dir, "done", "silent_t0.tar.xz")).unwrap()
            == dropped["silent_t0.tar.xz"]
    );

    expect("garbage_t0.tar.xz", "done", "success");
    // Reading such output is a clear error, not a crash.
    let read = Command::new(binary("construir-result"))
        .arg(job_file(dir, "done", "garbage_t0.tar.xz"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&read.stdout);
    assert!(
        shown.contains("output: none readable (not a job archive"),
        "{read:?}"
    );
    assert!(
        !String::from_utf8_lossy(&read.stderr).contains("panicked"),
        "{read:?}"
    );

    expect("network_t0.tar.xz", "done", "success");
    let out = output_file(dir, "done", "network_t0.tar.xz", "out.txt").expect("out.txt");
    assert!(!out.contains("REACHED"), "{out}");
    assert_eq!(out.matches("refused:").count(), 5, "{out}");
    // ip (netlink), ping, nc, wget and ifconfig (inet) each get as far as socket(), for a
    // family the guest kernel does not offer.
    assert!(
        out.matches("Address family not supported").count() >= 4,
        "{out}"
    );
    assert!(out.contains("interfaces: lo \n"), "{out}");
    // IFF_LOOPBACK (0x8) without IFF_UP (0x1): down, and nothing could bring it up.
    assert!(out.contains("lo flags: 0x8\n"), "{out}");

    expect("snoop_t0.tar.xz", "done", "success");
    let found = output_file(dir, "done", "snoop_t0.tar.xz", "found.txt").unwrap_or_default();
    assert!(
        found.trim().is_empty(),
        "the guest found the host's file: {found}"
    );
    let seen = output_file(dir, "done", "snoop_t0.tar.xz", "seen.txt").unwrap_or_default();
    assert!(!seen.contains("9p") && !seen.contains("virtiofs"), "{seen}");

    expect("taint_t0.tar.xz", "done", "success");
    expect("after_t0.tar.xz", "done", "success");
    let after = output_file(dir, "done", "after_t0.tar.xz", "out.txt").expect("out.txt");
    assert!(
        after.starts_with("clean"),
        "the next job saw the last one's changes: {after}"
    );

    // The host: the base image and everything in the images directory are as they were; the
    // runner's directory holds only its own directories.
    assert_eq!(
        sha256_hex(&std::fs::read(t0.disk_path()).unwrap()),
        base_before
    );
    assert_eq!(tree(&images), images_before, "the images directory changed");
    let mut top: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, [".lock", "done", "failed", "queue", "running"]);
    assert_eq!(
        std::fs::read_to_string(secret_dir.path().join("secret.txt")).unwrap(),
        secret
    );
    runner.stop();
}

/// Stops the runner even when an assertion fails.
struct RunnerGuard(Option<std::process::Child>);

fn scopeguard(child: std::process::Child) -> RunnerGuard {
    RunnerGuard(Some(child))
}

impl RunnerGuard {
    fn stop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            panic!("the runner did not stop within 60 s of SIGTERM");
        }
    }
}

impl Drop for RunnerGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
