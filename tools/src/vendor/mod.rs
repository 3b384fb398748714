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
    image: &ImageTools,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Fetched>, VendorError> {
    go::refuse_unfetchable(tree)?;
    let mut setup = Setup::default();
    let mut fetched = Vec::new();
    if let Some(f) = rust::vendor(tree, deps, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = python::vendor(tree, deps, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = node::vendor(tree, deps, image, &mut setup, progress)? {
        fetched.push(f);
    }
    if let Some(f) = debian::vendor(tree, deps, image, &mut setup, progress)? {
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

/// Runs a fetching tool with no stdin, its output captured (shown whole when it fails).
/// `cwd` is a directory of ours, never the tree: tools read their configuration from the
/// working directory up, and the tree's is not trusted on the host.
pub(crate) fn run_tool(
    what: &str,
    cmd: &mut Command,
    cwd: &Path,
) -> Result<std::process::Output, VendorError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VendorError::Io(format!("{what}: {program} is not installed on this host"))
            } else {
                VendorError::Io(format!("{what}: cannot run {program}: {e}"))
            }
        })?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stdout));
        let tail: Vec<&str> = output.lines().rev().take(40).collect();
        return Err(VendorError::Fetch {
            what: what.to_string(),
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(out)
}

/// Whether `program` runs here at all (`--version`), for a clear error before a fetch.
pub(crate) fn need_tool(
    program: &str,
    args: &[&str],
    what: &'static str,
    package: &'static str,
) -> Result<(), VendorError> {
    match Command::new(program)
        .args(args)
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

/// A scratch directory of ours beside the deps (removed on drop).
pub(crate) fn scratch(deps: &Path) -> Result<tempfile::TempDir, VendorError> {
    let parent: PathBuf = deps.parent().unwrap_or(Path::new("/tmp")).to_path_buf();
    tempfile::Builder::new()
        .prefix("construir-vendor-")
        .tempdir_in(parent)
        .map_err(io_error("a scratch directory"))
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
