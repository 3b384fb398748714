//! construir-runner: watch a queue directory and run each job in its own VM.

use anyhow::Context;
use clap::Parser;
use construir_contract::host::{HostFacts, HostKind};
use construir_contract::manifest::default_images_dir;
use construir_launcher as launcher;
use construir_launcher::duration::parse_duration;
use construir_runner::{backend, dirs, netns, remote, runner};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "construir-runner",
    about = "Run build jobs, each in its own throw-away VM: from a queue directory (--dir), or pulled from a construir server (--server)",
    after_help = "Examples:\n  construir-runner --dir /srv/construir --jobs 2\n  \
(then: cp hello_i0.tar.xz /srv/construir/hello_i0.tar.xz.partial && mv /srv/construir/hello_i0.tar.xz.partial /srv/construir/queue/)\n  \
construir-runner --server https://farm.example.org --token-file /etc/construir/runner.token --jobs 2 --max-memory 4G\n\n\
Local mode: write jobs elsewhere and rename them into queue/ (or copy them in: a file is taken once it is closed after writing).\n\
Pull mode: outbound HTTP(S) only; the flags --max-* say what this machine lends, and no job beyond them is ever taken."
)]
struct Cli {
    /// The runner's directory (local mode: queue/, running/, done/, failed/ are made in it; pull
    /// mode: attempts run in DIR/remote/; default there: ~/.cache/construir/runner).
    #[arg(long, required_unless_present = "server")]
    dir: Option<PathBuf>,
    /// Pull mode: take jobs from this construir server (https://; http:// only to this host
    /// unless --insecure).
    #[arg(long, requires = "token_file", value_name = "URL")]
    server: Option<String>,
    /// Pull mode: the file holding this runner's token (registers and claims only).
    #[arg(long, requires = "server", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Pull mode: allow plain http:// to a server that is not on this host (the token and the
    /// jobs then cross the network in clear).
    #[arg(long, requires = "server")]
    insecure: bool,
    /// Pull mode: the name this runner registers under (default: the host name).
    #[arg(long, requires = "server")]
    name: Option<String>,
    /// Jobs run in parallel (default: what the host's cores and memory allow).
    #[arg(long)]
    jobs: Option<usize>,
    /// auto (construir-vmm on hardware KVM, QEMU with TCG elsewhere), vmm or qemu.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Local mode: each job's time limit (90s, 30m, 2h).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    timeout: Duration,
    /// Where image manifests live (default: $CONSTRUIR_IMAGES or ~/.cache/construir/images).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Local mode: run this one job file (moved into the queue), then exit with its verdict (0:
    /// success) and print its run's directory.
    #[arg(long, conflicts_with = "server")]
    once: Option<PathBuf>,
    /// Local mode: print a JSON event per job start and end on stdout.
    #[arg(long, conflicts_with = "server")]
    json: bool,
    /// Local mode: starts a job gets before it is failed instead of retried, when the runner keeps dying during it.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// After SIGTERM/SIGINT, how long running jobs may go on before they are stopped and re-queued.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    grace: Duration,
    /// The largest job file taken (it is the job's disk): 64M, 8G, …; bigger ones fail as too-big
    /// (pull mode: are never claimed).
    #[arg(long, default_value = "8G", value_parser = construir_launcher::jobfile::parse_size)]
    max_job_size: u64,
    /// Pull mode: guest memory lent to all jobs together, and the largest guest (512M, 4G;
    /// default: 3/4 of the host's memory).
    #[arg(long, value_parser = construir_launcher::parse_memory, value_name = "SIZE")]
    max_memory: Option<u64>,
    /// Pull mode: the most vCPUs one guest gets (default: the host's cores, at most 32).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=32), value_name = "N")]
    max_vcpus: Option<u32>,
    /// Pull mode: the longest time limit a job may have (90s, 30m, 2h).
    #[arg(long, default_value = "2h", value_parser = parse_duration, value_name = "DURATION")]
    max_timeout: Duration,
    /// Pull mode: the most output one job may upload (64M, 1G).
    #[arg(long, default_value = "1G", value_parser = construir_launcher::jobfile::parse_size, value_name = "SIZE")]
    max_output_size: u64,
    /// Pull mode: the most disk the cache of images fetched from the server by digest may use
    /// (DIR/image-cache; the least recently used go first; 0: fetch none, run only the
    /// --images-dir images on jobs pinned to no digest).
    #[arg(long, default_value = "20G", value_parser = construir_launcher::jobfile::parse_size, value_name = "SIZE")]
    cache_size: u64,
    /// A program with the launchers' command line to use as the backend (tests).
    #[arg(long, hide = true)]
    backend_program: Option<PathBuf>,
}

