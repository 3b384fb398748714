//! Rust: `cargo vendor --locked` of the tree's `Cargo.lock` (cargo checks each crate against
//! the lock's checksum and runs no build script), and a `config.toml` in a `CARGO_HOME` of the
//! job's own that replaces crates.io with the vendored directory, offline.

use super::version::Version;
use super::{
    FetchLimits, Fetched, ImageTools, Setup, VendorError, io_error, need_tool, run_tool, tree_bytes,
};
use std::path::Path;
use std::process::Command;

const VENDOR_DIR: &str = "cargo";
const HOME_DIR: &str = "cargo-home";

/// Vendors the crates of `tree/Cargo.lock` into `deps/cargo`, if there is one.
pub fn vendor(
    tree: &Path,
    deps: &Path,
    limits: &FetchLimits,
    image: &ImageTools,
    setup: &mut Setup,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Fetched>, VendorError> {
    if !tree.join("Cargo.lock").is_file() {
        return Ok(None);
    }
    let rustc = image.version("rustc")?;
    let lock = super::read_in_tree(tree, "Cargo.lock")?;
    crates_io_only(&lock).map_err(|message| VendorError::Lock {
        lock: "Cargo.lock".into(),
        message,
    })?;
    let root = super::read_in_tree(tree, "Cargo.toml")?;
    need_tool("cargo", &["--version"], "the crates of Cargo.lock", "cargo")?;
    let manifest =
        std::path::absolute(tree.join("Cargo.toml")).map_err(io_error("the tree's Cargo.toml"))?;
    let vendor_dir =
        std::path::absolute(deps.join(VENDOR_DIR)).map_err(io_error("the deps directory"))?;
    progress("rust: cargo vendor --locked (crates.io, each crate checked against Cargo.lock)");
    // Started in `/`: cargo and rustup read configuration (.cargo/config.toml,
    // rust-toolchain.toml) from the working directory up, never from the manifest's.
    let out = run_tool(
        "cargo vendor --locked",
        Command::new("cargo")
            .arg("vendor")
            .arg("--locked")
            .arg("--versioned-dirs")
            .arg("--manifest-path")
            .arg(&manifest)
            .arg(&vendor_dir)
            // The host's own settings for where crates come from are not the job's, and no
            // credential of the user's is offered to anything.
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("SSH_AUTH_SOCK")
            .env("GIT_TERMINAL_PROMPT", "0"),
        Path::new("/"),
        deps,
        limits,
    )?;
    let printed = String::from_utf8_lossy(&out.stdout);
    let config = job_config(&printed, &format!("{}/{VENDOR_DIR}", super::GUEST_DEPS))?;
    std::fs::create_dir_all(deps.join(HOME_DIR)).map_err(io_error("the job's CARGO_HOME"))?;
    std::fs::write(deps.join(HOME_DIR).join("config.toml"), config)
        .map_err(io_error("the job's cargo config"))?;

    let mut needs = Vec::new();
    if let Some(need) = needed_rustc(&root)
        && !rustc.at_least(&need.version)
    {
        needs.push(format!(
            "the project needs rustc {} ({})",
            need.version, need.why
        ));
    }
    let mut crates = 0;
    let mut entries: Vec<_> = std::fs::read_dir(deps.join(VENDOR_DIR))
        .map_err(io_error("the vendored crates"))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Ok(text) = std::fs::read_to_string(e.path().join("Cargo.toml")) else {
            continue;
        };
        crates += 1;
        if let Some(need) = needed_rustc(&text)
            && !rustc.at_least(&need.version)
        {
            needs.push(format!(
                "{} needs rustc {} ({})",
                e.file_name().to_string_lossy(),
                need.version,
                need.why
            ));
        }
    }
    if !needs.is_empty() {
        let total = needs.len();
        needs.truncate(10);
        if total > 10 {
            needs.push(format!("and {} more", total - 10));
        }
        needs.push(format!(
            "the image has rustc {rustc}: pin older versions in Cargo.lock (cargo update --precise), or use a newer image"
        ));
        return Err(VendorError::ToolchainTooOld {
            image: image.index.clone(),
            needs,
        });
    }
    setup.env.push((
        "CARGO_HOME".into(),
        format!("{}/{HOME_DIR}", super::GUEST_DEPS),
    ));
    setup.env.push(("CARGO_NET_OFFLINE".into(), "true".into()));
    Ok(Some(Fetched {
        kind: "rust",
        summary: format!("{crates} crates from Cargo.lock"),
        bytes: tree_bytes(&deps.join(VENDOR_DIR)),
    }))
}

