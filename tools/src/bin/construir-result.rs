//! construir-result: what a finished job wrote back to its disk, with its record and console log.

use anyhow::Context;
use clap::Parser;
use construir_contract::archive::{self, Limits};
use construir_contract::text::printable;
use construir_tools::pack::parse_size;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "construir-result",
    about = "Show or extract what a finished construir job wrote to its disk",
    after_help = "Examples:\n  construir-result done/RUN                 # record, log, and the files\n  \
construir-result done/RUN --cat build.log\n  construir-result done/RUN --extract out/\n  \
construir-result hello_i0.tar.xz           # any job file a launcher ran"
)]
struct Cli {
    /// A run's directory (done/RUN or failed/RUN of a runner directory), the job file in it, or
    /// any job file a launcher ran.
    job: PathBuf,
    /// Extract the output into this directory.
    #[arg(long)]
    extract: Option<PathBuf>,
    /// Print one output file to stdout.
    #[arg(long)]
    cat: Option<String>,
    /// Largest file --cat prints (bytes, or 64M, 1G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    max_bytes: u64,
    /// Most bytes --extract writes into files, in all (a decompression bomb stops here).
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    max_output: u64,
    /// Most entries the job's output may have.
    #[arg(long, default_value_t = Limits::DEFAULT.max_entries)]
    max_entries: u64,
    /// Most bytes of decompressed tar read, whatever is done with them (default: twice
    /// --max-output).
    #[arg(long, value_parser = parse_size)]
    max_stream: Option<u64>,
}

