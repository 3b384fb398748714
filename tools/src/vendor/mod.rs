//! `construir-pack --vendor`: what a build will fetch, fetched on the host before the job is
//! packed, so the VM never needs a network. Each kind of project is found by its lock file at
//! the tree's top and fetched with its own tool, which checks every download against the lock's
//! hash; no dependency code runs on the host (no build scripts, no install scripts, wheels only).
//!
//! Everything lands in one host directory that becomes `/opt/job/deps` in the guest:
//!
//! | kind | found by | fetched with | in the job | the tools told by |
//! |---|---|---|---|---|
//! | Rust | `Cargo.lock` | `cargo vendor --locked` | `deps/cargo/` | `CARGO_HOME/config.toml` |
//! | Python | `requirements*.txt` with hashes | `pip download --require-hashes --only-binary` | `deps/wheels/` | `PIP_NO_INDEX`, `PIP_FIND_LINKS` |
//! | Node | `package-lock.json` | `npm ci --ignore-scripts` into a cache | `deps/npm-cache/` | `npm_config_cache`, `npm_config_offline` |
//! | Debian | `debian/control` | `apt-get build-dep --download-only` | `deps/debs/` | `dpkg -i` before the build |
//! | Go | `go.mod` | nothing: a `vendor/` in the tree | | `GOFLAGS=-mod=vendor` |
//!
//! Go modules without `vendor/` and Maven or Gradle projects are refused plainly: no module
//! proxy or Maven repository is reachable from the hosts construir runs on. `deps/setup.sh` sets
//! the environment and installs the .debs; the job's wrapper sources it before the build script.

pub mod debian;
pub mod go;
pub mod node;
pub mod python;
pub mod rust;
pub mod version;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use version::Version;

/// Where the fetched dependencies are in the guest.
pub const GUEST_DEPS: &str = "/opt/job/deps";
/// The script the job's wrapper sources before the build, relative to the deps directory.
pub const SETUP_SCRIPT: &str = "setup.sh";

