//! What an image offers a job, as `construir-pack --list-tools` prints it: so a submitter knows
//! which toolchains and versions are there before packing.

use construir_contract::manifest::ImageManifest;
use std::fmt::Write;

/// The image's description, defaults, tools with versions and Debian packages, as text.
/// Every line of the manifest's own text is stripped of control characters: an image can come
/// from elsewhere, and this goes to a terminal.
pub fn describe(m: &ImageManifest) -> String {
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).collect() };
    let mut out = String::new();
    let _ = writeln!(out, "image {}: {}", clean(&m.index), clean(&m.description));
    let _ = writeln!(
        out,
        "defaults: {} MiB of memory, {} vCPUs; root disk {} MiB",
        m.memory_mib,
        m.vcpus,
        m.virtual_size >> 20
    );
    if m.tools.is_empty() {
        let _ = writeln!(
            out,
            "tools: not recorded (an image built before 2026-12; see its packages)"
        );
    } else {
        let _ = writeln!(out, "tools:");
        let width = m.tools.keys().map(|k| k.chars().count()).max().unwrap_or(0);
        for (name, version) in &m.tools {
            let _ = writeln!(out, "  {:width$}  {}", clean(name), clean(version));
        }
    }
    let _ = writeln!(out, "packages ({}):", m.installed.len());
    for p in &m.installed {
        let _ = writeln!(out, "  {}", clean(p));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> ImageManifest {
        serde_json::from_str(
            r#"{"index":"i1","description":"trixie\u001b[2J build image","disk":"i1.qcow2",
            "disk_format":"qcow2","disk_sha256":"","virtual_size":12884901888,"kernel":"k",
            "kernel_sha256":"","memory_mib":4096,"vcpus":2,"init_sha256":"",
            "installed":["cargo 1.85.1+dfsg1-1","rustc 1.85.1+dfsg1-1"],"build_key":"k",
            "tools":{"rustc":"rustc 1.85.1 (4eb161250 2025-03-15)","go":"go version go1.24.4 linux/amd64"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn lists_defaults_tools_aligned_and_packages_without_control_characters() {
        let text = describe(&manifest());
        assert!(
            text.starts_with("image i1: trixie[2J build image\n"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'));
        assert!(text.contains("defaults: 4096 MiB of memory, 2 vCPUs; root disk 12288 MiB\n"));
        assert!(
            text.contains("\n  go     go version go1.24.4 linux/amd64\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  rustc  rustc 1.85.1 (4eb161250 2025-03-15)\n"),
            "{text}"
        );
        assert!(text.ends_with("packages (2):\n  cargo 1.85.1+dfsg1-1\n  rustc 1.85.1+dfsg1-1\n"));
        let mut older = manifest();
        older.tools.clear();
        assert!(describe(&older).contains("tools: not recorded"));
    }
}
