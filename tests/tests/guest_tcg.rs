//! The guest side end to end under QEMU with TCG (a few seconds a job): kernel, init, image t0,
//! status port, job disk in and out. These are the checks of the guest issue, on the backend that
//! works everywhere.

use construir_tests::*;
use construir_tools::pack::JobFile;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(180);

fn qemu_tcg(job: &TestJob, extra: &[&str]) -> Run {
    qemu_tcg_on("t0", job, extra, DEADLINE)
}

#[test]
fn seed_job_writes_its_output_over_dev_sdb() {
    let job = seed_job("t0");
    let run = qemu_tcg(&job, &[]);
    run.expect_code(0);
    assert_eq!(run.summary["status"], "success");
    assert_eq!(run.summary["accel"], "tcg");
    check_seed_output(&job);
    assert!(
        run.console.contains("construir-init: job started"),
        "{}",
        run.console
    );
}

#[test]
fn megabytes_of_random_data_come_back_byte_for_byte() {
    let (job, data) = data_job("t0", 4 << 20);
    qemu_tcg(&job, &[]).expect_code(0);
    check_data_output(&job, &data);
}

#[test]
fn a_job_that_exits_3_reports_3() {
    let job = TestJob::new(
        "three",
        "t0",
        &[JobFile::script(
            "#!/bin/sh\necho failing on purpose\nexit 3\n",
        )],
        1 << 20,
    );
    let run = qemu_tcg(&job, &[]);
    run.expect_code(3);
    assert_eq!(run.summary["status"], "failed");
    assert_eq!(run.summary["job_exit_status"], 3);
    assert!(run.console.contains("failing on purpose"));
}

#[test]
fn a_garbage_job_file_is_an_invalid_job() {
    let job = TestJob::raw("garbage", "t0", &random_bytes(100_000, 3));
    let before = std::fs::read(&job.path).unwrap();
    let run = qemu_tcg(&job, &[]);
    run.expect_code(101);
    assert_eq!(run.summary["status"], "invalid-job");
    // Nothing of the user's file is lost (padding to whole sectors only adds zeros).
    let after = std::fs::read(&job.path).unwrap();
    assert_eq!(&after[..before.len()], &before[..]);
}

#[test]
fn an_archive_without_the_script_is_an_invalid_job() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(5);
    header.set_mode(0o755);
    header.set_cksum();
    builder
        .append_data(&mut header, "opt/job/not-the-script", &b"hello"[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let job = TestJob::raw("noscript", "t0", &tar);
    let run = qemu_tcg(&job, &[]);
    run.expect_code(101);
    assert!(
        run.summary["reason"]
            .as_str()
            .unwrap()
            .contains("opt/job/construir"),
        "{}",
        run.summary
    );
}

#[test]
fn a_job_that_sleeps_past_its_limit_is_stopped() {
    let job = TestJob::new(
        "sleeper",
        "t0",
        &[JobFile::script("#!/bin/sh\necho sleeping\nsleep 600\n")],
        1 << 20,
    );
    let run = qemu_tcg(&job, &["--timeout", "3s"]);
    run.expect_code(102);
    assert_eq!(run.summary["status"], "timed-out");
    assert!(
        run.console.contains("time limit of 3 s reached"),
        "{}",
        run.console
    );
    assert!(
        run.elapsed < Duration::from_secs(60),
        "took {:?}",
        run.elapsed
    );
}

#[test]
fn the_guest_clock_is_the_hosts_and_the_environment_is_complete() {
    let script = "#!/bin/sh\nset -e\ncd /tmp\ndate +%s > now.txt\nenv | sort > env.txt\npwd > pwd.txt\n\
                  cd /opt/job && pwd >> /tmp/pwd.txt && cd /tmp\nid -u > uid.txt\ntar -cJf /dev/vdb now.txt env.txt pwd.txt uid.txt\n";
    let job = TestJob::new("env", "t0", &[JobFile::script(script)], 1 << 20);
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    qemu_tcg(&job, &[]).expect_code(0);
    let guest_now: u64 = String::from_utf8(job.output("now.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        guest_now >= host_now && guest_now < host_now + 120,
        "guest {guest_now} host {host_now}"
    );
    let env = String::from_utf8(job.output("env.txt")).unwrap();
    for var in [
        "PATH=/usr/local/sbin:",
        "HOME=/root",
        "LANG=C.UTF-8",
        "TMPDIR=/tmp",
    ] {
        assert!(
            env.lines().any(|l| l.starts_with(var)),
            "{var} missing in\n{env}"
        );
    }
    assert_eq!(
        String::from_utf8(job.output("uid.txt")).unwrap().trim(),
        "0"
    );
    assert_eq!(
        String::from_utf8(job.output("pwd.txt")).unwrap(),
        "/tmp\n/opt/job\n"
    );
}

#[test]
fn the_base_image_is_not_changed_by_a_job_that_writes_to_its_root() {
    let images = images_dir("t0");
    let disk = images.join("t0.qcow2");
    let before = sha256_hex(&std::fs::read(&disk).unwrap());
    let job = TestJob::new(
        "vandal",
        "t0",
        &[JobFile::script(
            "#!/bin/sh\nrm -rf /bin/sh /etc/passwd\necho mark > /mark\nsync\n",
        )],
        1 << 20,
    );
    qemu_tcg(&job, &[]).expect_code(0);
    assert_eq!(
        sha256_hex(&std::fs::read(&disk).unwrap()),
        before,
        "the base image changed"
    );
    // The next job sees the pristine base.
    let check = TestJob::new(
        "check",
        "t0",
        &[JobFile::script(
            "#!/bin/sh\ntest ! -e /mark && test -e /bin/sh && test -e /etc/passwd\n",
        )],
        1 << 20,
    );
    qemu_tcg(&check, &[]).expect_code(0);
}

/// An upstream tree without a `construir` of its own, packed by `construir-pack --git --script`:
/// the tree is /opt/job/src in the VM, and the script, which lives outside the tree, runs there.
#[test]
fn a_tree_packed_with_a_script_from_outside_runs_it_in_opt_job_src() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("upstream");
    std::fs::create_dir_all(repo.join("data")).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(repo.join("data/payload.bin"), &payload).unwrap();
    std::fs::write(repo.join("README"), "upstream\n").unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "upstream"]);
    // The script names no path: it runs in the tree. No #! line: /bin/sh runs it.
    let script = work.path().join("build.sh");
    std::fs::write(
        &script,
        "set -e\nmkdir -p /tmp/out\npwd > /tmp/out/pwd.txt\nsha256sum data/payload.bin > /tmp/out/sum.txt\n\
         test ! -e construir\ncd /tmp && tar -cJf /dev/sdb out\n",
    )
    .unwrap();
    let pack = std::process::Command::new(binary("construir-pack"))
        .arg("--git")
        .arg(&repo)
        .arg("--script")
        .arg(&script)
        .args(["--image", "t0", "--output-size", "2M", "-o"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        pack.status.success(),
        "{}",
        String::from_utf8_lossy(&pack.stderr)
    );
    let path = work.path().join("upstream_t0.tar.xz");
    assert_eq!(
        String::from_utf8_lossy(&pack.stdout).trim(),
        path.display().to_string()
    );
    let job = TestJob { dir: work, path };
    qemu_tcg(&job, &[]).expect_code(0);
    assert_eq!(job.output("out/pwd.txt"), b"/opt/job/src\n");
    let sum = String::from_utf8(job.output("out/sum.txt")).unwrap();
    assert_eq!(
        sum,
        format!("{}  data/payload.bin\n", sha256_hex(&payload)),
        "the tree's bytes in the VM"
    );
}
