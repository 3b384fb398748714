//! Node: the packages of the tree's `package-lock.json`, fetched into an npm cache by
//! `npm ci --ignore-scripts` in a scratch copy of the manifest and the lock (npm checks each
//! tarball against the lock's `integrity`; no install script runs on the host, and the
//! scratch `node_modules` is thrown away). In the guest `npm ci --offline` installs from it.

use super::version::satisfies_npm_range;
use super::{
    FetchLimits, Fetched, ImageTools, Setup, VendorError, io_error, need_tool, run_tool, scratch,
    tree_bytes,
};
use std::path::Path;
use std::process::Command;

const CACHE_DIR: &str = "npm-cache";
const REGISTRY: &str = "https://registry.npmjs.org/";

/// What a lock asks for, checked before anything is fetched.
#[derive(Debug, PartialEq, Eq)]
pub struct NodeLock {
    /// Packages to fetch (entries with a tarball).
    pub packages: usize,
    /// `engines.node` of package.json, if it says.
    pub engines_node: Option<String>,
}

/// Reads `package.json` and `package-lock.json` (lockfileVersion 2 or 3): every package must
/// come from the npm registry with an `integrity` hash; git, file and other URLs are refused
/// (nothing else is reachable, and nothing else is checked).
pub fn read_lock(package_json: &str, lock: &str) -> Result<NodeLock, String> {
    let manifest: serde_json::Value =
        serde_json::from_str(package_json).map_err(|e| format!("package.json is not JSON: {e}"))?;
    let lock: serde_json::Value =
        serde_json::from_str(lock).map_err(|e| format!("not JSON: {e}"))?;
    let version = lock["lockfileVersion"].as_u64().unwrap_or(0);
    if version < 2 {
        return Err(format!(
            "lockfileVersion {version}: construir-pack reads versions 2 and 3 (npm 7 and later; `npm install --package-lock-only` upgrades it)"
        ));
    }
    let packages = lock["packages"]
        .as_object()
        .ok_or("no \"packages\" in the lock")?;
    let mut count = 0;
    for (path, p) in packages {
        if path.is_empty() {
            continue;
        }
        if !registry_path(path) {
            return Err(format!(
                "{path:?} is not a path under node_modules/ (workspaces and links are not fetched)"
            ));
        }
        if p.get("link").is_some() {
            return Err(format!(
                "{path} is a link: only registry packages are fetched"
            ));
        }
        // Bundled dependencies come inside their parent's tarball.
        if p["inBundle"].as_bool() == Some(true) {
            continue;
        }
        // No "resolved" (npm's omit-lockfile-registry-resolved): the registry's, by version.
        if let Some(resolved) = p.get("resolved")
            && !resolved.as_str().is_some_and(|r| r.starts_with(REGISTRY))
        {
            return Err(format!(
                "{path} comes from {resolved}: only the npm registry ({REGISTRY}) is fetched"
            ));
        }
        if p["version"].as_str().is_none() {
            return Err(format!("{path} has no version"));
        }
        let integrity = p["integrity"].as_str().unwrap_or_default();
        if !integrity.starts_with("sha512-") && !integrity.starts_with("sha256-") {
            return Err(format!(
                "{path} has no sha512 integrity hash (the lock must say what the tarball is)"
            ));
        }
        count += 1;
    }
    // package.json's own specs go to npm's resolver on the host: registry versions only.
    for field in [
        "dependencies",
        "devDependencies",
        "optionalDependencies",
        "peerDependencies",
        "overrides",
    ] {
        specs_are_versions(field, &manifest[field])?;
    }
    Ok(NodeLock {
        packages: count,
        engines_node: manifest["engines"]["node"].as_str().map(str::to_string),
    })
}

/// `node_modules/a`, `node_modules/@s/a/node_modules/b`: no `..`, no absolute path, nothing
/// outside node_modules.
fn registry_path(path: &str) -> bool {
    let mut parts = path.split('/').peekable();
    let mut any = false;
    while let Some(first) = parts.next() {
        if first != "node_modules" {
            return false;
        }
        let Some(mut name) = parts.next() else {
            return false;
        };
        if name.starts_with('@') {
            let ok = |n: &str| !n.is_empty() && n != "." && n != "..";
            if !ok(&name[1..]) {
                return false;
            }
            let Some(n) = parts.next() else {
                return false;
            };
            name = n;
        }
        if name.is_empty() || name.starts_with('.') || name.contains('\\') {
            return false;
        }
        any = true;
    }
    any
}

