//! construir-qemu: run one job under QEMU (`-M microvm`), with KVM or TCG.

use anyhow::Context;
use clap::Parser;
use construir_abi::console::DEFAULT_CONSOLE_CAP;
use construir_abi::duration::parse_duration;
use construir_abi::host::{HostFacts, HostKind};
use construir_abi::jobname::parse_job_name;
use construir_abi::launcher;
use construir_abi::manifest::{Image, default_images_dir};
use construir_abi::outcome::{EXIT_HOST_UNSUPPORTED, EXIT_SETUP_ERROR, RunOutcome};
use construir_tools::qemu::{self, Accel, LaunchConfig, LaunchError};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "construir-qemu",
    about = "Run a construir job under QEMU (microvm), with KVM or TCG",
    after_help = "Example:\n  construir-qemu --job hello_t0.tar.xz --accel tcg --console -\n\n\
Exit status: the job's own status for 0-99; 100 job failed with >= 100 or by a signal; \
101 invalid job; 102 timed out; 103 guest failed; 104 host cannot run guests; 105 setup error; \
106 interrupted."
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
    /// kvm, tcg, or auto: KVM on hardware-assisted KVM, TCG elsewhere.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Override host detection: auto, hardware, emulated or none.
    #[arg(long, default_value = "auto")]
    host_kind: String,
    /// Guest memory in MiB (default: the image's).
    #[arg(long)]
    memory: Option<u32>,
    /// vCPUs (default: the image's).
    #[arg(long)]
    vcpus: Option<u32>,
    /// The job's time limit (90s, 30m, 2h); boot time is allowed on top.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
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
    /// Use this kernel instead of the image's.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Use this root disk (qcow2 or raw) instead of the image's.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

fn main() {
    launcher::init_logging();
    let cli: Cli = launcher::parse_args();
    launcher::stop_on_termination_signals(&qemu::INTERRUPTED);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("construir-qemu: error: {e:#}");
            match e.downcast_ref::<LaunchError>() {
                Some(LaunchError::NoKvm | LaunchError::NoQemu { .. }) => EXIT_HOST_UNSUPPORTED,
                _ => EXIT_SETUP_ERROR,
            }
        }
    };
    std::process::exit(i32::from(code));
}

fn run(cli: Cli) -> anyhow::Result<u8> {
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
    let facts = HostFacts::read();
    let host = match cli.host_kind.as_str() {
        "auto" => facts.kind(),
        other => other.parse::<HostKind>().map_err(anyhow::Error::msg)?,
    };
    let (accel, why) = match cli.accel.as_str() {
        "auto" => Accel::auto(host),
        "kvm" => (Accel::Kvm, "asked for"),
        "tcg" => (Accel::Tcg, "asked for"),
        other => anyhow::bail!("--accel {other:?}: expected auto, kvm or tcg"),
    };
    if accel == Accel::Kvm && host == HostKind::EmulatedKvm {
        tracing::warn!(
            "this host has no hardware virtualization (its KVM emulates the guest kernel): the boot takes \
             minutes and user space runs far slower than under TCG; adding the emulated-host kernel parameters"
        );
    }
    tracing::info!(image = %index, accel = accel.as_str(), host = %host, "running {} ({why})", cli.job.display());
    let config = LaunchConfig {
        qemu: cli.qemu.clone(),
        kernel: cli.kernel.clone().unwrap_or_else(|| image.kernel_path()),
        root_disk: cli.root.clone().unwrap_or_else(|| image.disk_path()),
        root_format: if cli.root.is_some() {
            detect_format(cli.root.as_deref().unwrap())?
        } else {
            image.manifest.disk_format.clone()
        },
        job: cli.job.clone(),
        accel,
        host,
        memory_mib: cli.memory.unwrap_or(image.manifest.memory_mib),
        vcpus: cli.vcpus.unwrap_or(image.manifest.vcpus),
        job_timeout: cli.timeout,
        boot_allowance: qemu::boot_allowance(accel, host),
        console_cap: cli.console_cap,
    };
    let console = launcher::open_console(cli.console.as_deref())
        .with_context(|| format!("open the console log {:?}", cli.console))?;
    let result = qemu::launch(&config, console)?;
    let outcome = &result.outcome;
    if let RunOutcome::GuestFailed(_) = outcome
        && !result.qemu_stderr.trim().is_empty()
    {
        eprintln!("construir-qemu: QEMU said: {}", result.qemu_stderr.trim());
    }
    eprintln!(
        "construir-qemu: {outcome} (exit {}) in {:.1} s [qemu {}, host {}]",
        outcome.exit_code(),
        result.total.as_secs_f64(),
        result.accel.as_str(),
        result.host
    );
    if cli.json {
        let summary = serde_json::json!({
            "status": outcome.status(),
            "exit_code": outcome.exit_code(),
            "job_exit_status": outcome.job_exit_status(),
            "reason": outcome.to_string(),
            "backend": "qemu",
            "accel": result.accel.as_str(),
            "host_kind": result.host.as_str(),
            "image": index,
            "run_ms": result.total.as_millis() as u64,
            "to_init_ms": result.to_init.map(|d| d.as_millis() as u64),
            "console_bytes": result.console_bytes,
            "console_dropped": result.console_dropped,
        });
        println!("{summary}");
    }
    Ok(outcome.exit_code())
}

fn detect_format(path: &std::path::Path) -> anyhow::Result<String> {
    let mut magic = [0u8; 4];
    use std::io::Read;
    std::fs::File::open(path)
        .with_context(|| format!("open {}", path.display()))?
        .read_exact(&mut magic)
        .with_context(|| format!("read {}", path.display()))?;
    Ok(if &magic == b"QFI\xfb" { "qcow2" } else { "raw" }.to_string())
}
