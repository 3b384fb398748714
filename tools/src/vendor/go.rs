//! Go, Maven and Gradle: no Go module proxy and no Maven repository is reachable from the
//! hosts construir runs on, so nothing is fetched for them. A Go module that carries its
//! dependencies in `vendor/` builds with `-mod=vendor`; one that needs modules fetched, and every
//! Maven or Gradle project, is told so plainly instead of packed to fail in the VM.

use super::version::Version;
use super::{Fetched, ImageTools, Setup, VendorError};
use std::path::Path;

/// What a `go.mod` says: its `go` version and how many modules it requires.
#[derive(Debug, PartialEq, Eq)]
pub struct GoMod {
    pub go: Option<Version>,
    pub requires: usize,
}

/// Reads the `go` directive and counts the `require`d modules (single lines and blocks).
pub fn read_go_mod(text: &str) -> GoMod {
    let mut go = None;
    let mut requires = 0;
    let mut in_block = false;
    for raw in text.lines() {
        let line = raw.split("//").next().unwrap_or("").trim();
        if in_block {
            if line == ")" {
                in_block = false;
            } else if !line.is_empty() {
                requires += 1;
            }
            continue;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("go") => go = words.next().and_then(Version::parse),
            Some("require") => match words.next() {
                Some("(") => in_block = true,
                Some(_) => requires += 1,
                None => {}
            },
            _ => {}
        }
    }
    GoMod { go, requires }
}

/// Refuses what cannot be fetched here, before anything else is: Maven and Gradle builds, and
/// Go modules with requirements but no `vendor/`.
pub fn refuse_unfetchable(tree: &Path) -> Result<(), VendorError> {
    if tree.join("pom.xml").is_file() {
        return Err(VendorError::Unsupported(
            "pom.xml: Maven dependencies cannot be fetched here (no Maven repository is reachable from this host); \
             a job can build a Maven project only if its dependencies come inside the tree"
                .into(),
        ));
    }
    for gradle in [
        "build.gradle",
        "build.gradle.kts",
        "settings.gradle",
        "settings.gradle.kts",
    ] {
        if tree.join(gradle).is_file() {
            return Err(VendorError::Unsupported(format!(
                "{gradle}: Gradle dependencies cannot be fetched here (no Maven repository is reachable from this host)"
            )));
        }
    }
    let go_mod = tree.join("go.mod");
    if go_mod.is_file() {
        let m = read_go_mod(&super::read_in_tree(tree, "go.mod")?);
        if m.requires > 0 && !tree.join("vendor/modules.txt").is_file() {
            return Err(VendorError::Unsupported(format!(
                "go.mod requires {} modules and the tree has no vendor/: Go modules cannot be fetched here \
                 (no Go module proxy is reachable from this host); run `go mod vendor` where one is and commit vendor/",
                m.requires
            )));
        }
    }
    Ok(())
}

/// A Go module: its `go` version checked against the image's, and the build told to use
/// `vendor/` and never the network.
pub fn vendor(
    tree: &Path,
    image: &ImageTools,
    setup: &mut Setup,
) -> Result<Option<Fetched>, VendorError> {
    let go_mod = tree.join("go.mod");
    if !go_mod.is_file() {
        return Ok(None);
    }
    let m = read_go_mod(&super::read_in_tree(tree, "go.mod")?);
    let have = image.version("go")?;
    if let Some(need) = &m.go
        && !have.at_least(need)
    {
        return Err(VendorError::ToolchainTooOld {
            image: image.index.clone(),
            needs: vec![format!(
                "go.mod says go {need}, the image has Go {have} (and no toolchain can be downloaded in the VM)"
            )],
        });
    }
    for (k, v) in [
        ("GOFLAGS", "-mod=vendor"),
        ("GOPROXY", "off"),
        ("GOTOOLCHAIN", "local"),
        ("GOSUMDB", "off"),
    ] {
        setup.env.push((k.into(), v.into()));
    }
    Ok(Some(Fetched {
        kind: "go",
        summary: if m.requires == 0 {
            "go.mod requires no modules".into()
        } else {
            format!("{} modules already in vendor/", m.requires)
        },
        bytes: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_mod_directives_and_requirements_are_counted() {
        let m = read_go_mod(
            "module example.org/a\n\ngo 1.22.3 // comment\n\nrequire example.org/b v1.0.0\nrequire (\n\texample.org/c v1.2.0\n\t// a comment\n\texample.org/d v0.1.0 // indirect\n)\n",
        );
        assert_eq!(m.go.map(|v| v.to_string()), Some("1.22.3".into()));
        assert_eq!(m.requires, 3);
        assert_eq!(
            read_go_mod("module a\n"),
            GoMod {
                go: None,
                requires: 0
            }
        );
    }

    #[test]
    fn maven_gradle_and_unvendored_go_are_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refuse_unfetchable(dir.path()).is_ok());
        std::fs::write(
            dir.path().join("go.mod"),
            "module a\ngo 1.22\nrequire b v1.0.0\n",
        )
        .unwrap();
        let e = refuse_unfetchable(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("no vendor/") && e.contains("go mod vendor"),
            "{e}"
        );
        std::fs::create_dir(dir.path().join("vendor")).unwrap();
        std::fs::write(dir.path().join("vendor/modules.txt"), "# b v1.0.0\n").unwrap();
        assert!(refuse_unfetchable(dir.path()).is_ok());
        std::fs::write(dir.path().join("pom.xml"), "<project/>").unwrap();
        let e = refuse_unfetchable(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("Maven dependencies cannot be fetched here"),
            "{e}"
        );
    }
}
