//! construir-vmm: boot construir's build kernel with an image's root disk and a job disk on KVM,
//! run the job, exit with its status.

use anyhow::Context;
use clap::Parser;
use construir_contract::cmdline::KernelCmdline;
use construir_contract::host::HostKind;
use construir_contract::manifest::cache_dir;
use construir_contract::outcome::{EXIT_HOST_UNSUPPORTED, EXIT_INVALID_JOB, EXIT_SETUP_ERROR};
use construir_launcher::{self as launcher, JobArgs};
use construir_vmm::disk::DiskBackend;
use construir_vmm::disk::overlay::OverlayDisk;
use construir_vmm::disk::qcow2::{cached_raw_base, sha256_reader};
use construir_vmm::job::{JobDiskError, invalid_job_summary, open_job_disk};
use construir_vmm::sandbox::AllowedFile;
use construir_vmm::vm::{self, VmConfig, VmError};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "construir-vmm",
    about = "Boot construir's build kernel on KVM with an image's root disk and a job disk, and run the job",
    after_help = "Example:\n  construir-vmm --job hello_i0.tar.xz --console - --timeout 30m\n\n\
Exit status: the job's own status for 0-99; 100 job failed with >= 100 or by a signal; \
101 invalid job; 102 timed out; 103 guest failed (panic, crash, emulation failure); \
104 host cannot run guests; 105 setup error; 106 interrupted."
)]
struct Cli {
    #[command(flatten)]
    job: JobArgs,
    /// Run without seccomp, landlock and resource limits: only to debug the VMM itself, never
    /// for strangers' jobs.
    #[arg(long, hide = true)]
    no_sandbox: bool,
}

fn main() {
    let process_start = Instant::now();
    launcher::init_logging();
    let cli: Cli = launcher::parse_args();
    launcher::stop_on_termination_signals(&vm::INTERRUPTED);
    let code = match run(cli, process_start) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("construir-vmm: error: {e:#}");
            match e.downcast_ref::<VmError>() {
                Some(VmError::Kvm(_) | VmError::KvmCapability(_)) => EXIT_HOST_UNSUPPORTED,
                _ => EXIT_SETUP_ERROR,
            }
        }
    };
    // vCPU threads may still be inside KVM_RUN: leave without waiting for them.
    std::process::exit(i32::from(code));
}