/// Why the dependencies could not be vendored.
#[derive(Debug, thiserror::Error)]
pub enum VendorError {
    #[error("{tool} is needed on this host to fetch {what} (Debian package {package})")]
    MissingTool {
        tool: String,
        what: &'static str,
        package: &'static str,
    },
    #[error("{what} failed ({status}):\n{output}")]
    Fetch {
        what: String,
        status: String,
        output: String,
    },
    #[error("{what} was stopped: {why}{}", if .output.is_empty() { String::new() } else { format!("; its last words:\n{}", .output) })]
    Limit {
        what: String,
        why: String,
        output: String,
    },
    #[error("{lock}: {message}")]
    Lock { lock: String, message: String },
    #[error("the image {image} is too old for this project: {}", .needs.join("; "))]
    ToolchainTooOld { image: String, needs: Vec<String> },
    #[error("the image {image} has no {tool} (its manifest's tools: {have})")]
    NoToolchain {
        image: String,
        tool: &'static str,
        have: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("nothing to vendor: no lock file at the top of the tree (looked for {0})")]
    NothingFound(&'static str),
    #[error("{0}")]
    Io(String),
}

pub(crate) fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> VendorError {
    move |e| VendorError::Io(format!("{what}: {e}"))
}

/// What the image offers, from its manifest: the index, its tools' version lines and its
/// installed Debian packages (`name version`), and the dpkg status file `image/build` keeps
/// beside the manifest (`INDEX.dpkg-status`), if there is one.
#[derive(Debug, Clone)]
pub struct ImageTools {
    pub index: String,
    pub tools: BTreeMap<String, String>,
    pub installed: Vec<String>,
    pub dpkg_status: Option<String>,
}

impl ImageTools {
    /// The version of `tool` in the image, or why there is none.
    pub fn version(&self, tool: &'static str) -> Result<Version, VendorError> {
        self.tools
            .get(tool)
            .and_then(|line| Version::in_text(line))
            .ok_or_else(|| VendorError::NoToolchain {
                image: self.index.clone(),
                tool,
                have: if self.tools.is_empty() {
                    "none recorded: an image built before 2026-12, rebuild it".into()
                } else {
                    self.tools.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }
}

/// One kind's share of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// `rust`, `python`, …
    pub kind: &'static str,
    /// What was read and fetched, in a line (`42 crates from Cargo.lock`).
    pub summary: String,
    /// Bytes it added under the deps directory.
    pub bytes: u64,
}

/// What `setup.sh` needs from each kind: environment variables and commands run before the
/// build (in the guest, as root).
#[derive(Debug, Default, Clone)]
pub struct Setup {
    pub env: Vec<(String, String)>,
    pub commands: Vec<String>,
}

/// `deps/setup.sh`: sourced by the job's wrapper (POSIX sh) before the build script.
pub fn setup_script(setup: &Setup) -> String {
    let mut s = String::from(
        "# Written by construir-pack --vendor: what the build needs to find its dependencies in\n\
         # /opt/job/deps instead of a network. Sourced by /opt/job/construir before the build.\n",
    );
    for (k, v) in &setup.env {
        s.push_str(&format!("export {k}='{}'\n", v.replace('\'', r"'\''")));
    }
    for c in &setup.commands {
        s.push_str(c);
        s.push('\n');
    }
    s
}

/// Fetches every kind found at the top of `tree` into `deps` (an empty directory), checked
/// against the image's toolchains, and writes `deps/setup.sh`. `progress` hears each step.
pub fn vendor_all(
    tree: &Path,
    deps: &Path,
    limits: &FetchLimits,
    image: &ImageTools,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Fetched>, VendorError> {
    go::refuse_unfetchable(tree)?;
    let mut setup = Setup::default();
    let mut fetched = Vec::new();
    if let Some(f) = rust::vendor(tree, deps, limits, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = python::vendor(tree, deps, limits, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = node::vendor(tree, deps, limits, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = debian::vendor(tree, deps, limits, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = go::vendor(tree, image, &mut setup)? {
        fetched.push(f);
    }
    if fetched.is_empty() {
        return Err(VendorError::NothingFound(
            "Cargo.lock, requirements*.txt, package-lock.json, debian/control, go.mod",
        ));
    }
    std::fs::write(deps.join(SETUP_SCRIPT), setup_script(&setup)).map_err(io_error(format!(
        "write {}",
        deps.join(SETUP_SCRIPT).display()
    )))?;
    Ok(fetched)
}

/// How long one fetching tool may run, and how much the fetched dependencies may come to, so a
/// registry that stalls or a lock that names far more than anyone meant ends with a clear error
/// instead of a pack that never ends or a job of many gigabytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    pub timeout: Duration,
    pub max_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30 * 60),
            max_bytes: 8 << 30,
        }
    }
}

/// How often a running tool's time and the deps directory's size are looked at.
const WATCH_EVERY: Duration = Duration::from_millis(200);
const MEASURE_EVERY: Duration = Duration::from_secs(2);

/// Runs a fetching tool with no stdin, its output captured (shown when it fails), and stops it
/// (its whole process group) when it outlives `limits.timeout` or `deps` grows past
/// `limits.max_bytes`; `deps` is measured as the tool runs and once more when it is done, so a
/// tool that fills it in one go is caught too.
/// `cwd` is a directory of ours, never the tree: tools read their configuration from the
/// working directory up, and the tree's is not trusted on the host.
pub(crate) fn run_tool(
    what: &str,
    cmd: &mut Command,
    cwd: &Path,
    deps: &Path,
    limits: &FetchLimits,
) -> Result<std::process::Output, VendorError> {
    use std::os::unix::process::CommandExt;
    let program = cmd.get_program().to_string_lossy().into_owned();
    // Output into unnamed files, not pipes: nothing has to read while the tool runs, and a
    // chatty tool cannot block on a full pipe.
    let file = || tempfile::tempfile().map_err(io_error("a file for the tool's output"));
    let (mut stdout, mut stderr) = (file()?, file()?);
    let mut child = cmd
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .stdout(stdout.try_clone().map_err(io_error("the tool's output"))?)
        .stderr(stderr.try_clone().map_err(io_error("the tool's output"))?)
        // A group of its own, so what it starts (apt's download methods, npm's workers) is
        // stopped with it.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VendorError::Io(format!("{what}: {program} is not installed on this host"))
            } else {
                VendorError::Io(format!("{what}: cannot run {program}: {e}"))
            }
        })?;
    let started = Instant::now();
    let mut measured = started;
    let too_big = |bytes: u64| {
        format!(
            "the dependencies came to {} MiB, past the limit of {} MiB",
            bytes >> 20,
            limits.max_bytes >> 20
        )
    };
    let stopped = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(format!("cannot wait for it: {e}")),
        }
        std::thread::sleep(WATCH_EVERY);
        if started.elapsed() > limits.timeout {
            break Err(format!(
                "it was still running after {} s (the limit; a registry that does not answer?)",
                limits.timeout.as_secs()
            ));
        }
        if measured.elapsed() >= MEASURE_EVERY {
            measured = Instant::now();
            let bytes = tree_bytes(deps);
            if bytes > limits.max_bytes {
                break Err(too_big(bytes));
            }
        }
    };
    let read = |f: &mut std::fs::File| {
        use std::io::{Read, Seek};
        let mut bytes = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut bytes))
            .map(|_| bytes)
            .map_err(io_error(format!("read what {what} printed")))
    };
    // The last lines of what it printed, stderr first (where tools say what went wrong).
    let last_lines = |stdout: &[u8], stderr: &[u8]| {
        let mut output = String::from_utf8_lossy(stderr).into_owned();
        output.push_str(&String::from_utf8_lossy(stdout));
        let tail: Vec<&str> = output.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    let status = match stopped {
        Ok(status) => status,
        Err(why) => {
            stop_group(&mut child);
            return Err(VendorError::Limit {
                what: what.to_string(),
                why,
                output: last_lines(&read(&mut stdout)?, &read(&mut stderr)?),
            });
        }
    };
    let out = std::process::Output {
        status,
        stdout: read(&mut stdout)?,
        stderr: read(&mut stderr)?,
    };
    if !out.status.success() {
        return Err(VendorError::Fetch {
            what: what.to_string(),
            status: out.status.to_string(),
            output: last_lines(&out.stdout, &out.stderr),
        });
    }
    let bytes = tree_bytes(deps);
    if bytes > limits.max_bytes {
        return Err(VendorError::Limit {
            what: what.to_string(),
            why: too_big(bytes),
            output: String::new(),
        });
    }
    Ok(out)
}

