//! Python: the wheels of the tree's `requirements*.txt` files, each in pip's hash-checking mode
//! (every requirement pinned with `--hash`), fetched for the image's Python with
//! `pip download --only-binary=:all:` (no sdist is built, so no package code runs on the host).
//! In the guest `pip install` finds them with `--no-index --find-links`.

use super::version::Version;
use super::{
    FetchLimits, Fetched, ImageTools, Setup, VendorError, need_tool, run_tool, scratch, tree_bytes,
};
use std::path::{Path, PathBuf};
use std::process::Command;

const WHEELS_DIR: &str = "wheels";

/// The requirement files at the top of `tree`: `requirements.txt`, `requirements-*.txt`,
/// `requirements_*.txt`, sorted.
pub fn requirement_files(tree: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(tree)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("requirements") && n.ends_with(".txt") && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// One requirement line of a lock: its text (continuations joined) and line number.
#[derive(Debug, PartialEq, Eq)]
pub struct Requirement {
    pub line: usize,
    pub text: String,
}

/// The requirements of a requirement file, each of which must carry a `--hash`: a line without
/// one is refused with its number (pip would otherwise fetch it unchecked). Options that point
/// pip elsewhere (`--index-url`, `-e`, `-r`, URLs) are refused too: construir-pack says where
/// packages come from.
pub fn hashed_requirements(text: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        let line = match raw.find(" #") {
            Some(c) => &raw[..c],
            None if raw.trim_start().starts_with('#') => "",
            None => raw,
        };
        if current.is_empty() {
            start = i + 1;
        }
        let (body, continued) = match line.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (line, false),
        };
        current.push_str(body.trim());
        current.push(' ');
        if continued {
            continue;
        }
        let req = current.trim().to_string();
        current.clear();
        if req.is_empty() {
            continue;
        }
        if req.starts_with('-') {
            return Err(format!(
                "line {start}: `{req}`: options are not taken (construir-pack fetches from PyPI, each requirement with its --hash)"
            ));
        }
        if req.contains("://") || req.starts_with('.') || req.starts_with('/') {
            return Err(format!(
                "line {start}: `{req}`: only named requirements from PyPI are fetched, not URLs or paths"
            ));
        }
        // pip expands ${VAR} in requirement files (a host secret into a request) and takes
        // `name @ URL`: neither has a place in a lock of PyPI wheels.
        if req.contains('$') || req.contains('@') {
            return Err(format!(
                "line {start}: `{req}`: `$` and `@` are not taken (a requirement is `name==version --hash=sha256:…`)"
            ));
        }
        if !req.contains("--hash=") {
            return Err(format!(
                "line {start}: `{req}` has no --hash (lock it with `pip-compile --generate-hashes` or `pip hash`)"
            ));
        }
        let name = req.split_whitespace().next().unwrap_or_default();
        if !name.contains("==") {
            return Err(format!(
                "line {start}: `{name}` is not pinned with == (a lock names one version)"
            ));
        }
        out.push(Requirement {
            line: start,
            text: req,
        });
    }
    Ok(out)
}

/// pip's platform tags for a glibc `x86_64` guest: every manylinux up to the image's glibc
/// (trixie: 2.41), older first, and the legacy aliases.
pub fn platforms(glibc_minor: u64) -> Vec<String> {
    let mut p: Vec<String> = (17..=glibc_minor)
        .map(|m| format!("manylinux_2_{m}_x86_64"))
        .collect();
    p.extend(
        [
            "manylinux2014_x86_64",
            "manylinux2010_x86_64",
            "manylinux1_x86_64",
        ]
        .map(String::from),
    );
    p
}

