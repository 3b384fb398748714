//! construir-qemu: run one job under QEMU (`-M microvm`), with KVM or TCG.

use anyhow::Context;
use clap::Parser;
use construir_abi::host::HostKind;
use construir_abi::launcher::{self, JobArgs};
use construir_abi::outcome::{EXIT_HOST_UNSUPPORTED, EXIT_SETUP_ERROR, RunOutcome};
use construir_tools::qemu::{self, Accel, LaunchConfig, LaunchError};
use std::path::PathBuf;

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
    #[command(flatten)]
    job: JobArgs,
    /// kvm, tcg, or auto: KVM on hardware-assisted KVM, TCG elsewhere.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// microvm (what construir runs), or pc: QEMU's default machine with IDE disks, the seed's
    /// way, a benchmark baseline that needs the pc kernel variant (guest/kernel/build --variant pc).
    #[arg(long, default_value = "microvm")]
    machine: String,
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
    let image = cli.job.image()?;
    let index = image.manifest.index.clone();
    let host = cli.job.host()?;
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
    let job = &cli.job;
    tracing::info!(image = %index, accel = accel.as_str(), host = %host, "running {} ({why})", job.job.display());
    let config = LaunchConfig {
        qemu: cli.qemu.clone(),
        kernel: job.kernel.clone().unwrap_or_else(|| image.kernel_path()),
        root_disk: job.root.clone().unwrap_or_else(|| image.disk_path()),
        root_format: match &job.root {
            Some(root) => detect_format(root)?,
            None => image.manifest.disk_format.clone(),
        },
        job: job.job.clone(),
        accel,
        host,
        memory_mib: job.memory.map_or(image.manifest.memory_mib, |m| m as u32),
        vcpus: job.vcpus.map_or(image.manifest.vcpus, u32::from),
        job_timeout: job.timeout,
        boot_allowance: qemu::boot_allowance(accel, host),
        console_cap: job.console_cap,
        kernel_args: job.kernel_args.clone(),
        machine: qemu::Machine::parse(&cli.machine)
            .with_context(|| format!("--machine {:?}: expected microvm or pc", cli.machine))?,
    };
    let console = launcher::open_console(job.console.as_deref())
        .with_context(|| format!("open the console log {:?}", job.console))?;
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
    if job.json {
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
