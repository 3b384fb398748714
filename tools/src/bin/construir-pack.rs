//! construir-pack: make a seed-format job (NAME_INDEX.tar.xz) from a directory or a git
//! repository at a commit, with room for the job's output.

use anyhow::{Context, bail};
use clap::Parser;
use construir_abi::manifest::valid_index;
use construir_tools::pack::{archive_from_dir, write_archive};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "construir-pack",
    about = "Make a construir job from a directory or a git repository (its top holds the job script, `construir`)",
    after_help = "Examples:\n  construir-pack --dir examples/hello-c/opt/job --image i0 --output-size 64M\n  \
construir-pack --git ~/src/project --rev v1.2 --image i0 --name project"
)]
struct Cli {
    /// A directory whose contents become /opt/job in the guest (.git is left out).
    #[arg(long, conflicts_with = "git")]
    dir: Option<PathBuf>,
    /// A git repository; its tree at --rev becomes /opt/job (nothing of .git is included).
    #[arg(long)]
    git: Option<PathBuf>,
    /// The commit, tag or branch to pack from --git.
    #[arg(long, default_value = "HEAD")]
    rev: String,
    /// The build image the job runs in.
    #[arg(long, default_value = "i0")]
    image: String,
    /// The job's name (default: the directory's or repository's name).
    #[arg(long)]
    name: Option<String>,
    /// Room for the job's output: the job file is at least this large (64M, 1G, or bytes).
    #[arg(long, default_value = "64M")]
    output_size: String,
    /// Where to write NAME_INDEX.tar.xz.
    #[arg(short, long, default_value = ".")]
    out_dir: PathBuf,
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{text:?} is not a size (examples: 64M, 1G)"))?;
    n.checked_mul(mult).context("size too large")
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("construir-pack: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if !valid_index(&cli.image) {
        bail!("--image {:?} is not an image index (like i0)", cli.image);
    }
    let min_size = parse_size(&cli.output_size)?;
    let (tree, default_name, _tmp) = match (&cli.dir, &cli.git) {
        (Some(dir), None) => (
            dir.clone(),
            dir.canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            None,
        ),
        (None, Some(repo)) => {
            // `git archive` gives exactly the committed tree at the revision, without .git.
            let tmp = tempfile_dir()?;
            let archive = std::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["archive", "--format=tar", &cli.rev])
                .output()
                .context("run git archive")?;
            if !archive.status.success() {
                bail!(
                    "git archive {} failed: {}",
                    cli.rev,
                    String::from_utf8_lossy(&archive.stderr).trim()
                );
            }
            tar::Archive::new(&archive.stdout[..])
                .unpack(&tmp)
                .context("unpack the git tree")?;
            let name = repo
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            (tmp.clone(), name, Some(TempDir(tmp)))
        }
        _ => bail!("give --dir DIR or --git REPO"),
    };
    let name = cli
        .name
        .clone()
        .or(default_name)
        .unwrap_or_else(|| "job".into());
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let archive = archive_from_dir(&tree).with_context(|| format!("pack {}", tree.display()))?;
    let out = cli.out_dir.join(format!("{name}_{}.tar.xz", cli.image));
    let size = write_archive(&out, &archive, min_size)?;
    eprintln!(
        "construir-pack: {} ({} bytes of archive, {} bytes in all: room for {} bytes of output)",
        out.display(),
        archive.len(),
        size,
        size - archive.len() as u64
    );
    println!("{}", out.display());
    Ok(())
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("construir-pack-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
