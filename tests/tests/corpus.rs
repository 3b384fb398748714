//! The corpus of real projects (corpus/, corpus/README.md): upstream releases pinned by sha256,
//! from Debian's archive, PyPI, crates.io and npm. Every entry is checked to be pinned and to say
//! what its job must write back; the CI tier (tier=ci) is built in image i1 through
//! construir-runner by tools/corpus, which compares each job's out/summary.txt (the project's own
//! test counts, its program's output) with corpus/NAME/expect and checks its artifact. The rest
//! run with `tools/corpus --all` (a benchmark, beside the same build on the host: `--host`).

use construir_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus")
}

/// Each project's name and its source file's `key=value` fields.
fn projects() -> Vec<(String, Vec<(String, String)>)> {
    let mut all: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("source").is_file())
        .map(|p| {
            let text = std::fs::read_to_string(p.join("source")).unwrap();
            let fields = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| {
                    let (k, v) = l
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{}: `{l}` is not key=value", p.display()));
                    (k.to_string(), v.to_string())
                })
                .collect();
            (p.file_name().unwrap().to_str().unwrap().to_string(), fields)
        })
        .collect();
    all.sort();
    all
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn every_corpus_project_is_pinned_and_says_what_its_job_writes_back() {
    let all = projects();
    let kinds: Vec<_> = all
        .iter()
        .map(|(_, f)| field(f, "kind").unwrap_or_default())
        .collect();
    for want in [
        "c-autotools",
        "c-meson",
        "c-cmake",
        "rust-crate",
        "python-sdist",
        "node-package",
    ] {
        assert!(kinds.contains(&want), "no {want} project in the corpus");
    }
    for (name, f) in &all {
        let url = field(f, "url").unwrap_or_default();
        assert!(url.starts_with("http"), "{name}: url {url:?}");
        let sha = field(f, "sha256").unwrap_or_default();
        assert!(
            sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}: sha256 {sha:?}"
        );
        assert!(
            matches!(field(f, "tier"), Some("ci" | "bench")),
            "{name}: tier"
        );
        assert!(
            field(f, "artifact").is_some_and(|a| a.starts_with("out/")),
            "{name}: artifact"
        );
        let script = field(f, "script")
            .map(|s| corpus_dir().join("..").join(s))
            .unwrap_or_else(|| corpus_dir().join(name).join("build.sh"));
        let text = std::fs::read_to_string(&script)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", script.display()));
        assert!(
            text.contains("out/summary.txt") && text.contains("/dev/sdb"),
            "{name}: {} writes no out/summary.txt back",
            script.display()
        );
        let expect = std::fs::read_to_string(corpus_dir().join(name).join("expect")).unwrap();
        assert!(
            expect.ends_with('\n') && expect.len() > 10,
            "{name}: expect"
        );
    }
    let ci = all
        .iter()
        .filter(|(_, f)| field(f, "tier") == Some("ci"))
        .count();
    assert!(
        (2..=3).contains(&ci),
        "the CI tier is the two or three smallest"
    );
}

/// A download that is not what the pin says is refused, and nothing is unpacked.
#[test]
fn a_source_whose_bytes_are_not_the_pinned_ones_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let (_, f) = projects()
        .into_iter()
        .find(|(n, _)| n == "libinih")
        .unwrap();
    // The cache holds the download under its pinned hash: put other bytes there.
    let pinned = field(&f, "sha256").unwrap().to_string();
    std::fs::create_dir_all(cache.path().join("corpus")).unwrap();
    std::fs::write(cache.path().join("corpus").join(&pinned), b"not inih").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(corpus_dir().join("fetch"))
        .args(["libinih"])
        .arg(dir.path())
        .env("CONSTRUIR_CACHE", cache.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("not the pinned {pinned}")), "{said}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_ci_tier_builds_in_i1_through_the_runner_and_passes_its_own_tests() {
    images_dir("i1");
    // tools/corpus keeps its work directory (jobs, runs, outputs) to be looked at: here, in a
    // directory of the test's, removed afterwards.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(corpus_dir().join("../tools/corpus"))
        .arg("--bin")
        .arg(target_dir())
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "tools/corpus failed:\n{stderr}");
    for (name, f) in projects() {
        if field(&f, "tier") == Some("ci") {
            assert!(
                stdout.contains(&format!("--- {name}: passed in ")),
                "{name} did not pass:\n{stdout}\n{stderr}"
            );
        }
    }
    assert!(stderr.contains("tools/corpus: PASSED"), "{stderr}");
}
