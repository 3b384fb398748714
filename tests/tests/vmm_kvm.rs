//! construir-vmm end to end on this host's KVM. On an emulated-KVM host (this workplace) every
//! boot takes a minute or more, so the jobs run in two lanes side by side (one per core), inside
//! one test with a generous deadline. Without /dev/kvm the test says loudly that it did not run
//! (and fails under CONSTRUIR_REQUIRE_KVM=1).

use construir_contract::manifest::{Image, cache_dir};
use construir_tests::*;
use construir_tools::pack::JobFile;
use std::time::Duration;

/// One boot under emulated KVM took ~85 s here; allow for a loaded machine and Debian's binaries.
const DEADLINE: Duration = Duration::from_secs(25 * 60);

fn vmm(job: &TestJob, index: &str, extra: &[&str]) -> Run {
    let images = images_dir(index);
    let mut args = vec![
        "--images-dir",
        images.to_str().unwrap(),
        "--job",
        job.path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = run_launcher(&binary("construir-vmm"), &args, DEADLINE);
    eprintln!(
        "construir-vmm {}: exit {} in {:.1} s, boot markers {}",
        job.path.file_name().unwrap().to_string_lossy(),
        run.code,
        run.elapsed.as_secs_f64(),
        run.summary["boot_ms"]
    );
    run
}

#[test]
fn jobs_through_construir_vmm_on_this_hosts_kvm() {
    let Some(host) = kvm_or_explain("jobs_through_construir_vmm_on_this_hosts_kvm") else {
        return;
    };
    let t0 = Image::load(&images_dir("t0"), "t0").unwrap();
    let qcow2_before = sha256_hex(&std::fs::read(t0.disk_path()).unwrap());
    assert_eq!(qcow2_before, t0.manifest.disk_sha256);

    std::thread::scope(|s| {
        let lane_a = s.spawn(|| {
            // The seed format: out.txt written over /dev/sdb.
            let seed = seed_job("t0");
            // Informational kernel messages (the emulated-host switch's line) only with a loglevel.
            let run = vmm(&seed, "t0", &["--kernel-arg", "loglevel=7"]);
            run.expect_code(0);
            assert_eq!(run.summary["backend"], "vmm");
            assert_eq!(run.summary["host_kind"], host.as_str());
            for marker in ["first_kvm_run", "first_console_byte", "init", "exit"] {
                assert!(
                    run.summary["boot_ms"][marker].as_u64().is_some(),
                    "no {marker} marker: {}",
                    run.summary
                );
            }
            assert!(
                run.summary["disks"]["job"]["written_bytes"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
            check_seed_output(&seed);
            // The sandbox, seen from outside while the guest ran: every thread (event loop and
            // vCPU) under its seccomp filter, no new privileges, no core dumps, and never a socket.
            let probe = &run.probe;
            assert!(probe.samples > 10, "{probe:?}");
            assert!(
                probe.threads >= 2 && probe.filtered_threads == probe.threads,
                "{probe:?}"
            );
            assert!(probe.no_new_privs && probe.no_core_dumps, "{probe:?}");
            assert!(
                probe.sockets.is_empty(),
                "the VMM had sockets open: {probe:?}"
            );
            let emulated = run
                .console
                .contains("construir: emulated-KVM host support on");
            assert_eq!(
                emulated,
                host == construir_contract::host::HostKind::EmulatedKvm
            );

            let three = TestJob::new(
                "three",
                "t0",
                &[JobFile::script("#!/bin/sh\nexit 3\n")],
                1 << 20,
            );
            let run = vmm(&three, "t0", &[]);
            run.expect_code(3);
            assert_eq!(run.summary["status"], "failed");

            let garbage = TestJob::raw("garbage", "t0", &random_bytes(64 * 1024, 5));
            let run = vmm(&garbage, "t0", &[]);
            run.expect_code(101);
            assert_eq!(run.summary["status"], "invalid-job");
        });
        let lane_b = s.spawn(|| {
            let (data, bytes) = data_job("t0", 2 << 20);
            vmm(&data, "t0", &[]).expect_code(0);
            check_data_output(&data, &bytes);

            let sleeper = TestJob::new("sleeper", "t0", &[JobFile::script("#!/bin/sh\nwhile :; do sleep 1; done\n")], 1 << 20);
            let run = vmm(&sleeper, "t0", &["--timeout", "5s"]);
            run.expect_code(102);
            assert_eq!(run.summary["status"], "timed-out");

            // One trivial job in i0: Debian's dynamic binaries, an SMP boot where the host can.
            let i0 = TestJob::new(
                "trivial",
                "i0",
                &[JobFile::script("#!/bin/sh\nset -e\ncd /tmp\nnproc > cpus\ncat /etc/debian_version > version\ntar -cf /dev/vdb cpus version\n")],
                1 << 20,
            );
            let run = vmm(&i0, "i0", &[]);
            run.expect_code(0);
            assert!(String::from_utf8(i0.output("version")).unwrap().starts_with("12."));
            // i0 asks for 2 vCPUs; an emulated KVM cannot bring secondary vCPUs up, so the VMM gives 1.
            let want = if host == construir_contract::host::HostKind::EmulatedKvm { "1" } else { "2" };
            assert_eq!(String::from_utf8(i0.output("cpus")).unwrap().trim(), want);
        });
        lane_a.join().expect("lane A");
        lane_b.join().expect("lane B");
    });

    // The shared bases are untouched: the image's qcow2 and its cached raw conversion.
    assert_eq!(
        sha256_hex(&std::fs::read(t0.disk_path()).unwrap()),
        qcow2_before
    );
    let raw = cache_dir()
        .join("raw")
        .join(format!("{}.raw", t0.manifest.disk_sha256));
    let raw_sha = sha256_hex(&std::fs::read(&raw).unwrap());
    let fresh = tempfile::tempdir().unwrap();
    let reconverted = fresh.path().join("t0.raw");
    assert!(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(t0.disk_path())
            .arg(&reconverted)
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        raw_sha,
        sha256_hex(&std::fs::read(&reconverted).unwrap()),
        "the cached raw base was modified"
    );
}
