//! construir-pack and construir-result, as a person uses them (no VM needed).

use construir_contract::archive;
use construir_tests::*;
use std::process::Command;

fn git(dir: &std::path::Path, args: &[&str]) {
    let ok = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "git {args:?}");
}

#[test]
fn pack_takes_a_git_tree_at_a_commit_without_dot_git_and_sizes_the_job() {
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    std::fs::write(repo.path().join("construir"), "#!/bin/sh\nmake\n").unwrap();
    std::fs::write(repo.path().join("main.c"), "committed\n").unwrap();
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "one"]);
    std::fs::write(repo.path().join("main.c"), "not committed\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(binary("construir-pack"))
        .args([
            "--git",
            repo.path().to_str().unwrap(),
            "--rev",
            "HEAD",
            "--image",
            "i0",
            "--name",
            "proj",
            "--output-size",
            "2M",
            "-o",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let job = out.path().join("proj_i0.tar.xz");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        job.display().to_string()
    );
    assert_eq!(std::fs::metadata(&job).unwrap().len(), 2 << 20);
    let disk = std::fs::read(&job).unwrap();
    let (_, entries) = archive::list(&disk[..]).unwrap();
    assert!(
        entries.iter().all(|e| !e.path.contains(".git")),
        "{entries:?}"
    );
    assert_eq!(
        archive::read_file(&disk[..], "opt/job/main.c", 100)
            .unwrap()
            .unwrap(),
        b"committed\n"
    );
    assert!(
        archive::read_file(&disk[..], "opt/job/construir", 100)
            .unwrap()
            .is_some()
    );

    // A tree without the script is refused with a clear error.
    let empty = tempfile::tempdir().unwrap();
    let run = Command::new(binary("construir-pack"))
        .args(["--dir", empty.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("construir"));
}

#[test]
fn result_lists_prints_and_extracts_a_jobs_output() {
    let job = TestJob::new(
        "r",
        "t0",
        &[construir_tools::pack::JobFile::new(
            "construir",
            b"x".to_vec(),
            0o755,
        )],
        1 << 16,
    );
    let list = Command::new(binary("construir-result"))
        .arg(&job.path)
        .output()
        .unwrap();
    assert!(list.status.success());
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("opt/job/construir") && text.contains("no record"),
        "{text}"
    );
    let cat = Command::new(binary("construir-result"))
        .arg(&job.path)
        .args(["--cat", "opt/job/construir"])
        .output()
        .unwrap();
    assert_eq!(cat.stdout, b"x");
    let dest = job.dir.path().join("x");
    let ex = Command::new(binary("construir-result"))
        .arg(&job.path)
        .arg("--extract")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(ex.status.success());
    assert_eq!(std::fs::read(dest.join("opt/job/construir")).unwrap(), b"x");
    let missing = Command::new(binary("construir-result"))
        .arg(&job.path)
        .args(["--cat", "nope"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
}