/// The sources crates.io is known by in a lock (the git index, and the sparse one).
const CRATES_IO: [&str; 2] = [
    "registry+https://github.com/rust-lang/crates.io-index",
    "sparse+https://index.crates.io/",
];

/// Every package of a `Cargo.lock` is the tree's own (no source) or from crates.io with a
/// checksum: a git or other-registry source would be fetched on the host with the user's
/// credentials (and has no checksum cargo could check).
pub fn crates_io_only(lock: &str) -> Result<(), String> {
    let table: toml::Table = lock.parse().map_err(|e| format!("not TOML: {e}"))?;
    let packages = table
        .get("package")
        .and_then(|p| p.as_array())
        .ok_or("no [[package]] in it")?;
    for p in packages {
        let name = p.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        let version = p.get("version").and_then(|n| n.as_str()).unwrap_or("?");
        let Some(source) = p.get("source") else {
            continue;
        };
        let source = source.as_str().unwrap_or_default();
        if !CRATES_IO.contains(&source) {
            return Err(format!(
                "{name} {version} comes from {source:?}: only crates.io is fetched (a git or other registry's source has no checksum to check)"
            ));
        }
        if p.get("checksum").and_then(|c| c.as_str()).is_none() {
            return Err(format!("{name} {version} has no checksum"));
        }
    }
    Ok(())
}

/// The configuration `cargo vendor` printed, with its directory made the guest's path and
/// the network turned off. Sources other than crates.io (git dependencies) keep their
/// replacement entries as cargo printed them.
pub fn job_config(printed: &str, guest_dir: &str) -> Result<String, VendorError> {
    let mut table: toml::Table = printed.parse().map_err(|e| VendorError::Lock {
        lock: "cargo vendor's printed configuration".into(),
        message: format!("not TOML: {e}"),
    })?;
    let sources = table
        .get_mut("source")
        .and_then(|s| s.as_table_mut())
        .ok_or_else(|| VendorError::Lock {
            lock: "cargo vendor's printed configuration".into(),
            message: "no [source] replacement in it".into(),
        })?;
    let mut replaced = false;
    for (_, source) in sources.iter_mut() {
        if let Some(dir) = source.get_mut("directory") {
            *dir = toml::Value::String(guest_dir.to_string());
            replaced = true;
        }
    }
    if !replaced {
        return Err(VendorError::Lock {
            lock: "cargo vendor's printed configuration".into(),
            message: "no vendored directory in it".into(),
        });
    }
    let mut net = toml::Table::new();
    net.insert("offline".into(), toml::Value::Boolean(true));
    table.insert("net".into(), toml::Value::Table(net));
    Ok(format!(
        "# Written by construir-pack --vendor: crates come from {guest_dir}, never a network.\n{}",
        toml::to_string(&table).expect("a table serialises")
    ))
}

/// The rustc a package asks for, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Need {
    pub version: Version,
    pub why: String,
}

