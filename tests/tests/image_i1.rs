//! Image i1 (Debian trixie with the toolchains) and `construir-pack --vendor`: projects whose
//! dependencies come from crates.io, PyPI, npm and Debian, each pinned by its lock's hash, are
//! packed with what they need on this host and built in the VM with no network (QEMU TCG), and
//! what the build made comes back. Locks that lie, toolchains too old and what cannot be fetched
//! here are refused before anything is packed.

use construir_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// itoa 1.0.11's .crate, as crates.io's index and every Cargo.lock that has it say.
const ITOA_SHA256: &str = "49f1f14873335454500d59611f1cf4a4b0f786f9ac11f4312a78e4cf2566695b";
/// six 1.16.0's wheel on PyPI.
const SIX_WHEEL_SHA256: &str = "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254";
/// is-number 7.0.0's tarball on npm.
const IS_NUMBER_INTEGRITY: &str = "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng==";

/// Writes `files` (path, text) under a new directory; scripts named `construir` or `*.sh` are
/// made executable.
fn project(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        if *path == "construir" || path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    dir
}

/// `construir-pack --dir DIR --image i1 --vendor`: the job, or what it printed.
fn pack_vendored(dir: &Path, name: &str, extra: &[&str]) -> Result<(TestJob, String), String> {
    let out_dir = tempfile::tempdir().unwrap();
    let pack = Command::new(binary("construir-pack"))
        .arg("--dir")
        .arg(dir)
        .args([
            "--image",
            "i1",
            "--vendor",
            "--name",
            name,
            "--output-size",
            "16M",
        ])
        .args(["--images-dir", images_dir("i1").to_str().unwrap()])
        .args(extra)
        .arg("-o")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&pack.stderr).into_owned();
    let path = out_dir.path().join(format!("{name}_i1.tar.xz"));
    if pack.status.success() {
        assert!(path.is_file(), "{stderr}");
        Ok((TestJob { dir: out_dir, path }, stderr))
    } else {
        assert!(!path.exists(), "a refused pack wrote {}", path.display());
        Err(stderr)
    }
}

/// What `construir-pack --vendor` said when it refused `dir` (it must).
fn refused(dir: &Path, name: &str) -> String {
    match pack_vendored(dir, name, &[]) {
        Ok((_, said)) => panic!("{name} was packed:\n{said}"),
        Err(said) => said,
    }
}

/// The repository's `examples/NAME`.
fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Runs a job in i1 under TCG and gives back the files `outputs` of its output.
fn run_i1(job: &TestJob, what: &str, outputs: &[&str]) -> Vec<Vec<u8>> {
    let run = qemu_tcg_on(
        "i1",
        job,
        &["--timeout", "25m"],
        Duration::from_secs(30 * 60),
    );
    run.expect_code(0);
    eprintln!(
        "{what}: the i1 job took {:.1} s under TCG",
        run.elapsed.as_secs_f64()
    );
    outputs.iter().map(|o| job.output(o)).collect()
}

fn rust_project(lock_checksum: &str, rust_version: Option<&str>) -> tempfile::TempDir {
    let rv = rust_version
        .map(|v| format!("rust-version = \"{v}\"\n"))
        .unwrap_or_default();
    project(&[
        (
            "Cargo.toml",
            format!(
                "[package]\nname = \"hello-deps\"\nversion = \"0.1.0\"\nedition = \"2021\"\n{rv}\n[dependencies]\nitoa = \"=1.0.11\"\n"
            ),
        ),
        (
            "Cargo.lock",
            format!(
                "version = 4\n\n[[package]]\nname = \"hello-deps\"\nversion = \"0.1.0\"\ndependencies = [\n \"itoa\",\n]\n\n\
                 [[package]]\nname = \"itoa\"\nversion = \"1.0.11\"\nsource = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
                 checksum = \"{lock_checksum}\"\n"
            ),
        ),
        (
            "src/main.rs",
            "fn main() {\n    let mut b = itoa::Buffer::new();\n    println!(\"itoa says {}\", b.format(6u64 * 7 * 1_000_001));\n}\n".into(),
        ),
        (
            "construir",
            "#!/bin/sh\nset -e\nmkdir -p /tmp/out\ncargo build --release --offline 2>&1 | tail -n 3\n\
             ./target/release/hello-deps > /tmp/out/run.txt\n\
             sed -n 's/.*\"package\":\"\\([0-9a-f]*\\)\".*/\\1/p' /opt/job/deps/cargo/itoa-1.0.11/.cargo-checksum.json > /tmp/out/crate.txt\n\
             cd /tmp && tar -cJf /dev/sdb out\n"
                .into(),
        ),
    ])
}

