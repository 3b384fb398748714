//! The same jobs under QEMU with this host's KVM. On an emulated-KVM host (this workplace) the
//! launcher adds the emulated-host kernel parameters and a boot takes a minute or two, so the jobs
//! run side by side in one test with a generous deadline. Without /dev/kvm the test says loudly
//! that it did not run (and fails under CONSTRUIR_REQUIRE_KVM=1).

use construir_tests::*;
use std::time::Duration;

/// A boot under emulated KVM took ~90 s here; allow for a loaded machine.
const DEADLINE: Duration = Duration::from_secs(25 * 60);

fn qemu_kvm(job: &TestJob, extra: &[&str]) -> Run {
    let mut args = vec!["--timeout", "15m"];
    args.extend_from_slice(extra);
    qemu_on("kvm", "t0", job, &args, DEADLINE)
}

#[test]
fn seed_and_data_jobs_under_qemu_with_this_hosts_kvm() {
    let Some(host) = kvm_or_explain("seed_and_data_jobs_under_qemu_with_this_hosts_kvm") else {
        return;
    };
    let seed = seed_job("t0");
    let (data, bytes) = data_job("t0", 2 << 20);
    let (seed_run, data_run) = std::thread::scope(|s| {
        // Informational kernel messages (the emulated-host switch's line) only with a loglevel.
        let a = s.spawn(|| qemu_kvm(&seed, &["--kernel-arg", "loglevel=7"]));
        let b = s.spawn(|| qemu_kvm(&data, &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    for run in [&seed_run, &data_run] {
        run.expect_code(0);
        assert_eq!(run.summary["accel"], "kvm");
        assert_eq!(run.summary["host_kind"], host.as_str());
        eprintln!("kvm ({host}) run took {:.1} s", run.elapsed.as_secs_f64());
    }
    let emulated = seed_run
        .console
        .contains("construir: emulated-KVM host support on");
    assert_eq!(
        emulated,
        host == construir_contract::host::HostKind::EmulatedKvm,
        "emulated-host switch vs host kind"
    );
    check_seed_output(&seed);
    check_data_output(&data, &bytes);
}
