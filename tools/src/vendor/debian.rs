//! Debian build dependencies: `apt-get build-dep --download-only` of the tree's `debian/control`,
//! resolved against the image's release (from deb.debian.org, each .deb checked against the
//! release's signed index) with the image's own package list as what is installed, so only
//! what the image lacks is fetched. The guest installs them with `dpkg -i` before the build.

use super::version::Version;
use super::{
    FetchLimits, Fetched, ImageTools, Setup, VendorError, io_error, need_tool, run_tool, scratch,
    tree_bytes,
};
use std::path::Path;
use std::process::Command;

const DEBS_DIR: &str = "debs";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The Debian release of a `debian_version` line (`13.2` → trixie).
pub fn codename(debian_version: &str) -> Option<&'static str> {
    let v = Version::in_text(debian_version).or_else(|| Version::parse(debian_version))?;
    Some(match v.0[0] {
        11 => "bullseye",
        12 => "bookworm",
        13 => "trixie",
        14 => "forky",
        _ => return None,
    })
}

/// A dpkg status file that says the image's packages (`name version`) are installed, for apt's
/// resolver: what the image has is not fetched again.
pub fn status_file(installed: &[String]) -> String {
    let mut s = String::new();
    for line in installed {
        if line.chars().any(char::is_control) {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(version)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.:".contains(c))
            || !version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:~".contains(c))
        {
            continue;
        }
        let name = name.split(':').next().unwrap_or(name);
        s.push_str(&format!(
            "Package: {name}\nStatus: install ok installed\nArchitecture: amd64\nMulti-Arch: foreign\nVersion: {version}\nDescription: in the image\n\n"
        ));
    }
    s
}

/// The `Build-Depends` fields of a `debian/control` (its source stanza), for the report.
pub fn build_depends(control: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_field = false;
    for line in control.lines() {
        if line.trim().is_empty() {
            break; // the source stanza ends at the first blank line
        }
        if line.starts_with('#') {
            continue; // deb822 comments
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if in_field {
                out.extend(split_deps(line));
            }
            continue;
        }
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        in_field = matches!(
            key.trim(),
            "Build-Depends" | "Build-Depends-Indep" | "Build-Depends-Arch"
        );
        if in_field {
            out.extend(split_deps(value));
        }
    }
    out
}

fn split_deps(text: &str) -> Vec<String> {
    text.split(',')
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty() && !d.starts_with('#'))
        .collect()
}

