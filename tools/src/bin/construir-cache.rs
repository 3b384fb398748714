//! construir-cache: look after the cache of raw root-disk bases the launchers share.

use clap::{Parser, Subcommand};
use construir_contract::manifest::{cache_dir, default_images_dir};
use construir_contract::outcome::EXIT_SETUP_ERROR;
use construir_launcher as launcher;
use construir_rawbase::prune::{self, KEEP_ENV, Verdict};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "construir-cache",
    about = "Look after the cache of raw root-disk bases that construir-vmm and construir-qemu share",
    after_help = "Each image's qcow2 is converted once into <cache>/raw/<disk_sha256>.raw. A rebuilt image \
leaves its old base behind; a launcher that makes a new base prunes the cache, and so does this command.\n\n\
Exit status: 0 done; 105 bad arguments, or the cache or images directory cannot be read."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Remove the bases that no manifest in the images directory names and that were last used
    /// longer ago than --keep, and the leftovers of dead conversions. A base a launcher is
    /// opening or running on is never removed (it holds a lock on it); nothing unnamed is
    /// removed while a manifest cannot be read.
    Prune {
        /// The manifests that say which bases are needed (default: $CONSTRUIR_IMAGES or
        /// ~/.cache/construir/images).
        #[arg(long)]
        images_dir: Option<PathBuf>,
        /// The raw-base cache (default: $CONSTRUIR_CACHE/raw or ~/.cache/construir/raw).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Keep unnamed bases used less than this long ago: 0 (none), 90s, 30m, 12h, 3d
        /// (default: $CONSTRUIR_RAW_CACHE_KEEP, else 3d).
        #[arg(long, value_parser = prune::parse_keep)]
        keep: Option<Duration>,
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() {
    launcher::init_logging();
    let cli: Cli = launcher::parse_args();
    let code = match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("construir-cache: error: {e:#}");
            i32::from(EXIT_SETUP_ERROR)
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Prune {
            images_dir,
            cache_dir: cache,
            keep,
            dry_run,
        } => {
            let images = images_dir.unwrap_or_else(default_images_dir);
            let cache = cache.unwrap_or_else(|| cache_dir().join("raw"));
            let keep = match keep {
                Some(keep) => keep,
                None => match std::env::var(KEEP_ENV) {
                    Ok(text) => {
                        prune::parse_keep(&text).map_err(|e| anyhow::anyhow!("{KEEP_ENV}: {e}"))?
                    }
                    Err(_) => prune::DEFAULT_KEEP,
                },
            };
            // A wrong images directory would make every base look unnamed.
            anyhow::ensure!(
                images.is_dir(),
                "the images directory {} does not exist (--images-dir)",
                images.display()
            );
            let report = prune::prune(&cache, &images, keep, dry_run).map_err(|e| {
                anyhow::anyhow!(
                    "cannot prune {} (manifests in {}): {e}",
                    cache.display(),
                    images.display()
                )
            })?;
            for f in &report.files {
                let what = match (&f.verdict, f.removed, dry_run) {
                    (Verdict::Remove(_), true, _) => "removed",
                    (Verdict::Remove(_), false, true) => "would remove",
                    (Verdict::Remove(_), false, false) => "changed meanwhile, kept",
                    (Verdict::Keep(_), _, _) => "kept",
                };
                println!(
                    "{what:<12} {:>8.1} MiB  {}  ({})",
                    f.entry.size as f64 / f64::from(1 << 20),
                    f.entry.name,
                    f.verdict
                );
            }
            let would: u64 = report
                .files
                .iter()
                .filter(|f| matches!(f.verdict, Verdict::Remove(_)))
                .map(|f| f.entry.size)
                .sum();
            println!(
                "{}: {:.1} MiB {} in {}",
                if dry_run { "dry run" } else { "pruned" },
                (if dry_run { would } else { report.freed() }) as f64 / f64::from(1 << 20),
                if dry_run { "would be freed" } else { "freed" },
                cache.display()
            );
            Ok(())
        }
    }
}
