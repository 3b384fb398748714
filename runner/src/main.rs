//! construir-runner: watch a queue directory and run each job in its own VM.

use anyhow::Context;
use clap::Parser;
use construir_contract::host::{HostFacts, HostKind};
use construir_contract::manifest::default_images_dir;
use construir_launcher as launcher;
use construir_launcher::duration::parse_duration;
use construir_runner::{backend, dirs, runner};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "construir-runner",
    about = "Watch DIR/queue and run each job in its own throw-away VM; results go to DIR/done or DIR/failed",
    after_help = "Example:\n  construir-runner --dir /srv/construir --jobs 2\n  \
(then: cp hello_i0.tar.xz /srv/construir/hello_i0.tar.xz.partial && mv /srv/construir/hello_i0.tar.xz.partial /srv/construir/queue/)\n\n\
Write jobs elsewhere and rename them into queue/ (or copy them in: a file is taken once it is closed after writing)."
)]
struct Cli {
    /// The runner's directory (queue/, running/, done/, failed/ are made in it).
    #[arg(long)]
    dir: PathBuf,
    /// Jobs run in parallel (default: what the host's cores and memory allow).
    #[arg(long)]
    jobs: Option<usize>,
    /// auto (construir-vmm on hardware KVM, QEMU with TCG elsewhere), vmm or qemu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Each job's time limit (90s, 30m, 2h).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    timeout: Duration,
    /// Where image manifests live (default: $CONSTRUIR_IMAGES or ~/.cache/construir/images).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Run this one job file (moved into the queue), then exit with its verdict (0: success) and
    /// print its run's directory.
    #[arg(long)]
    once: Option<PathBuf>,
    /// Print a JSON event per job start and end on stdout.
    #[arg(long)]
    json: bool,
    /// Starts a job gets before it is failed instead of retried, when the runner keeps dying during it.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// After SIGTERM/SIGINT, how long running jobs may go on before they are stopped and re-queued.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    grace: Duration,
    /// The largest job file taken (it is the job's disk): 64M, 8G, …; bigger ones fail as too-big.
    #[arg(long, default_value = "8G", value_parser = construir_launcher::jobfile::parse_size)]
    max_job_size: u64,
    /// A program with the launchers' command line to use as the backend (tests).
    #[arg(long, hide = true)]
    backend_program: Option<PathBuf>,
}

fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(2048);
    // One VM per core, and 1.5 GiB of host memory per VM (i0 guests get 1 GiB).
    cores.min((mem_mib / 1536).max(1) as usize).max(1)
}

fn main() {
    launcher::init_logging();
    let cli: Cli = launcher::parse_args();
    launcher::stop_on_termination_signals(&runner::STOP);
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("construir-runner: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs the runner; the process's exit code (with --once, the job's verdict).
fn run(cli: Cli) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        tracing::warn!(
            "running as root: every VMM runs as root too; a farm should run as a dedicated user \
             (runner/construir-runner.service) — each VMM is still confined by seccomp, landlock and rlimits"
        );
    }
    let dirs = dirs::QueueDirs::create(&cli.dir)
        .with_context(|| format!("set up {}", cli.dir.display()))?;
    let host: HostKind = HostFacts::read().kind();
    let (backend, why) = match &cli.backend_program {
        Some(p) => (
            backend::Backend::Program { exe: p.clone() },
            "a test program".to_string(),
        ),
        None => backend::choose(&cli.backend, host, &backend::binaries_dir())
            .map_err(anyhow::Error::msg)?,
    };
    let jobs = cli.jobs.unwrap_or_else(default_jobs).max(1);
    eprintln!(
        "construir-runner: {} job(s) at a time with backend {} ({why}); host {host}; watching {}",
        jobs,
        backend.name(),
        dirs.queue.display()
    );
    // One runner per directory, --once included (it would start the live runner's runs again).
    let _lock = dirs.lock()?;
    let once = match &cli.once {
        Some(file) => Some(queue_once(&dirs, file)?),
        None => None,
    };
    let once_run = runner::run(runner::RunnerConfig {
        dirs,
        jobs,
        backend,
        host,
        timeout: cli.timeout,
        images_dir: cli.images_dir.unwrap_or_else(default_images_dir),
        max_attempts: cli.max_attempts.max(1),
        grace: cli.grace,
        json: cli.json,
        once,
        max_job_size: cli.max_job_size,
    })?;
    let Some(run_id) = once_run else {
        return Ok(0);
    };
    // --once: the job's own verdict is the exit code (0 on success; the backend's code, or 1).
    let record = ["done", "failed"]
        .iter()
        .map(|sub| cli.dir.join(sub).join(&run_id).join(dirs::RECORD))
        .find(|p| p.is_file())
        .context("the --once job's run has no record")?;
    let rec: construir_runner::record::Record = serde_json::from_slice(&std::fs::read(&record)?)
        .with_context(|| format!("read {}", record.display()))?;
    println!("{}", record.parent().unwrap_or(&cli.dir).display());
    Ok(match rec.status.as_str() {
        "success" => 0,
        _ => rec.exit_code.filter(|c| (1..=106).contains(c)).unwrap_or(1),
    })
}

/// Puts `--once`'s file into the queue under its own name, never over a queued job of that name:
/// renamed in, or (from another file system) copied into a fresh, private temporary file first.
fn queue_once(
    dirs: &dirs::QueueDirs,
    file: &std::path::Path,
) -> anyhow::Result<std::ffi::OsString> {
    let name = file
        .file_name()
        .context("--once needs a file name")?
        .to_os_string();
    let target = dirs.queue.join(&name);
    match dirs::rename_noreplace(file, &target) {
        Ok(()) => return Ok(name),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} is already queued: a job of that name is waiting",
            target.display()
        ),
        Err(_) => {}
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".once-")
        .suffix(".partial")
        .tempfile_in(&dirs.queue)
        .context("make a temporary file in the queue")?;
    let mut src = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
    std::io::copy(&mut src, tmp.as_file_mut())
        .with_context(|| format!("copy {} into the queue", file.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(&target)
        .map_err(|e| e.error)
        .with_context(|| format!("queue {}", target.display()))?;
    std::fs::remove_file(file)?;
    Ok(name)
}