#[test]
fn list_tools_names_the_toolchains_of_i1() {
    let out = Command::new(binary("construir-pack"))
        .args(["--image", "i1", "--list-tools", "--images-dir"])
        .arg(images_dir("i1"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("image i1: Debian trixie"), "{text}");
    for tool in [
        "rustc", "cargo", "go", "node", "npm", "python3", "pip", "gcc", "g++", "cmake", "meson",
        "ninja", "autoconf", "automake", "libtool", "java", "debian",
    ] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(tool))
            .unwrap_or_else(|| panic!("{tool} in\n{text}"));
        assert!(
            line.chars().any(|c| c.is_ascii_digit()) && !line.contains("not found"),
            "{tool}: {line}"
        );
    }
    assert!(text.contains("\n  rustc       rustc 1."), "{text}");
    assert!(text.contains("\npackages ("), "{text}");
}

#[test]
fn a_rust_crate_with_a_dependency_builds_offline_from_vendored_crates() {
    let (job, said) = pack_vendored(&example("rust-hello"), "rust-hello", &[]).unwrap();
    assert!(said.contains("rust: 1 crates from Cargo.lock"), "{said}");
    let out = run_i1(&job, "rust-hello", &["out/run.txt", "out/crate.txt"]);
    assert_eq!(out[0], b"itoa says 42000042\n");
    // The crate the build used is the one the lock named, byte for byte.
    assert_eq!(String::from_utf8_lossy(&out[1]).trim(), ITOA_SHA256);
}

#[test]
fn a_python_package_is_built_into_a_wheel_with_its_dependency_offline() {
    let (job, said) = pack_vendored(&example("python-wheel"), "python-wheel", &[]).unwrap();
    assert!(
        said.contains("python: 1 wheels from requirements.txt"),
        "{said}"
    );
    let out = run_i1(
        &job,
        "python-wheel",
        &[
            "out/run.txt",
            "out/wheel.txt",
            "out/construir_hello-0.1.0-py3-none-any.whl",
        ],
    );
    assert_eq!(out[0], b"hello from a wheel, six 1.16.0 on Python 3\n");
    assert_eq!(String::from_utf8_lossy(&out[1]).trim(), SIX_WHEEL_SHA256);
    // The wheel is a zip holding the package.
    assert_eq!(&out[2][..4], b"PK\x03\x04");
    let name = b"construir_hello/__init__.py";
    assert!(out[2].windows(name.len()).any(|w| w == name));
}

#[test]
fn a_node_program_installs_offline_and_its_child_processes_run_while_inet_fails() {
    let (job, said) = pack_vendored(&example("node-hello"), "node-hello", &[]).unwrap();
    assert!(
        said.contains("node: 1 packages from package-lock.json"),
        "{said}"
    );
    let out = run_i1(&job, "node-hello", &["out/run.txt"]);
    let run = String::from_utf8_lossy(&out[0]);
    assert_eq!(
        run, "is-number true false\nchild from a child\ninet EAFNOSUPPORT\n",
        "{run}"
    );
}

#[test]
fn debian_build_dependencies_the_image_lacks_are_installed_before_the_build() {
    let (job, said) = pack_vendored(&example("c-json"), "c-json", &[]).unwrap();
    // What the image has is not fetched again: json-c's two packages, nothing of the base.
    let debs = said
        .lines()
        .find(|l| l.contains(".deb files"))
        .unwrap_or_default();
    assert!(
        debs.contains(": 2 .deb files for 2 build dependencies of debian/control (trixie)"),
        "{said}"
    );
    let out = run_i1(&job, "c-json", &["out/run.txt", "out/status.txt"]);
    assert_eq!(out[0], b"{\"a\":[1,2,3]}\n");
    assert_eq!(out[1], b"install ok installed\n");
}

