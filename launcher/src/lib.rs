//! What every host-side binary (construir-vmm, construir-qemu, construir-runner) sets up the same
//! way: logging, argument errors as the documented setup-error exit code, SIGINT/SIGTERM as a
//! flag, the console sink, and how long a boot may take.

pub mod console;
pub mod duration;
pub mod jobfile;
pub mod size;

use crate::console::DEFAULT_CONSOLE_CAP;
use crate::duration::parse_duration;
use crate::jobfile::{DEFAULT_MAX_JOB_SIZE, JobFileError, open_job_file, parse_size};
use construir_contract::host::{HostFacts, HostKind};
use construir_contract::jobname::{JobNameError, parse_job_name};
use construir_contract::manifest::{Image, ManifestError, default_images_dir};
use construir_contract::outcome::EXIT_SETUP_ERROR;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The options both launchers (construir-vmm, construir-qemu) take for one job; the runner gives
/// every backend the same ones.
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// The job file (an xz tar with opt/job/construir; its output is written over it).
    #[arg(long)]
    pub job: PathBuf,
    /// Image index (default: from the job name, NAME_INDEX.tar.xz).
    #[arg(long)]
    pub image: Option<String>,
    /// Where image manifests live (default: $CONSTRUIR_IMAGES or ~/.cache/construir/images).
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// Override host detection: auto, hardware, emulated or none.
    #[arg(long, default_value = "auto")]
    pub host_kind: String,
    /// Guest memory: 512M, 1G, or MiB (default: the image's).
    #[arg(long, value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// vCPUs (default: the image's).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub vcpus: Option<u8>,
    /// The job's time limit (90s, 30m, 2h); boot time is allowed on top.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Start the guest's clock at this time (Unix seconds) and give the job it as
    /// SOURCE_DATE_EPOCH, whatever the host's clock says (default: the host's time, and no
    /// SOURCE_DATE_EPOCH). A server fixes one per job, so that every replica sees one time.
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub clock: Option<u64>,
    /// Console: a file, - for stdout, or none (default: stderr).
    #[arg(long)]
    pub console: Option<String>,
    /// Console bytes kept at most.
    #[arg(long, default_value_t = DEFAULT_CONSOLE_CAP)]
    pub console_cap: u64,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Use this kernel (ELF vmlinux) instead of the image's.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Use this root disk instead of the image's (construir-vmm: raw; construir-qemu: qcow2 or raw).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Add this kernel command-line parameter (repeatable; for profiling, e.g. initcall_debug).
    #[arg(long = "kernel-arg", value_name = "PARAM")]
    pub kernel_args: Vec<String>,
    /// The largest job file taken (its size is the job's disk): 64M, 8G, …
    #[arg(long, default_value_t = DEFAULT_MAX_JOB_SIZE, value_parser = parse_size)]
    pub max_job_size: u64,
}

/// Why the job's image could not be found.
#[derive(Debug, thiserror::Error)]
pub enum JobArgsError {
    #[error(transparent)]
    Name(#[from] JobNameError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("--host-kind: {0}")]
    HostKind(String),
}

impl JobArgs {
    /// The image the job runs in: `--image`, else the index in the job's name.
    pub fn image(&self) -> Result<Image, JobArgsError> {
        let index = match &self.image {
            Some(index) => index.clone(),
            None => {
                let file_name = self
                    .job
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                parse_job_name(file_name)?.image
            }
        };
        let dir = self.images_dir.clone().unwrap_or_else(default_images_dir);
        Ok(Image::load(&dir, &index)?)
    }

    /// Opens the job file: a regular file of its own, not followed through a symbolic link, at
    /// most `--max-job-size` bytes (see [`crate::jobfile`]).
    pub fn open_job(&self) -> Result<std::fs::File, JobFileError> {
        open_job_file(&self.job, self.max_job_size)
    }

    /// The host kind: detected, or as `--host-kind` says.
    pub fn host(&self) -> Result<HostKind, JobArgsError> {
        match self.host_kind.as_str() {
            "auto" => Ok(HostFacts::read().kind()),
            other => other.parse().map_err(JobArgsError::HostKind),
        }
    }
}

/// Parses a guest memory size into MiB: `512M`, `1G`, or a plain number of MiB; 64M to 64G.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('G' | 'g') => (&t[..t.len() - 1], 1024),
        Some('M' | 'm') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a memory size (examples: 512M, 2G)"))?;
    let mib = n.saturating_mul(mult);
    if !(64..=65536).contains(&mib) {
        return Err(format!("{text}: guest memory must be between 64M and 64G"));
    }
    Ok(mib)
}