/// Fetches the wheels of every hash-locked requirement file at the top of `tree`.
pub fn vendor(
    tree: &Path,
    deps: &Path,
    limits: &FetchLimits,
    image: &ImageTools,
    setup: &mut Setup,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Fetched>, VendorError> {
    let files = requirement_files(tree);
    if files.is_empty() {
        return Ok(None);
    }
    let python = image.version("python3")?;
    let (major, minor) = (python.0[0], python.0.get(1).copied().unwrap_or(0));
    let glibc = glibc_minor(image);
    need_tool(
        "python3",
        &["-I", "-m", "pip", "--version"],
        "the wheels of requirements.txt",
        "python3-pip",
    )?;
    let work = scratch(deps)?;
    let mut count = 0;
    for file in &files {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = super::read_in_tree(tree, &name)?;
        let reqs = hashed_requirements(&text).map_err(|message| VendorError::Lock {
            lock: name.clone(),
            message,
        })?;
        if reqs.is_empty() {
            continue;
        }
        // Our copy of the lock, so pip reads nothing else of the tree.
        let copy = work.path().join(&name);
        std::fs::write(
            &copy,
            reqs.iter()
                .map(|r| format!("{}\n", r.text))
                .collect::<String>(),
        )
        .map_err(super::io_error("a copy of the lock"))?;
        progress(&format!(
            "python: pip download of {} wheels from {name} for Python {major}.{minor} (each checked against its --hash)",
            reqs.len()
        ));
        let mut cmd = Command::new("python3");
        // -I: neither the working directory nor PYTHON* variables of the host on sys.path.
        cmd.args([
            "-I",
            "-m",
            "pip",
            "download",
            "--isolated",
            "--disable-pip-version-check",
        ])
        .args(["--require-hashes", "--only-binary=:all:", "--no-deps"])
        .args(["--python-version", &format!("{major}.{minor}")])
        .args(["--implementation", "cp"])
        .args([
            "--abi",
            &format!("cp{major}{minor}"),
            "--abi",
            "abi3",
            "--abi",
            "none",
        ]);
        for p in platforms(glibc) {
            cmd.args(["--platform", &p]);
        }
        cmd.arg("--dest")
            .arg(deps.join(WHEELS_DIR))
            .arg("-r")
            .arg(&copy);
        run_tool(&format!("pip download -r {name}"), &mut cmd, work.path(), deps, limits).map_err(|e| {
            match e {
                VendorError::Fetch { what, status, output }
                    if output.contains("No matching distribution")
                        || output.contains("Could not find a version") =>
                {
                    VendorError::Fetch {
                        what,
                        status,
                        output: format!(
                            "{output}\n(a requirement has no wheel for Python {major}.{minor} on Linux x86_64: sdists are not built on the host; pin a version with such a wheel)"
                        ),
                    }
                }
                e => e,
            }
        })?;
        count += reqs.len();
    }
    if count == 0 {
        return Ok(None);
    }
    let dir = format!("{}/{WHEELS_DIR}", super::GUEST_DEPS);
    setup.env.push(("PIP_NO_INDEX".into(), "1".into()));
    setup.env.push(("PIP_FIND_LINKS".into(), dir));
    setup
        .env
        .push(("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()));
    Ok(Some(Fetched {
        kind: "python",
        summary: format!(
            "{count} wheels from {}",
            files
                .iter()
                .map(|f| f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        bytes: tree_bytes(&deps.join(WHEELS_DIR)),
    }))
}

/// The image's glibc minor version, from its `libc6` package (trixie 2.41); 28 if the manifest
/// does not say (wheels for glibc 2.28 and older run on every image we build).
fn glibc_minor(image: &ImageTools) -> u64 {
    image
        .installed
        .iter()
        .find_map(|p| p.strip_prefix("libc6 "))
        .and_then(Version::parse)
        .and_then(|v| v.0.get(1).copied())
        .unwrap_or(28)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_with_hashes_reads_with_continuations_and_comments() {
        let text = "# via pip-compile\n\
                    six==1.16.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n\
                    \n\
                    idna==3.7 --hash=sha256:cc  # via requests\n";
        let reqs = hashed_requirements(text).unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].line, 2);
        assert_eq!(
            reqs[0].text,
            "six==1.16.0 --hash=sha256:aa --hash=sha256:bb"
        );
        assert_eq!(reqs[1].line, 6);
        assert_eq!(reqs[1].text, "idna==3.7 --hash=sha256:cc");
    }

    #[test]
    fn unhashed_unpinned_or_redirected_requirements_are_refused_with_their_line() {
        let e = hashed_requirements("six==1.16.0 --hash=sha256:aa\nrequests==2.0\n").unwrap_err();
        assert!(
            e.starts_with("line 2: `requests==2.0` has no --hash"),
            "{e}"
        );
        let e = hashed_requirements("six>=1 --hash=sha256:aa\n").unwrap_err();
        assert!(e.contains("not pinned with =="), "{e}");
        let e = hashed_requirements("--index-url https://evil.example/simple\n").unwrap_err();
        assert!(e.contains("options are not taken"), "{e}");
        let e = hashed_requirements("https://x.example/a.whl --hash=sha256:aa\n").unwrap_err();
        assert!(e.contains("not URLs or paths"), "{e}");
        assert_eq!(hashed_requirements("# nothing\n\n").unwrap(), vec![]);
        let e = hashed_requirements("${AWS_SECRET_ACCESS_KEY}==1 --hash=sha256:aa\n").unwrap_err();
        assert!(e.contains("are not taken"), "{e}");
        let e = hashed_requirements("six@file:x==1 --hash=sha256:aa\n").unwrap_err();
        assert!(e.contains("are not taken"), "{e}");
    }

    #[test]
    fn platforms_cover_every_manylinux_up_to_the_images_glibc() {
        let p = platforms(41);
        assert_eq!(p.first().map(String::as_str), Some("manylinux_2_17_x86_64"));
        assert!(p.contains(&"manylinux_2_41_x86_64".to_string()));
        assert!(!p.contains(&"manylinux_2_42_x86_64".to_string()));
        assert!(p.contains(&"manylinux2014_x86_64".to_string()));
    }
}
