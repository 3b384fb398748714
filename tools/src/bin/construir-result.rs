//! construir-result: what a finished job wrote back to its disk, with its record and console log.

use anyhow::Context;
use clap::Parser;
use construir_abi::archive;
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "construir-result",
    about = "Show or extract what a finished construir job wrote to its disk",
    after_help = "Examples:\n  construir-result done/hello_i0.tar.xz                 # record, log, and the files\n  \
construir-result done/hello_i0.tar.xz --cat build.log\n  construir-result done/hello_i0.tar.xz --extract out/"
)]
struct Cli {
    /// The job file (in done/ or failed/ of a runner directory, or any job file a launcher ran).
    job: PathBuf,
    /// Extract the output into this directory.
    #[arg(long)]
    extract: Option<PathBuf>,
    /// Print one output file to stdout.
    #[arg(long)]
    cat: Option<String>,
    /// Largest file --cat prints.
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: u64,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("construir-result: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let open =
        || std::fs::File::open(&cli.job).with_context(|| format!("open {}", cli.job.display()));
    let reader = || open().map(std::io::BufReader::new);
    if let Some(path) = &cli.cat {
        let data = archive::read_file(reader()?, path, cli.max_bytes)?
            .with_context(|| format!("the job's output has no {path}"))?;
        std::io::stdout().write_all(&data)?;
        return Ok(());
    }
    if let Some(dir) = &cli.extract {
        std::fs::create_dir_all(dir)?;
        let summary = archive::unpack(reader()?, dir)?;
        eprintln!(
            "extracted {} entries ({} bytes) into {}",
            summary.entries,
            summary.bytes,
            dir.display()
        );
        return Ok(());
    }
    let record = cli.job.with_file_name(format!(
        "{}.json",
        cli.job.file_name().unwrap_or_default().to_string_lossy()
    ));
    match std::fs::read_to_string(&record) {
        Ok(text) => {
            let rec: serde_json::Value =
                serde_json::from_str(&text).context("the record is not JSON")?;
            println!(
                "status:  {} — {}",
                rec["status"].as_str().unwrap_or("?"),
                rec["reason"].as_str().unwrap_or("")
            );
            println!(
                "ran:     image {} with {} {} on {} in {:.1} s (attempt {})",
                rec["image"].as_str().unwrap_or("?"),
                rec["backend"].as_str().unwrap_or("?"),
                rec["accel"].as_str().unwrap_or(""),
                rec["host_kind"].as_str().unwrap_or("?"),
                rec["runner_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                rec["attempts"]
            );
            if let Some(log) = rec["console_log"].as_str() {
                let root = cli
                    .job
                    .parent()
                    .and_then(|p| p.parent())
                    .unwrap_or(std::path::Path::new("."));
                println!("console: {}", root.join(log).display());
            }
        }
        Err(_) => println!("(no record next to the job file: {})", record.display()),
    }
    match archive::list(reader()?) {
        Ok((compression, entries)) => {
            println!(
                "output ({} tar, {} entries):",
                compression.as_str(),
                entries.len()
            );
            for e in entries {
                println!("  {:>10}  {:o}  {}", e.size, e.mode & 0o7777, e.path);
            }
        }
        Err(e) => println!("output: none readable ({e})"),
    }
    Ok(())
}