/// SIGKILL to `child`'s process group (it leads one: `process_group(0)`), then reaps it. Only
/// for a child not yet reaped: until then its pid, and so its group's id, is nobody else's.
/// With `kill(1)`, as std has no call for a group, and this is no reason for `unsafe`.
fn stop_group(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `program` runs here at all (`--version`), for a clear error before a fetch.
pub(crate) fn need_tool(
    program: &str,
    args: &[&str],
    what: &'static str,
    package: &'static str,
) -> Result<(), VendorError> {
    // From `/`: a tool started in the tree (or wherever construir-pack was started) would read
    // its files (`python3 -m` puts the working directory on sys.path; rustup reads
    // rust-toolchain.toml).
    match Command::new(program)
        .args(args)
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        _ => Err(VendorError::MissingTool {
            tool: format!("{program} {}", args.join(" ")),
            what,
            package,
        }),
    }
}

/// The bytes of regular files under `dir`, recursively (symlinks not followed).
pub fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// A scratch directory of ours beside the deps (removed on drop): mode 0700, a fresh random
/// name, so no other local user puts files in it while tools run there.
pub(crate) fn scratch(deps: &Path) -> Result<tempfile::TempDir, VendorError> {
    let parent: PathBuf = deps.parent().unwrap_or(Path::new("/tmp")).to_path_buf();
    private_dir("construir-vendor-", &parent)
}

/// A new private directory (0700) under `parent`.
pub fn private_dir(prefix: &str, parent: &Path) -> Result<tempfile::TempDir, VendorError> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io_error("a scratch directory"))
}

