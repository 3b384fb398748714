//! construir-vmm: boot construir's build kernel with an image's root disk and a job disk on KVM,
//! run the job, exit with its status.

use anyhow::Context;
use clap::Parser;
use construir_abi::cmdline::{GuestParams, KernelCmdline};
use construir_abi::console::DEFAULT_CONSOLE_CAP;
use construir_abi::host::{HostFacts, HostKind};
use construir_abi::jobname::parse_job_name;
use construir_abi::launcher;
use construir_abi::manifest::{Image, cache_dir, default_images_dir};
use construir_abi::outcome::{EXIT_HOST_UNSUPPORTED, EXIT_SETUP_ERROR};
use construir_vmm::disk::DiskBackend;
use construir_vmm::disk::overlay::OverlayDisk;
use construir_vmm::disk::qcow2::{cached_raw_base, sha256_file};
use construir_vmm::disk::raw::RawDisk;
use construir_vmm::vm::{self, VmConfig, VmError};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// The job file (an xz tar with opt/job/construir; its output is written over it).
    #[arg(long)]
    job: PathBuf,
    /// Image index (default: from the job name, NAME_INDEX.tar.xz).
    #[arg(long)]
    image: Option<String>,
    /// Where image manifests live (default: $CONSTRUIR_IMAGES or ~/.cache/construir/images).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Guest memory: 512M, 1G, or MiB (default: the image's).
    #[arg(long, value_parser = parse_memory)]
    memory: Option<u64>,
    /// vCPUs (default: the image's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=32))]
    vcpus: Option<u8>,
    /// The job's time limit (90s, 30m, 2h); boot time is allowed on top.
    #[arg(long, default_value = "30m", value_parser = construir_abi::duration::parse_duration)]
    timeout: Duration,
    /// Console: a file, - for stdout, or none (default: stderr).
    #[arg(long)]
    console: Option<String>,
    /// Console bytes kept at most.
    #[arg(long, default_value_t = DEFAULT_CONSOLE_CAP)]
    console_cap: u64,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// Use this kernel (ELF vmlinux) instead of the image's.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Use this raw root disk as the read-only base instead of the image's.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Override host detection: auto, hardware or emulated.
    #[arg(long, default_value = "auto")]
    host_kind: String,
}

fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a memory size (examples: 512M, 2G)"))?;
    let mib = n * mult;
    if !(64..=65536).contains(&mib) {
        return Err(format!("{text}: guest memory must be between 64M and 64G"));
    }
    Ok(mib)
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
    let file_name = cli
        .job
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let index = match cli.image.clone() {
        Some(index) => index,
        None => parse_job_name(file_name)?.image,
    };
    let images_dir = cli.images_dir.clone().unwrap_or_else(default_images_dir);
    let image = Image::load(&images_dir, &index)?;
    let host = match cli.host_kind.as_str() {
        "auto" => HostFacts::read().kind(),
        other => other.parse::<HostKind>().map_err(anyhow::Error::msg)?,
    };
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
    let base_size = construir_vmm::disk::round_to_sectors(base.metadata()?.len());
    let tmp = std::env::temp_dir();
    let root = OverlayDisk::new(base, base_size, &tmp, "construir-root")
        .context("create the root disk's overlay")?;
    let job_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&cli.job)
        .with_context(|| format!("open the job file {}", cli.job.display()))?;
    anyhow::ensure!(
        job_file.metadata()?.is_file(),
        "{} is not a regular file",
        cli.job.display()
    );
    let job = RawDisk::new(job_file, "construir-job")?;
    let job_size_before = job.size();

    let mut cmdline = KernelCmdline::for_host(host);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    cmdline.push_guest_params(&GuestParams {
        host_time: Some(now),
        timeout_secs: Some(cli.timeout.as_secs().max(1)),
        ..GuestParams::default()
    });
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
            "run_ms": report.timings.to_exit.as_millis() as u64,
            "disks": disks,
            "job_disk_bytes": job_size_before,
            "console_bytes": report.console_written,
            "console_dropped": report.console_dropped,
            "root_base_sha256": if cli.root.is_some() { sha256_file(&base_path).ok() } else { None },
        });
        println!("{summary}");
    }
    let _ = std::io::stdout().flush();
    Ok(outcome.exit_code())
}