/// A dependency spec that names a registry version (`1.2.3`, `^1.2`, `>=1 <2`, `latest`), not a
/// git repository, a file, a URL or a GitHub shorthand (`user/repo`).
fn specs_are_versions(field: &str, specs: &serde_json::Value) -> Result<(), String> {
    match specs {
        serde_json::Value::Null => Ok(()),
        serde_json::Value::String(spec) => {
            if spec.contains(':') || spec.contains('/') || spec.contains('\\') {
                Err(format!(
                    "package.json's {field} has {spec:?}: only versions from the npm registry are fetched"
                ))
            } else {
                Ok(())
            }
        }
        serde_json::Value::Object(map) => {
            map.values().try_for_each(|v| specs_are_versions(field, v))
        }
        _ => Err(format!(
            "package.json's {field} is not an object of versions"
        )),
    }
}

/// Fetches the packages of `tree/package-lock.json` into `deps/npm-cache`.
pub fn vendor(
    tree: &Path,
    deps: &Path,
    limits: &FetchLimits,
    image: &ImageTools,
    setup: &mut Setup,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<Fetched>, VendorError> {
    let lock_path = tree.join("package-lock.json");
    if !lock_path.is_file() {
        if tree.join("package.json").is_file() {
            return Err(VendorError::Lock {
                lock: "package.json".into(),
                message: "no package-lock.json beside it: lock the dependencies first (`npm install --package-lock-only`)".into(),
            });
        }
        return Ok(None);
    }
    let node = image.version("node")?;
    let manifest = super::read_in_tree(tree, "package.json")?;
    let lock_text = super::read_in_tree(tree, "package-lock.json")?;
    let lock = read_lock(&manifest, &lock_text).map_err(|message| VendorError::Lock {
        lock: "package-lock.json".into(),
        message,
    })?;
    if let Some(range) = &lock.engines_node {
        match satisfies_npm_range(&node, range) {
            Some(true) => {}
            Some(false) => {
                return Err(VendorError::ToolchainTooOld {
                    image: image.index.clone(),
                    needs: vec![format!(
                        "package.json's engines.node is {range:?}, the image has Node.js {node}"
                    )],
                });
            }
            None => progress(&format!(
                "node: engines.node {range:?} is a range construir-pack cannot check; the image has Node.js {node}"
            )),
        }
    }
    need_tool(
        "npm",
        &["--version"],
        "the packages of package-lock.json",
        "npm",
    )?;
    let work = scratch(deps)?;
    let project = work.path().join("project");
    std::fs::create_dir(&project).map_err(io_error("a scratch project"))?;
    std::fs::write(project.join("package.json"), &manifest).map_err(io_error("package.json"))?;
    std::fs::write(project.join("package-lock.json"), &lock_text)
        .map_err(io_error("package-lock.json"))?;
    let userconfig = work.path().join("npmrc");
    std::fs::write(&userconfig, format!("registry={REGISTRY}\n")).map_err(io_error("an npmrc"))?;
    let cache = deps.join(CACHE_DIR);
    progress(&format!(
        "node: npm ci --ignore-scripts of {} packages from package-lock.json (each checked against its integrity)",
        lock.packages
    ));
    run_tool(
        "npm ci --ignore-scripts",
        Command::new("npm")
            .args([
                "ci",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
            ])
            // npm retries a tarball that fails its integrity check too, by default after 10 s
            // then 60 s: a lying lock is told in seconds, a flaky network still gets retries.
            .args([
                "--fetch-retries=2",
                "--fetch-retry-mintimeout=1000",
                "--fetch-retry-maxtimeout=4000",
            ])
            .arg("--cache")
            .arg(&cache)
            .arg("--userconfig")
            .arg(&userconfig)
            .env("npm_config_globalconfig", work.path().join("global-npmrc")),
        &project,
        deps,
        limits,
    )?;
    // What the host's npm left beside the cache is not needed in the guest.
    let _ = std::fs::remove_dir_all(cache.join("_logs"));
    let _ = std::fs::remove_dir_all(cache.join("_update-notifier-last-checked"));
    let dir = format!("{}/{CACHE_DIR}", super::GUEST_DEPS);
    for (k, v) in [
        ("npm_config_cache", dir.as_str()),
        ("npm_config_offline", "true"),
        ("npm_config_audit", "false"),
        ("npm_config_fund", "false"),
        ("npm_config_update_notifier", "false"),
    ] {
        setup.env.push((k.into(), v.into()));
    }
    Ok(Some(Fetched {
        kind: "node",
        summary: format!("{} packages from package-lock.json", lock.packages),
        bytes: tree_bytes(&cache),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"name":"a","version":"1.0.0","engines":{"node":">=18"}}"#;

    fn lock(packages: &str) -> String {
        format!(r#"{{"name":"a","lockfileVersion":3,"packages":{{"":{{"name":"a"}},{packages}}}}}"#)
    }

    #[test]
    fn a_registry_lock_with_integrity_reads() {
        let l = lock(
            r#""node_modules/ms":{"version":"2.1.3","resolved":"https://registry.npmjs.org/ms/-/ms-2.1.3.tgz","integrity":"sha512-abc"},
               "node_modules/x/node_modules/y":{"version":"1.0.0","inBundle":true}"#,
        );
        let got = read_lock(MANIFEST, &l).unwrap();
        assert_eq!(
            got,
            NodeLock {
                packages: 1,
                engines_node: Some(">=18".into())
            }
        );
    }

    #[test]
    fn other_sources_missing_hashes_and_old_locks_are_refused() {
        let git = lock(
            r#""node_modules/x":{"version":"1.0.0","resolved":"git+ssh://git@github.com/x/x.git#abc","integrity":"sha512-a"}"#,
        );
        assert!(
            read_lock(MANIFEST, &git)
                .unwrap_err()
                .contains("only the npm registry")
        );
        let unhashed = lock(
            r#""node_modules/ms":{"version":"2.1.3","resolved":"https://registry.npmjs.org/ms/-/ms-2.1.3.tgz"}"#,
        );
        assert!(
            read_lock(MANIFEST, &unhashed)
                .unwrap_err()
                .contains("no sha512 integrity")
        );
        let registrys = lock(r#""node_modules/ms":{"version":"2.1.3","integrity":"sha512-abc"}"#);
        assert_eq!(read_lock(MANIFEST, &registrys).unwrap().packages, 1);
        for evil in [
            r#""../../x":{"version":"1.0.0","integrity":"sha512-a"}"#,
            r#""node_modules/../../x":{"version":"1.0.0","integrity":"sha512-a"}"#,
            r#""packages/a":{"version":"1.0.0","integrity":"sha512-a"}"#,
            r#""node_modules/a":{"link":true,"resolved":"../../etc"}"#,
            r#""node_modules/a":{"version":"1.0.0","resolved":7,"integrity":"sha512-a"}"#,
        ] {
            assert!(read_lock(MANIFEST, &lock(evil)).is_err(), "{evil}");
        }
        let scoped = lock(
            r#""node_modules/@s/a/node_modules/b":{"version":"1.0.0","integrity":"sha512-a"}"#,
        );
        assert!(read_lock(MANIFEST, &scoped).is_ok());
        for spec in [
            "git+ssh://git@example.org/x.git",
            "file:../x",
            "user/repo",
            "https://x.example/a.tgz",
        ] {
            let m = format!(r#"{{"name":"a","dependencies":{{"x":"{spec}"}}}}"#);
            assert!(
                read_lock(
                    &m,
                    &lock(r#""node_modules/ms":{"version":"2.1.3","integrity":"sha512-abc"}"#)
                )
                .is_err(),
                "{spec}"
            );
        }
        let m = r#"{"name":"a","dependencies":{"x":"^1.2"},"overrides":{"y":{"z":"2.0.0"}}}"#;
        assert!(
            read_lock(
                m,
                &lock(r#""node_modules/ms":{"version":"2.1.3","integrity":"sha512-abc"}"#)
            )
            .is_ok()
        );
        let v1 = r#"{"name":"a","lockfileVersion":1,"dependencies":{}}"#;
        assert!(
            read_lock(MANIFEST, v1)
                .unwrap_err()
                .contains("lockfileVersion 1")
        );
        assert!(read_lock(MANIFEST, "{").is_err());
        assert!(
            read_lock("[", &lock(r#""x":{}"#))
                .unwrap_err()
                .contains("package.json")
        );
    }
}