/// What a `Cargo.toml` needs of rustc: its `rust-version`, else what its edition needs.
/// `None` for a manifest with neither (or that is not TOML: cargo itself says so then).
pub fn needed_rustc(cargo_toml: &str) -> Option<Need> {
    let table: toml::Table = cargo_toml.parse().ok()?;
    // A workspace's root may have no [package] and say it for all in [workspace.package].
    let shared = table
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.as_table());
    let package = table.get("package").and_then(|p| p.as_table());
    let field = |name: &str| {
        package
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_str())
            .or_else(|| shared.and_then(|p| p.get(name)).and_then(|v| v.as_str()))
    };
    if let Some(v) = field("rust-version").and_then(Version::parse) {
        return Some(Need {
            version: v,
            why: "its rust-version".into(),
        });
    }
    let edition = field("edition")?;
    let first = match edition {
        "2018" => "1.31",
        "2021" => "1.56",
        "2024" => "1.85",
        _ => return None,
    };
    Some(Need {
        version: Version::parse(first).expect("a version"),
        why: format!("edition {edition}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_config_points_at_the_guests_directory_offline() {
        let printed = "\n[source.crates-io]\nreplace-with = \"vendored-sources\"\n\n\
                       [source.\"git+https://example.org/x\"]\ngit = \"https://example.org/x\"\n\
                       replace-with = \"vendored-sources\"\n\n\
                       [source.vendored-sources]\ndirectory = \"cargo\"\n";
        let c = job_config(printed, "/opt/job/deps/cargo").unwrap();
        let t: toml::Table = c.parse().unwrap();
        assert_eq!(
            t["source"]["vendored-sources"]["directory"].as_str(),
            Some("/opt/job/deps/cargo")
        );
        assert_eq!(
            t["source"]["crates-io"]["replace-with"].as_str(),
            Some("vendored-sources")
        );
        assert_eq!(
            t["source"]["git+https://example.org/x"]["git"].as_str(),
            Some("https://example.org/x")
        );
        assert_eq!(t["net"]["offline"].as_bool(), Some(true));
        assert!(job_config("[net]\noffline = true\n", "/x").is_err());
        assert!(job_config("not toml [", "/x").is_err());
    }

    #[test]
    fn a_lock_may_name_crates_io_and_the_trees_own_packages_only() {
        let ok = "version = 4\n[[package]]\nname = \"a\"\nversion = \"0.1.0\"\n\n\
                  [[package]]\nname = \"itoa\"\nversion = \"1.0.11\"\n\
                  source = \"registry+https://github.com/rust-lang/crates.io-index\"\nchecksum = \"49f1\"\n";
        assert_eq!(crates_io_only(ok), Ok(()));
        let git = "[[package]]\nname = \"p\"\nversion = \"1.0.0\"\n\
                   source = \"git+ssh://git@example.org/private#abc\"\n";
        let e = crates_io_only(git).unwrap_err();
        assert!(e.contains("only crates.io is fetched"), "{e}");
        let other = "[[package]]\nname = \"p\"\nversion = \"1.0.0\"\n\
                     source = \"sparse+https://intranet.example/index/\"\nchecksum = \"aa\"\n";
        assert!(crates_io_only(other).is_err());
        let unsummed = "[[package]]\nname = \"p\"\nversion = \"1.0.0\"\n\
                        source = \"registry+https://github.com/rust-lang/crates.io-index\"\n";
        assert!(
            crates_io_only(unsummed)
                .unwrap_err()
                .contains("no checksum")
        );
        assert!(crates_io_only("x = [").is_err());
    }

    #[test]
    fn rust_version_wins_over_the_edition() {
        let n =
            needed_rustc("[package]\nname = \"a\"\nrust-version = \"1.88\"\nedition = \"2021\"\n")
                .unwrap();
        assert_eq!(n.version.to_string(), "1.88");
        assert_eq!(n.why, "its rust-version");
        let n = needed_rustc("[package]\nname = \"a\"\nedition = \"2024\"\n").unwrap();
        assert_eq!(n.version.to_string(), "1.85");
        assert_eq!(n.why, "edition 2024");
        assert_eq!(needed_rustc("[package]\nname = \"a\"\n"), None);
        // A workspace-inherited version is the workspace's business, not a number here.
        assert_eq!(
            needed_rustc("[package]\nname = \"a\"\nrust-version.workspace = true\n"),
            None
        );
        assert_eq!(needed_rustc("[workspace]\nmembers = []\n"), None);
        let n = needed_rustc(
            "[workspace]\nmembers = []\n[workspace.package]\nrust-version = \"1.90\"\n",
        )
        .unwrap();
        assert_eq!(n.version.to_string(), "1.90");
    }
}