/// Reads `tree/rel` as text, refusing a path any part of which is a symbolic link: a tree's
/// lock file could otherwise point at a file of the host's.
pub(crate) fn read_in_tree(tree: &Path, rel: &str) -> Result<String, VendorError> {
    let mut at = tree.to_path_buf();
    for part in Path::new(rel).components() {
        at.push(part);
        let meta = std::fs::symlink_metadata(&at).map_err(io_error(rel))?;
        if meta.file_type().is_symlink() {
            return Err(VendorError::Unsupported(format!(
                "{rel}: a symbolic link in the tree; construir-pack reads lock files only as regular files"
            )));
        }
    }
    std::fs::read_to_string(&at).map_err(io_error(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_script_quotes_values_and_runs_commands_after_the_environment() {
        let s = setup_script(&Setup {
            env: vec![
                ("CARGO_HOME".into(), "/opt/job/deps/cargo-home".into()),
                ("ODD".into(), "it's".into()),
            ],
            commands: vec!["dpkg -i /opt/job/deps/debs/*.deb".into()],
        });
        assert!(
            s.contains("\nexport CARGO_HOME='/opt/job/deps/cargo-home'\n"),
            "{s}"
        );
        assert!(s.contains("\nexport ODD='it'\\''s'\n"), "{s}");
        assert!(s.find("export ODD").unwrap() < s.find("dpkg -i").unwrap());
    }

    #[test]
    fn lock_files_are_read_only_as_regular_files_of_the_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("debian")).unwrap();
        std::fs::write(d.path().join("debian/control"), "Source: a\n").unwrap();
        assert_eq!(
            read_in_tree(d.path(), "debian/control").unwrap(),
            "Source: a\n"
        );
        std::os::unix::fs::symlink("/etc/hostname", d.path().join("Cargo.lock")).unwrap();
        let e = read_in_tree(d.path(), "Cargo.lock")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a symbolic link"), "{e}");
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("debian")).unwrap();
        std::fs::write(other.path().join("debian/control"), "x").unwrap();
        std::fs::remove_dir_all(d.path().join("debian")).unwrap();
        std::os::unix::fs::symlink(other.path().join("debian"), d.path().join("debian")).unwrap();
        assert!(read_in_tree(d.path(), "debian/control").is_err());
        let s = private_dir("t-", d.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn a_tool_that_outlives_its_time_or_fetches_too_much_is_stopped() {
        let deps = tempfile::tempdir().unwrap();
        let slow = FetchLimits {
            timeout: Duration::from_millis(500),
            max_bytes: 1 << 30,
        };
        let started = Instant::now();
        let e = run_tool(
            "a stalled fetch",
            Command::new("sleep").arg("30"),
            Path::new("/"),
            deps.path(),
            &slow,
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(&e, VendorError::Limit { why, .. } if why.contains("still running after 0 s")),
            "{e}"
        );
        let small = FetchLimits {
            timeout: Duration::from_secs(60),
            max_bytes: 1 << 20,
        };
        let script = format!(
            "head -c 3000000 /dev/zero > {}/big; sleep 30",
            deps.path().display()
        );
        let e = run_tool(
            "a fetch of too much",
            Command::new("sh").args(["-c", &script]),
            Path::new("/"),
            deps.path(),
            &small,
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(20));
        assert!(
            matches!(&e, VendorError::Limit { why, .. } if why.contains("came to 2 MiB, past the limit of 1 MiB")),
            "{e}"
        );
        // One that fills the deps at once and is gone before the first look: looked at after.
        let quick = tempfile::tempdir().unwrap();
        let script = format!("head -c 3000000 /dev/zero > {}/big", quick.path().display());
        let e = run_tool(
            "a quick fetch of too much",
            Command::new("sh").args(["-c", &script]),
            Path::new("/"),
            quick.path(),
            &small,
        )
        .unwrap_err();
        assert!(
            matches!(&e, VendorError::Limit { why, .. } if why.contains("came to 2 MiB")),
            "{e}"
        );
        // Within its limits, a tool's output comes back whole, however much it prints.
        let fine = tempfile::tempdir().unwrap();
        let out = run_tool(
            "a chatty fetch",
            Command::new("sh").args(["-c", "seq 1 200000; echo done >&2"]),
            Path::new("/"),
            fine.path(),
            &small,
        )
        .unwrap();
        assert!(out.stdout.ends_with(b"199999\n200000\n") && out.stderr == b"done\n");
    }

    #[test]
    fn an_image_without_the_tool_says_which_it_has() {
        let image = ImageTools {
            index: "i0".into(),
            tools: [(
                "gcc".to_string(),
                "gcc (Debian 12.2.0-14) 12.2.0".to_string(),
            )]
            .into(),
            installed: vec![],
            dpkg_status: None,
        };
        let e = image.version("rustc").unwrap_err().to_string();
        assert_eq!(e, "the image i0 has no rustc (its manifest's tools: gcc)");
        let old = ImageTools {
            tools: BTreeMap::new(),
            ..image
        };
        assert!(
            old.version("rustc")
                .unwrap_err()
                .to_string()
                .contains("rebuild it")
        );
    }
}