fn run(cli: Cli, process_start: Instant) -> anyhow::Result<u8> {
    let no_sandbox = cli.no_sandbox;
    let cli = cli.job;
    let image = cli.image()?;
    let index = image.manifest.index.clone();
    let host = cli.host()?;
    match host {
        HostKind::NoKvm => {
            eprintln!(
                "construir-vmm: this host has no usable /dev/kvm: construir-vmm cannot run guests here (use construir-qemu, which falls back to TCG)"
            );
            return Ok(EXIT_HOST_UNSUPPORTED);
        }
        HostKind::EmulatedKvm => tracing::warn!(
            "this host has no hardware virtualization (its KVM emulates the guest kernel): the boot takes minutes, \
             and user space runs far slower than under QEMU's TCG (a Debian init's first commands ~40 s, an 8 MiB \
             job unpacked in ~50-200 s); adding the emulated-host kernel parameters"
        ),
        HostKind::HardwareKvm => {}
    }
    // The job file first: a refused one is answered before any conversion or VM setup.
    let job = match open_job_disk(&cli) {
        Ok(job) => job,
        Err(JobDiskError::Invalid(reason)) => {
            eprintln!("construir-vmm: {}: {reason}", cli.job.display());
            if cli.json {
                println!("{}", invalid_job_summary(&reason, host.as_str(), &index));
            }
            let _ = std::io::stdout().flush();
            return Ok(EXIT_INVALID_JOB);
        }
        Err(e) => return Err(e.into()),
    };
    let job_size_before = job.size();

    let kernel = cli.kernel.clone().unwrap_or_else(|| image.kernel_path());
    let base_path = match &cli.root {
        Some(root) => root.clone(),
        None => cached_raw_base(
            &image.disk_path(),
            &image.manifest.disk_sha256,
            &cache_dir().join("raw"),
        )?,
    };
    let base = std::fs::File::open(&base_path)
        .with_context(|| format!("open the root disk {}", base_path.display()))?;
    // With --root (tests), the summary proves the base unchanged: hashed after the run through a
    // second handle opened now, as the sandbox allows no open() later.
    let base_check = match &cli.root {
        Some(_) => Some(
            base.try_clone()
                .context("duplicate the root disk's handle")?,
        ),
        None => None,
    };
    let base_size = construir_vmm::disk::round_to_sectors(base.metadata()?.len());
    let tmp = std::env::temp_dir();
    let root = OverlayDisk::new(base, base_size, &tmp, "construir-root")
        .context("create the root disk's overlay")?;

    let mut cmdline = KernelCmdline::for_job(host, cli.timeout, cli.clock);
    for param in &cli.kernel_args {
        cmdline.push(param.clone());
    }
    let boot_allowance = launcher::boot_allowance(host == HostKind::EmulatedKvm);
    let console = launcher::open_console(cli.console.as_deref())
        .with_context(|| format!("open the console log {:?}", cli.console))?;
    let mut vcpus = cli.vcpus.unwrap_or(image.manifest.vcpus.clamp(1, 32) as u8);
    if host == HostKind::EmulatedKvm && vcpus > 1 {
        tracing::warn!(
            "using 1 vCPU instead of {vcpus}: secondary vCPUs never come up on an emulated-KVM host \
             (measured here with QEMU too: the guest hangs at \"Booting SMP configuration\")"
        );
        vcpus = 1;
    }
    let sandbox = (!no_sandbox).then(|| sandbox_files(&cli, &kernel, &base_path));
    let config = VmConfig {
        kernel,
        cmdline: cmdline.to_string(),
        memory_mib: cli.memory.unwrap_or(u64::from(image.manifest.memory_mib)),
        vcpus,
        disks: vec![
            (
                Box::new(root) as Box<dyn DiskBackend>,
                false,
                "root".to_string(),
            ),
            (Box::new(job), false, "job".to_string()),
        ],
        console,
        console_cap: cli.console_cap,
        deadline: cli.timeout + boot_allowance,
        process_start,
        sandbox,
    };
    tracing::info!(image = %index, host = %host, "booting {} in a VM", cli.job.display());
    let report = vm::run(config)?;
    let outcome = &report.outcome;
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    eprintln!(
        "construir-vmm: {outcome} (exit {}) in {:.1} s [host {host}; first KVM_RUN {:?} ms, first console byte {:?} ms, init {:?} ms]",
        outcome.exit_code(),
        report.timings.to_exit.as_secs_f64(),
        ms(report.timings.to_first_kvm_run),
        ms(report.timings.to_first_console_byte),
        ms(report.timings.to_init),
    );
    if cli.json {
        let disks: serde_json::Map<String, serde_json::Value> = report
            .disks
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    serde_json::json!({
                        "read_bytes": s.read_bytes.load(Ordering::Relaxed),
                        "written_bytes": s.written_bytes.load(Ordering::Relaxed),
                        "requests": s.requests.load(Ordering::Relaxed),
                        "bad_requests": s.bad_requests.load(Ordering::Relaxed),
                        "guest_faults": s.faults.total(),
                    }),
                )
            })
            .collect();
        let summary = serde_json::json!({
            "status": outcome.status(),
            "exit_code": outcome.exit_code(),
            "job_exit_status": outcome.job_exit_status(),
            "reason": outcome.to_string(),
            "backend": "vmm",
            "host_kind": host.as_str(),
            "image": index,
            "boot_ms": {
                "first_kvm_run": ms(report.timings.to_first_kvm_run),
                "first_console_byte": ms(report.timings.to_first_console_byte),
                "init": ms(report.timings.to_init),
                "exit": report.timings.to_exit.as_millis() as u64,
            },
            "setup_us": report
                .timings
                .setup
                .iter()
                .map(|(phase, d)| ((*phase).to_string(), serde_json::json!(d.as_micros() as u64)))
                .collect::<serde_json::Map<_, _>>(),
            "run_ms": report.timings.to_exit.as_millis() as u64,
            "disks": disks,
            "job_disk_bytes": job_size_before,
            "console_bytes": report.console_written,
            "console_dropped": report.console_dropped,
            "root_base_sha256": base_check.and_then(|f| sha256_reader(f).ok()),
        });
        println!("{summary}");
    }
    let _ = std::io::stdout().flush();
    Ok(outcome.exit_code())
}

/// The files the VMM may still reach once sandboxed: its kernel and root base (read), the job
/// file and console log (read-write), and /dev/kvm. All are open by then; see docs/security.md.
fn sandbox_files(
    cli: &JobArgs,
    kernel: &std::path::Path,
    base: &std::path::Path,
) -> Vec<AllowedFile> {
    let file = |path: &std::path::Path, write| AllowedFile {
        path: path.to_path_buf(),
        write,
    };
    let mut files = vec![
        file(kernel, false),
        file(base, false),
        file(&cli.job, true),
        file(std::path::Path::new("/dev/kvm"), true),
    ];
    if let Some(console) = launcher::console_file(cli.console.as_deref()) {
        files.push(file(console, true));
    }
    files
}