/// The host's memory in MiB.
fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(2048)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn default_jobs() -> usize {
    // One VM per core, and 1.5 GiB of host memory per VM (i0 guests get 1 GiB).
    cores()
        .min((host_memory_mib() / 1536).max(1) as usize)
        .max(1)
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
    if cli.server.is_some() {
        return pull(cli, backend, &why, host, jobs).map(|()| 0);
    }
    let dir = cli
        .dir
        .clone()
        .context("--dir is needed without --server")?;
    let dirs =
        dirs::QueueDirs::create(&dir).with_context(|| format!("set up {}", dir.display()))?;
    eprintln!(
        "construir-runner: {} job(s) at a time with backend {} ({why}); host {host}; watching {}; \
         backends in {}",
        jobs,
        backend.name(),
        dirs.queue.display(),
        netns::mode().isolation.describe()
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
        .map(|sub| dir.join(sub).join(&run_id).join(dirs::RECORD))
        .find(|p| p.is_file())
        .context("the --once job's run has no record")?;
    let rec: construir_runner::record::Record = serde_json::from_slice(&std::fs::read(&record)?)
        .with_context(|| format!("read {}", record.display()))?;
    println!("{}", record.parent().unwrap_or(&dir).display());
    Ok(match rec.status.as_str() {
        "success" => 0,
        _ => rec.exit_code.filter(|c| (1..=106).contains(c)).unwrap_or(1),
    })
}

/// The pull mode: settings from the flags, the checks that must hold before anything is
/// claimed, then the loop (remote/).
fn pull(
    cli: Cli,
    backend: backend::Backend,
    why: &str,
    host: HostKind,
    jobs: usize,
) -> anyhow::Result<()> {
    let cfg = remote_config(&cli, backend, host, jobs)?;
    // The VMs must not have the network the runner has: refuse rather than run without.
    let probe = netns::mode();
    if probe.isolation == netns::Isolation::None {
        anyhow::bail!(
            "cannot give the backends a network namespace of their own ({}): the VMs would share \
             this runner's network. Run as root, or where unprivileged user namespaces are allowed \
             (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0; under \
             systemd: RestrictNamespaces=user net, as runner/construir-runner-remote.service has)",
            probe.failures.join("; ")
        );
    }
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("make {}", cfg.dir.display()))?;
    let _lock = dirs::lock_dir(&cfg.dir)?;
    eprintln!(
        "construir-runner: pull mode, server {}; backend {} ({why}); host {host}; lends {} job(s), \
         {} MiB, {} vCPU(s) a guest, {} s a job; backends in {}",
        cfg.server,
        cfg.backend.name(),
        cfg.lent.jobs,
        cfg.lent.memory_mib,
        cfg.lent.vcpus,
        cfg.lent.timeout_s,
        probe.isolation.describe()
    );
    remote::run(cfg)
}

/// The pull mode's settings from the command line.
fn remote_config(
    cli: &Cli,
    backend: backend::Backend,
    host: HostKind,
    jobs: usize,
) -> anyhow::Result<remote::RemoteConfig> {
    let server = cli.server.as_deref().context("--server")?;
    let base = remote::client::server_base(server, cli.insecure)?;
    let token_file = cli.token_file.as_deref().context("--token-file")?;
    let memory_mib = cli
        .max_memory
        .unwrap_or_else(|| (host_memory_mib() * 3 / 4).clamp(64, 65536));
    Ok(remote::RemoteConfig {
        server: base,
        token: remote::read_token(token_file)?,
        name: cli.name.clone().unwrap_or_else(hostname),
        dir: cli
            .dir
            .clone()
            .unwrap_or_else(|| construir_contract::manifest::cache_dir().join("runner")),
        images_dir: cli.images_dir.clone().unwrap_or_else(default_images_dir),
        backend,
        host,
        lent: remote::caps::Lent {
            jobs: u32::try_from(jobs).unwrap_or(u32::MAX),
            memory_mib: u32::try_from(memory_mib).unwrap_or(u32::MAX),
            vcpus: cli.max_vcpus.unwrap_or_else(|| cores().clamp(1, 32) as u32),
            timeout_s: cli.max_timeout.as_secs(),
            job_size: cli.max_job_size,
            output_size: cli.max_output_size,
        },
        grace: cli.grace,
        cache_size: cli.cache_size,
    })
}

