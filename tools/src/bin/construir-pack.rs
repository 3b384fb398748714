//! construir-pack: make a seed-format job (NAME_INDEX.tar.xz) from a directory or a git
//! repository at a commit, with room for the job's output.

use anyhow::{Context, bail};
use clap::Parser;
use construir_contract::manifest::{Image, default_images_dir, valid_index};
use construir_tools::image_info::describe;
use construir_tools::pack::{
    PackError, archive_from_dir, archive_from_source, parse_size, write_archive,
};
use construir_tools::vendor::{FetchLimits, ImageTools, vendor_all};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "construir-pack",
    about = "Make a construir job from a directory or a git repository: its top holds the job script, `construir`, or --script gives one from outside the tree",
    after_help = "Examples:\n  construir-pack --dir examples/hello-c --image i0 --output-size 64M\n  \
construir-pack --git ~/src/project --rev v1.2 --image i0 --name project\n  \
construir-pack --git ~/src/lua --rev v5.4.7 --script build.sh --image i0\n\n\
With --script, the tree lands at /opt/job/src in the guest and the script (/opt/job/build.sh)\n\
runs there, by its own #! line or else by /bin/sh: the layout the server's submit form makes."
)]
struct Cli {
    /// A directory whose contents become /opt/job in the guest (.git is left out), or
    /// /opt/job/src with --script.
    #[arg(long, conflicts_with = "git")]
    dir: Option<PathBuf>,
    /// A git repository; its tree at --rev becomes /opt/job (nothing of .git is included), or
    /// /opt/job/src with --script.
    #[arg(long)]
    git: Option<PathBuf>,
    /// A build script from outside the tree: the tree needs no `construir` of its own.
    #[arg(long)]
    script: Option<PathBuf>,
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
    /// Print what --image offers (tools with versions, Debian packages, defaults) and pack
    /// nothing.
    #[arg(long, conflicts_with_all = ["dir", "git", "script"])]
    list_tools: bool,
    /// Fetch on this host what the build will need (Rust crates, Python wheels, npm packages,
    /// Debian build dependencies), each checked against the tree's lock file, for the image's
    /// toolchain versions, and pack it with the configuration that makes the tools use it
    /// offline (at /opt/job/deps). The tree lands at /opt/job/src; its own `construir` is the
    /// build script unless --script gives one.
    #[arg(long)]
    vendor: bool,
    /// With --vendor: the longest one fetching tool may run (90s, 30m, 2h).
    #[arg(long, default_value = "30m", value_parser = construir_launcher::duration::parse_duration)]
    vendor_timeout: std::time::Duration,
    /// With --vendor: the most the fetched dependencies may come to (512M, 8G).
    #[arg(long, default_value = "8G", value_parser = parse_size)]
    vendor_max_size: u64,
    /// Where the images are, for --list-tools and --vendor (default: $CONSTRUIR_IMAGES, or the
    /// cache's).
    #[arg(long)]
    images_dir: Option<PathBuf>,
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
    if cli.list_tools {
        let dir = cli.images_dir.clone().unwrap_or_else(default_images_dir);
        let image = Image::load(&dir, &cli.image)?;
        print!("{}", describe(&image.manifest));
        return Ok(());
    }
    let min_size = parse_size(&cli.output_size).map_err(anyhow::Error::msg)?;
    // `_tmp` holds --git's scratch tree until the job is written; dropping it removes the tree.
    let (tree, default_name, _tmp) = match (&cli.dir, &cli.git) {
        (Some(dir), None) => (
            dir.clone(),
            dir.canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            None,
        ),
        (None, Some(repo)) => {
            let tmp = git_tree(repo, &cli.rev)?;
            let name = repo
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            (tmp.path().to_path_buf(), name, Some(tmp))
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
    let what = match (&cli.dir, &cli.git) {
        (Some(dir), _) => dir.display().to_string(),
        (_, Some(repo)) => format!("{} at {}", repo.display(), cli.rev),
        _ => unreachable!("checked above"),
    };
    // With --vendor the tree's own `construir` (if no --script) becomes the build script of a
    // source-tree job, so the wrapper sets up the dependencies first.
    let script = match (&cli.script, cli.vendor) {
        (Some(script), _) => Some(script.clone()),
        (None, true) => {
            let own = tree.join("construir");
            // The tree's own script as a regular file only: a link could point at a file of
            // this host's (its environment, a key) and pack it into the job.
            if std::fs::symlink_metadata(&own).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "{what}'s `construir` is a symbolic link; give the script with --script FILE"
                );
            }
            if !own.is_file() {
                bail!(
                    "{what} has no job script `construir` at its top (give one from outside the tree with --script FILE)"
                );
            }
            Some(own)
        }
        (None, false) => None,
    };
    let deps_dir = if cli.vendor {
        Some(vendor(&cli, &tree, &what)?)
    } else {
        None
    };
    let archive = match &script {
        Some(script) => {
            let text = std::fs::read(script)
                .with_context(|| format!("read the build script {}", script.display()))?;
            if text.iter().all(u8::is_ascii_whitespace) {
                bail!("the build script {} is empty", script.display());
            }
            archive_from_source(&tree, &text, deps_dir.as_ref().map(|d| d.path()))
                .map_err(anyhow::Error::from)
        }
        None => archive_from_dir(&tree).map_err(|e| match e {
            PackError::NoScript => anyhow::anyhow!(
                "{what} has no job script `construir` at its top (give one from outside the tree with --script FILE)"
            ),
            e => e.into(),
        }),
    }
    .with_context(|| format!("pack {what}"))?;
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

/// Fetches the tree's dependencies into a fresh private directory (removed when the returned
/// guard drops), saying what it fetches as it goes and what it fetched in the end.
fn vendor(cli: &Cli, tree: &Path, what: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = cli.images_dir.clone().unwrap_or_else(default_images_dir);
    let image = Image::load(&dir, &cli.image)?;
    let tools = ImageTools {
        index: image.manifest.index.clone(),
        tools: image.manifest.tools.clone(),
        installed: image.manifest.installed.clone(),
        dpkg_status: std::fs::read_to_string(dir.join(format!("{}.dpkg-status", cli.image))).ok(),
    };
    // Private (0700, a fresh random name) like --git's tree: nobody else puts files in it.
    let deps = construir_tools::vendor::private_dir("construir-pack-deps-", &std::env::temp_dir())
        .context("a scratch directory for the dependencies")?;
    let started = std::time::Instant::now();
    let limits = FetchLimits {
        timeout: cli.vendor_timeout,
        max_bytes: cli.vendor_max_size,
    };
    let fetched = vendor_all(tree, deps.path(), &limits, &tools, &mut |step| {
        eprintln!("construir-pack: {step}")
    })
    .with_context(|| format!("vendor the dependencies of {what} for image {}", cli.image))?;
    let mut total = 0;
    for f in &fetched {
        total += f.bytes;
        eprintln!(
            "construir-pack: {}: {} ({:.1} MiB)",
            f.kind,
            f.summary,
            f.bytes as f64 / (1u64 << 20) as f64
        );
    }
    eprintln!(
        "construir-pack: dependencies fetched in {:.0} s: {:.1} MiB at /opt/job/deps",
        started.elapsed().as_secs_f64(),
        total as f64 / (1u64 << 20) as f64
    );
    Ok(deps)
}

/// The committed tree of `repo` at `rev` (no .git), unpacked into a fresh private directory:
/// random name, mode 0700, created with O_EXCL semantics, so no other local user can pre-create
/// it or put files in it while it is packed. Removed when the returned guard drops.
fn git_tree(repo: &Path, rev: &str) -> anyhow::Result<tempfile::TempDir> {
    // A revision like `--output=FILE` would be taken as an option of git archive.
    if rev.starts_with('-') {
        bail!("--rev {rev:?} is not a revision");
    }
    // tempfile leaves a directory's mode to the umask: 0700 is asked for explicitly.
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::Builder::new()
        .prefix("construir-pack-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("create a private scratch directory")?;
    // `git archive` gives exactly the committed tree at the revision, without .git.
    let archive = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", rev])
        .output()
        .context("run git archive")?;
    if !archive.status.success() {
        bail!(
            "git archive {rev} failed: {}",
            String::from_utf8_lossy(&archive.stderr).trim()
        );
    }
    tar::Archive::new(&archive.stdout[..])
        .unpack(tmp.path())
        .context("unpack the git tree")?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    #[test]
    fn the_git_tree_goes_to_a_private_fresh_directory_not_a_predictable_one() {
        let repo = tempfile::tempdir().unwrap();
        git(repo.path(), &["init", "-q"]);
        std::fs::write(repo.path().join("construir"), "#!/bin/sh\ntrue\n").unwrap();
        git(repo.path(), &["add", "construir"]);
        git(repo.path(), &["commit", "-q", "-m", "job"]);
        // Another user's trap at the name the old code used.
        let predictable =
            std::env::temp_dir().join(format!("construir-pack-{}", std::process::id()));
        std::fs::create_dir_all(&predictable).unwrap();
        std::fs::write(predictable.join("planted"), "x").unwrap();
        let tree = git_tree(repo.path(), "HEAD");
        let _ = std::fs::remove_dir_all(&predictable);
        let tree = tree.unwrap();
        let path = tree.path().to_path_buf();
        assert_ne!(path, predictable);
        assert!(path.join("construir").is_file() && !path.join("planted").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "only its owner may enter: {mode:o}");
        drop(tree);
        assert!(!path.exists(), "removed afterwards");
        assert!(git_tree(repo.path(), "--output=/tmp/x").is_err());
    }
}