/// Fetches the build dependencies of `tree/debian/control` that the image lacks.
pub fn vendor(
    tree: &Path,
    deps: &Path,
    limits: &FetchLimits,
    image: &ImageTools,
    setup: &mut Setup,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Fetched>, VendorError> {
    let control_path = tree.join("debian/control");
    if !control_path.is_file() {
        return Ok(None);
    }
    let control = super::read_in_tree(tree, "debian/control")?;
    let wanted = build_depends(&control);
    let release = image
        .version("debian")
        .ok()
        .and_then(|v| codename(&v.to_string()))
        .ok_or_else(|| VendorError::NoToolchain {
            image: image.index.clone(),
            tool: "debian",
            have: "no Debian release recorded in its manifest".into(),
        })?;
    need_tool(
        "apt-get",
        &["--version"],
        "Debian build dependencies",
        "apt",
    )?;
    let work = scratch(deps)?;
    let w = work.path();
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "etc/apt.conf.d",
        "etc/preferences.d",
        "etc/sources.list.d",
    ] {
        std::fs::create_dir_all(w.join(d)).map_err(io_error("apt's scratch directories"))?;
    }
    let archives = deps.join(DEBS_DIR);
    std::fs::create_dir_all(archives.join("partial")).map_err(io_error("the .deb directory"))?;
    std::fs::write(
        w.join("etc/sources.list"),
        format!(
            "deb {MIRROR} {release} main\ndeb {MIRROR} {release}-updates main\ndeb {MIRROR}-security {release}-security main\n"
        ),
    )
    .map_err(io_error("apt's sources"))?;
    let status = match &image.dpkg_status {
        Some(s) => s.clone(),
        None => {
            progress(&format!(
                "debian: the image {} has no INDEX.dpkg-status beside its manifest: resolving against its package list (packages it has may be fetched again)",
                image.index
            ));
            status_file(&image.installed)
        }
    };
    std::fs::write(w.join("status"), status).map_err(io_error("the image's package list"))?;
    // Only our control file, copied, is read: debian/ alone, so apt sees nothing else.
    let source = w.join("source");
    std::fs::create_dir_all(source.join("debian")).map_err(io_error("a copy of debian/"))?;
    std::fs::write(source.join("debian/control"), &control).map_err(io_error("debian/control"))?;
    let dir = |k: &str, v: &Path| format!("{k}={}", v.display());
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .env_remove("APT_CONFIG")
            .args([
                "-q",
                "-o",
                "Debug::NoLocking=1",
                "-o",
                "APT::Sandbox::User=root",
            ])
            .args([
                "-o",
                "APT::Architecture=amd64",
                "-o",
                "APT::Architectures::=amd64",
            ])
            .args(["-o", "APT::Install-Recommends=false"])
            .args(["-o", &dir("Dir::Etc", &w.join("etc"))])
            .args([
                "-o",
                &dir("Dir::Etc::SourceList", &w.join("etc/sources.list")),
            ])
            .args([
                "-o",
                &dir("Dir::Etc::SourceParts", &w.join("etc/sources.list.d")),
            ])
            .args(["-o", &dir("Dir::Etc::Parts", &w.join("etc/apt.conf.d"))])
            .args([
                "-o",
                &dir("Dir::Etc::PreferencesParts", &w.join("etc/preferences.d")),
            ])
            // The host's keyring verifies the release's signature.
            .args(["-o", "Dir::Etc::Trusted=/etc/apt/trusted.gpg"])
            .args(["-o", "Dir::Etc::TrustedParts=/etc/apt/trusted.gpg.d"])
            .args(["-o", &dir("Dir::State", w)])
            .args(["-o", &dir("Dir::State::Lists", &w.join("lists"))])
            .args(["-o", &dir("Dir::State::status", &w.join("status"))])
            .args(["-o", &dir("Dir::Cache", &w.join("cache"))])
            .args(["-o", &dir("Dir::Cache::archives", &archives)])
            .args(args);
        c
    };
    progress(&format!(
        "debian: apt-get update for {release} (what the image {} is built from)",
        image.index
    ));
    run_tool("apt-get update", &mut apt(&["update"]), w, deps, limits)?;
    progress(&format!(
        "debian: apt-get build-dep --download-only of {} build dependencies from debian/control",
        wanted.len()
    ));
    let src_arg = format!("{}/", source.display());
    run_tool(
        "apt-get build-dep --download-only",
        &mut apt(&["build-dep", "-y", "--download-only", &src_arg]),
        w,
        deps,
        limits,
    )?;
    let _ = std::fs::remove_dir_all(archives.join("partial"));
    let _ = std::fs::remove_file(archives.join("lock"));
    let mut debs: Vec<String> = std::fs::read_dir(&archives)
        .map_err(io_error("the .deb directory"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".deb"))
        .collect();
    debs.sort();
    if debs.is_empty() {
        let _ = std::fs::remove_dir_all(&archives);
        return Ok(Some(Fetched {
            kind: "debian",
            summary: format!(
                "the image has all {} build dependencies of debian/control",
                wanted.len()
            ),
            bytes: 0,
        }));
    }
    setup.commands.push(format!(
        "echo 'construir: installing {} Debian packages from {}/{DEBS_DIR}' >&2\n\
         dpkg -i {}/{DEBS_DIR}/*.deb >/dev/null",
        debs.len(),
        super::GUEST_DEPS,
        super::GUEST_DEPS
    ));
    Ok(Some(Fetched {
        kind: "debian",
        summary: format!(
            "{} .deb files for {} build dependencies of debian/control ({release})",
            debs.len(),
            wanted.len()
        ),
        bytes: tree_bytes(&archives),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_by_debian_version() {
        assert_eq!(codename("13.2"), Some("trixie"));
        assert_eq!(codename("12.12"), Some("bookworm"));
        assert_eq!(codename("trixie/sid"), None);
    }

    #[test]
    fn the_status_file_lists_the_images_packages_as_installed() {
        let s = status_file(&[
            "zlib1g 1:1.3.dfsg+really1.3.1-1+b1".into(),
            "libc6:amd64 2.41-12".into(),
            "bad\nPackage: evil 1".into(),
            "lonely".into(),
        ]);
        assert!(
            s.contains("Package: zlib1g\nStatus: install ok installed\n"),
            "{s}"
        );
        assert!(s.contains("Version: 1:1.3.dfsg+really1.3.1-1+b1\n"), "{s}");
        assert!(s.contains("Package: libc6\n"), "{s}");
        assert!(!s.contains("evil"), "{s}");
        assert_eq!(s.matches("Package:").count(), 2);
    }

    #[test]
    fn build_depends_come_from_the_source_stanza_over_lines() {
        let control = "Source: hello\nSection: devel\nBuild-Depends: debhelper-compat (= 13),\n libfoo-dev (>= 1.2) | libbar-dev,\n# a comment\n pkgconf\nBuild-Depends-Indep: help2man\nStandards-Version: 4.6\n\nPackage: hello\nBuild-Depends: not-this\n";
        assert_eq!(
            build_depends(control),
            vec![
                "debhelper-compat (= 13)",
                "libfoo-dev (>= 1.2) | libbar-dev",
                "pkgconf",
                "help2man"
            ]
        );
    }
}