/// This host's name (the runner's default name).
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if r != 0 || len == 0 {
        return "construir-runner".to_string();
    }
    // As a server takes runner names: letters, digits, '-', '_', '.', at most 64.
    buf[..len.min(64)]
        .iter()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => char::from(*b),
            _ => '-',
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("construir-runner").chain(args.iter().copied()))
    }

    /// The --cache-size a command line gives.
    fn parse_size_flag(args: &[&str]) -> u64 {
        let base = ["--server", "https://x", "--token-file", "/t"];
        parse(&[&base[..], args].concat()).unwrap().cache_size
    }

    #[test]
    fn the_local_mode_is_as_it_was() {
        let cli = parse(&["--dir", "/srv/c", "--jobs", "2", "--timeout", "90s"]).unwrap();
        assert_eq!(cli.dir.as_deref(), Some(Path::new("/srv/c")));
        assert_eq!(cli.timeout, Duration::from_secs(90));
        assert!(cli.server.is_none());
        assert!(parse(&[]).is_err(), "--dir or --server");
    }

    #[test]
    fn the_pull_mode_takes_the_lenders_limits() {
        let cli = parse(&[
            "--server",
            "https://farm.example.org",
            "--token-file",
            "/etc/construir/runner.token",
            "--max-memory",
            "4G",
            "--max-vcpus",
            "4",
            "--max-timeout",
            "1h",
            "--max-output-size",
            "256M",
            "--max-job-size",
            "2G",
            "--name",
            "attic",
        ])
        .unwrap();
        assert_eq!(cli.dir, None, "--dir is optional here");
        assert_eq!(cli.max_memory, Some(4096));
        assert_eq!(cli.max_vcpus, Some(4));
        assert_eq!(cli.max_timeout, Duration::from_secs(3600));
        assert_eq!(
            (cli.max_output_size, cli.max_job_size),
            (256 << 20, 2 << 30)
        );
        assert_eq!(
            cli.cache_size,
            construir_runner::remote::images::DEFAULT_CACHE_SIZE
        );
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "secret\n").unwrap();
        let cli = Cli {
            token_file: Some(token),
            dir: Some(d.path().to_path_buf()),
            ..cli
        };
        let backend = backend::Backend::Program {
            exe: "/bin/true".into(),
        };
        let cfg = remote_config(&cli, backend.clone(), HostKind::NoKvm, 3).unwrap();
        assert_eq!(cfg.cache_size, 20 << 30);
        assert_eq!(parse_size_flag(&["--cache-size", "512M"]), 512 << 20);
        assert_eq!(parse_size_flag(&["--cache-size", "0"]), 0, "fetch none");
        assert!(
            parse(&[
                "--server",
                "https://x",
                "--token-file",
                "/t",
                "--cache-size",
                "lots"
            ])
            .is_err()
        );
        assert_eq!(cfg.token, "secret");
        assert_eq!(cfg.name, "attic");
        assert_eq!(cfg.server, "https://farm.example.org");
        assert_eq!(
            (
                cfg.lent.jobs,
                cfg.lent.memory_mib,
                cfg.lent.vcpus,
                cfg.lent.timeout_s
            ),
            (3, 4096, 4, 3600)
        );
        // Plain http:// to another host only when asked for.
        let plain = Cli {
            server: Some("http://farm.example.org".into()),
            ..cli
        };
        let e = remote_config(&plain, backend.clone(), HostKind::NoKvm, 1).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        let insecure = Cli {
            insecure: true,
            ..plain
        };
        remote_config(&insecure, backend, HostKind::NoKvm, 1).unwrap();
    }

    #[test]
    fn flags_of_one_mode_are_refused_in_the_other() {
        assert!(parse(&["--server", "https://x"]).is_err(), "no token file");
        assert!(
            parse(&["--dir", "/d", "--token-file", "/t"]).is_err(),
            "no server"
        );
        assert!(parse(&["--dir", "/d", "--insecure"]).is_err());
        let both = [
            "--server",
            "https://x",
            "--token-file",
            "/t",
            "--once",
            "a_t0.tar.xz",
        ];
        assert!(parse(&both).is_err());
        assert!(
            parse(&[
                "--server",
                "https://x",
                "--token-file",
                "/t",
                "--max-vcpus",
                "33"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "--server",
                "https://x",
                "--token-file",
                "/t",
                "--max-memory",
                "1T"
            ])
            .is_err()
        );
        assert!(!hostname().is_empty());
    }
}