#[test]
fn lying_locks_too_new_toolchains_and_unfetchable_projects_are_refused() {
    // A Cargo.lock whose checksum is not the crate's.
    let mut bad = ITOA_SHA256.to_string();
    bad.replace_range(0..1, if bad.starts_with('0') { "1" } else { "0" });
    let p = rust_project(&bad, None);
    let e = refused(p.path(), "rust-bad");
    assert!(e.contains("checksum for `itoa v1.0.11` changed"), "{e}");

    // A wheel whose hash is not the lock's.
    let p = project(&[
        (
            "requirements.txt",
            format!("six==1.16.0 --hash=sha256:{}\n", "0".repeat(64)),
        ),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "python-bad");
    assert!(e.contains("DO NOT MATCH THE HASHES"), "{e}");
    let p = project(&[
        ("requirements.txt", "six==1.16.0\n".into()),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "python-unhashed");
    assert!(e.contains("`six==1.16.0` has no --hash"), "{e}");

    // An npm tarball whose integrity is not the lock's.
    let wrong = IS_NUMBER_INTEGRITY.replace("41Cif", "42Cif");
    let p = project(&[
        (
            "package.json",
            r#"{"name":"a","version":"1.0.0","dependencies":{"is-number":"7.0.0"}}"#.into(),
        ),
        (
            "package-lock.json",
            format!(
                r#"{{"name":"a","version":"1.0.0","lockfileVersion":3,"packages":{{"":{{"name":"a"}},"node_modules/is-number":{{"version":"7.0.0","resolved":"https://registry.npmjs.org/is-number/-/is-number-7.0.0.tgz","integrity":"{wrong}"}}}}}}"#
            ),
        ),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "node-bad");
    assert!(e.contains("EINTEGRITY") || e.contains("integrity"), "{e}");

    // A crate that needs a newer rustc than the image has.
    let p = rust_project(ITOA_SHA256, Some("1.99"));
    let e = refused(p.path(), "rust-new");
    assert!(
        e.contains("the project needs rustc 1.99 (its rust-version)"),
        "{e}"
    );
    assert!(e.contains("the image has rustc 1.85"), "{e}");

    // Node's engines.
    let p = project(&[
        (
            "package.json",
            r#"{"name":"a","version":"1.0.0","engines":{"node":">=22"}}"#.into(),
        ),
        (
            "package-lock.json",
            r#"{"name":"a","version":"1.0.0","lockfileVersion":3,"packages":{"":{"name":"a"}}}"#
                .into(),
        ),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "node-new");
    assert!(
        e.contains("engines.node is \">=22\", the image has Node.js 20"),
        "{e}"
    );

    // Go modules with no vendor/, and Maven.
    let p = project(&[
        (
            "go.mod",
            "module example.org/a\n\ngo 1.22\n\nrequire golang.org/x/text v0.14.0\n".into(),
        ),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "go");
    assert!(e.contains("Go modules cannot be fetched here"), "{e}");
    let p = project(&[
        ("pom.xml", "<project/>\n".into()),
        ("construir", "true\n".into()),
    ]);
    let e = refused(p.path(), "maven");
    assert!(
        e.contains("Maven dependencies cannot be fetched here"),
        "{e}"
    );

    // A git source in the lock would be fetched with the user's credentials: refused.
    let p = rust_project(ITOA_SHA256, None);
    let lock = std::fs::read_to_string(p.path().join("Cargo.lock")).unwrap();
    std::fs::write(
        p.path().join("Cargo.lock"),
        lock.replace(
            "registry+https://github.com/rust-lang/crates.io-index",
            "git+ssh://git@example.invalid/private#0123abcd",
        ),
    )
    .unwrap();
    let e = refused(p.path(), "rust-git");
    assert!(e.contains("only crates.io is fetched"), "{e}");

    // The tree's script or lock as a link to a file of this host's: refused, not packed.
    let p = rust_project(ITOA_SHA256, None);
    std::fs::remove_file(p.path().join("construir")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", p.path().join("construir")).unwrap();
    let e = refused(p.path(), "linked-script");
    assert!(e.contains("is a symbolic link"), "{e}");
    let p = project(&[("construir", "true\n".into())]);
    std::os::unix::fs::symlink("/etc/passwd", p.path().join("requirements.txt")).unwrap();
    let e = refused(p.path(), "linked-lock");
    assert!(e.contains("a symbolic link in the tree"), "{e}");

    // Nothing to vendor is said, not packed silently.
    let p = project(&[("construir", "true\n".into())]);
    let e = refused(p.path(), "nothing");
    assert!(e.contains("nothing to vendor"), "{e}");
}