/// Logs to stderr through `tracing`, filtered by `CONSTRUIR_LOG` (default `info`, with the
/// virtio-queue crate's own messages off: it logs a line for each of a driver's errors, which a
/// guest repeats at will; construir-vmm logs and counts those itself, rate-limited).
pub fn init_logging() {
    const DEFAULT_FILTER: &str = "info,virtio_queue=off";
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONSTRUIR_LOG")
                .unwrap_or_else(|_| DEFAULT_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Parses the command line; bad arguments exit with the setup-error code (`--help` with 0).
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                i32::from(EXIT_SETUP_ERROR)
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

static STOP_FLAG: OnceLock<&'static AtomicBool> = OnceLock::new();

extern "C" fn on_termination(_: libc::c_int) {
    if let Some(flag) = STOP_FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Makes SIGINT and SIGTERM set `flag` instead of killing the process.
pub fn stop_on_termination_signals(flag: &'static AtomicBool) {
    let _ = STOP_FLAG.set(flag);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only reads a OnceLock that is set before, and stores to an atomic;
        // both are async-signal-safe.
        unsafe { libc::signal(sig, on_termination as *const () as libc::sighandler_t) };
    }
}

/// The console sink for `--console`: a file, `-` for stdout, `none`, or stderr when not given.
pub fn open_console(spec: Option<&str>) -> std::io::Result<Box<dyn Write + Send>> {
    if let Some(path) = console_file(spec) {
        return Ok(Box::new(std::fs::File::create(path)?));
    }
    Ok(match spec {
        Some("-") => Box::new(std::io::stdout()),
        Some("none") => Box::new(std::io::sink()),
        _ => Box::new(std::io::stderr()),
    })
}

/// The file a `--console` spec names, if it names one (not stderr, `-` or `none`).
pub fn console_file(spec: Option<&str>) -> Option<&std::path::Path> {
    match spec {
        None | Some("-") | Some("none") => None,
        Some(path) => Some(std::path::Path::new(path)),
    }
}

/// How long a boot (and shutdown) may take on top of the job's limit before the host stops the VM:
/// minutes where KVM emulates the guest kernel, a minute elsewhere.
pub fn boot_allowance(kernel_emulated: bool) -> Duration {
    Duration::from_secs(if kernel_emulated { 600 } else { 60 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consoles_and_allowances() {
        assert!(open_console(Some("none")).unwrap().write_all(b"x").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        open_console(Some(path.to_str().unwrap()))
            .unwrap()
            .write_all(b"hello")
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(open_console(Some("/nonexistent/dir/x")).is_err());
        assert_eq!(
            console_file(Some(path.to_str().unwrap())),
            Some(path.as_path())
        );
        for not_a_file in [None, Some("-"), Some("none")] {
            assert_eq!(console_file(not_a_file), None);
        }
        assert_eq!(boot_allowance(true), Duration::from_secs(600));
        assert_eq!(boot_allowance(false), Duration::from_secs(60));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M").unwrap(), 512);
        assert_eq!(parse_memory("2G").unwrap(), 2048);
        assert_eq!(parse_memory("256").unwrap(), 256);
        for bad in ["", "G", "12M", "100G", "1.5G", "-1G"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_image_comes_from_the_job_name() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            job: JobArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let cli = Cli::parse_from([
            "x",
            "--job",
            "/q/hello_i7.tar.xz",
            "--images-dir",
            dir.path().to_str().unwrap(),
        ]);
        let err = cli.job.image().unwrap_err().to_string();
        assert!(err.contains("no image \"i7\""), "{err}");
        let cli = Cli::parse_from(["x", "--job", "/q/no-index.tar.xz"]);
        assert!(matches!(cli.job.image(), Err(JobArgsError::Name(_))));
        let cli = Cli::parse_from(["x", "--job", "j", "--host-kind", "tcg"]);
        assert!(matches!(cli.job.host(), Err(JobArgsError::HostKind(_))));
        assert_eq!(cli.job.timeout, Duration::from_secs(1800));
    }

    #[test]
    fn signals_set_the_flag() {
        static FLAG: AtomicBool = AtomicBool::new(false);
        stop_on_termination_signals(&FLAG);
        // SAFETY: raising SIGTERM in our own process, whose handler only sets FLAG.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(FLAG.load(Ordering::SeqCst));
    }
}