impl Cli {
    fn limits(&self) -> Limits {
        Limits {
            max_entries: self.max_entries,
            max_output: self.max_output,
            max_stream: self.max_stream.unwrap_or(self.max_output.saturating_mul(2)),
            ..Limits::DEFAULT
        }
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // Errors can quote the archive's own names.
        eprintln!("construir-result: error: {}", printable(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// What a path given on the command line names: the job file, and its run's record and console
/// log when it is (in) a run directory of a runner.
#[derive(Debug, PartialEq, Eq)]
struct Located {
    job: PathBuf,
    record: Option<PathBuf>,
    console: Option<PathBuf>,
}

/// The files of a run directory that are the runner's, not the job's.
const RUN_FILES: &[&str] = &[
    "record.json",
    "run.json",
    "console.log",
    "backend.log",
    "submitted",
];

fn locate(path: &Path) -> anyhow::Result<Located> {
    let (dir, job) = if path.is_dir() {
        let mut jobs = Vec::new();
        for entry in std::fs::read_dir(path).with_context(|| format!("read {}", path.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            if !RUN_FILES.iter().any(|f| name == *f) && !name.to_string_lossy().starts_with('.') {
                jobs.push(entry.path());
            }
        }
        anyhow::ensure!(
            jobs.len() == 1,
            "{} is not a run directory (it should hold one job file and record.json; found {} other files)",
            path.display(),
            jobs.len()
        );
        (path.to_path_buf(), jobs.remove(0))
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    };
    let in_run = dir.join("record.json");
    // The layout before run directories kept NAME.json next to the job file.
    let legacy = job.with_file_name(format!(
        "{}.json",
        job.file_name().unwrap_or_default().to_string_lossy()
    ));
    let record = [in_run, legacy].into_iter().find(|p| p.is_file());
    let console = Some(dir.join("console.log")).filter(|p| record.is_some() && p.is_file());
    Ok(Located {
        job,
        record,
        console,
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let located = locate(&cli.job)?;
    // A run refused at intake keeps what arrived: a symbolic link, a FIFO, someone else's hard
    // link. Read only a regular file, never through a link, and never block on a FIFO.
    let open = || {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&located.job)
            .with_context(|| {
                format!(
                    "open {} (not followed if it is a link)",
                    located.job.display()
                )
            })?;
        anyhow::ensure!(
            f.metadata()?.is_file(),
            "{} is not a regular file: nothing to read",
            located.job.display()
        );
        Ok(f)
    };
    let reader = || open().map(std::io::BufReader::new);
    let limits = cli.limits();
    if let Some(path) = &cli.cat {
        // Streamed: a file up to --max-bytes is never held in memory whole.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        archive::copy_file(reader()?, path, cli.max_bytes, &limits, &mut out)?
            .with_context(|| format!("the job's output has no {path}"))?;
        out.flush()?;
        return Ok(());
    }
    if let Some(dir) = &cli.extract {
        std::fs::create_dir_all(dir)?;
        // Not the guest's unpack: modes are masked by the umask, set-user-ID bits dropped.
        let summary = archive::extract(reader()?, dir, &limits)?;
        eprintln!(
            "extracted {} entries ({} bytes) into {}",
            summary.entries,
            summary.bytes,
            dir.display()
        );
        return Ok(());
    }
    match &located.record {
        Some(record) => {
            let text = std::fs::read_to_string(record)
                .with_context(|| format!("read {}", record.display()))?;
            let rec: serde_json::Value =
                serde_json::from_str(&text).context("the record is not JSON")?;
            // Every field can hold what a job or its name chose.
            let field = |k: &str| printable(rec[k].as_str().unwrap_or("?")).into_owned();
            println!("job:     {} (run {})", field("job"), field("run_id"));
            println!("status:  {} — {}", field("status"), field("reason"));
            println!(
                "ran:     image {} with {} {} on {} in {:.1} s (attempt {})",
                field("image"),
                field("backend"),
                rec["accel"].as_str().map(printable).unwrap_or_default(),
                field("host_kind"),
                rec["runner_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                rec["attempts"]
            );
            if let Some(console) = &located.console {
                println!("console: {}", console.display());
            }
        }
        None => println!(
            "(no record: {} is not in a run directory)",
            located.job.display()
        ),
    }
    // Listed as read, so a huge listing is never held in memory.
    let mut listed = 0u64;
    let result = archive::list_each(reader()?, &limits, |e| {
        if listed == 0 {
            println!("output:");
        }
        listed += 1;
        println!(
            "  {:>10}  {:o}  {}",
            e.size,
            e.mode & 0o7777,
            printable(&e.path)
        );
    });
    match result {
        Ok(summary) if listed == 0 => {
            println!("output: an empty {} tar", summary.compression.as_str())
        }
        Ok(summary) => println!(
            "  ({} tar, {} entries)",
            summary.compression.as_str(),
            summary.entries
        ),
        Err(e) if listed == 0 => println!("output: none readable ({})", printable(&e.to_string())),
        Err(e) => println!(
            "  (unreadable after {listed} entries: {})",
            printable(&e.to_string())
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_directory_or_its_job_file_finds_the_record_and_console() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("20261201-194012-1a2b3c4d");
        std::fs::create_dir(&run).unwrap();
        for f in [
            "a_t0.tar.xz",
            "record.json",
            "run.json",
            "console.log",
            "backend.log",
        ] {
            std::fs::write(run.join(f), b"{}").unwrap();
        }
        let want = Located {
            job: run.join("a_t0.tar.xz"),
            record: Some(run.join("record.json")),
            console: Some(run.join("console.log")),
        };
        assert_eq!(locate(&run).unwrap(), want);
        assert_eq!(locate(&run.join("a_t0.tar.xz")).unwrap(), want);
        // A directory with two job-like files is not a run.
        std::fs::write(run.join("b_t0.tar.xz"), b"").unwrap();
        assert!(locate(&run).is_err());
        // A job file anywhere: no record.
        let loose = d.path().join("c_t0.tar.xz");
        std::fs::write(&loose, b"").unwrap();
        let l = locate(&loose).unwrap();
        assert_eq!((l.record, l.console), (None, None));
    }

    #[test]
    fn limits_come_from_the_flags() {
        let cli = Cli::parse_from(["construir-result", "job", "--max-output", "1M"]);
        let limits = cli.limits();
        assert_eq!(
            (limits.max_output, limits.max_stream, limits.max_entries),
            (1 << 20, 2 << 20, 1_000_000)
        );
        assert_eq!(cli.max_bytes, 1 << 30);
        let cli = Cli::parse_from([
            "construir-result",
            "job",
            "--max-stream",
            "3G",
            "--max-entries",
            "10",
            "--max-bytes",
            "512",
        ]);
        let limits = cli.limits();
        assert_eq!(
            (limits.max_output, limits.max_stream, limits.max_entries),
            (16 << 30, 3 << 30, 10)
        );
        assert_eq!(cli.max_bytes, 512);
    }
}
