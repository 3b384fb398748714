//! Helpers for construir's end-to-end tests: where the binaries and images are, packing jobs,
//! running a launcher as a child process with a deadline, and reading what a job wrote back.
//!
//! The tests need the kernel and images built (`tools/test` builds them first); a missing image
//! fails the test with the command that builds it, never skips it.

pub mod fuzz;

use construir_contract::archive;
use construir_contract::host::{HostKind, detect};
use construir_contract::manifest::default_images_dir;
use construir_tools::pack::{JobFile, write_job};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace's `target/<profile>` directory, found from the test executable.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary; panics with the fix if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`, which tools/test does)",
        path.display()
    );
    path
}

/// The images directory, checked to hold `index`.
pub fn images_dir(index: &str) -> PathBuf {
    let dir = default_images_dir();
    assert!(
        dir.join(format!("{index}.json")).exists(),
        "image {index} is not built in {}: run `image/build {index}` (tools/test does)",
        dir.display()
    );
    dir
}

/// Whether KVM tests can run here. Without /dev/kvm they say so loudly, and fail when
/// `CONSTRUIR_REQUIRE_KVM=1` (as in CI).
pub fn kvm_or_explain(test: &str) -> Option<HostKind> {
    let host = detect();
    if host.has_kvm() {
        return Some(host);
    }
    let msg = format!("{test}: NOT RUN: this host has no usable /dev/kvm");
    if std::env::var("CONSTRUIR_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{msg}, and CONSTRUIR_REQUIRE_KVM=1 requires it");
    }
    eprintln!(
        "\n!!!!!!!!!! {msg} (set CONSTRUIR_REQUIRE_KVM=1 to make this a failure) !!!!!!!!!!\n"
    );
    None
}

/// Hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for xz.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Swaps each pair of bytes, like `dd conv=swab` (a trailing odd byte stays).
pub fn swab(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for pair in out.chunks_exact_mut(2) {
        pair.swap(0, 1);
    }
    out
}

/// A job directory with one job file in it.
pub struct TestJob {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestJob {
    /// Packs `files` as `<name>_<index>.tar.xz`, at least `size` bytes.
    pub fn new(name: &str, index: &str, files: &[JobFile], size: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("{name}_{index}.tar.xz"));
        write_job(&path, files, size).expect("pack job");
        TestJob { dir, path }
    }

    /// A job file holding these raw bytes (garbage, a bare tar, …).
    pub fn raw(name: &str, index: &str, bytes: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("{name}_{index}.tar.xz"));
        std::fs::write(&path, bytes).expect("write job");
        TestJob { dir, path }
    }

    /// A file the job wrote back into its disk.
    pub fn output(&self, path: &str) -> Vec<u8> {
        let disk = std::fs::read(&self.path).expect("read job file");
        match archive::read_file(&disk[..], path, 1 << 30) {
            Ok(Some(data)) => data,
            Ok(None) => panic!(
                "the job's output has no {path}; entries: {:?}",
                archive::list(&disk[..]).map(|l| l.1)
            ),
            Err(e) => panic!("the job's output is not readable: {e}"),
        }
    }
}

/// What a launcher run gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub summary: serde_json::Value,
    pub console: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub probe: ProcessProbe,
}

/// `construir-qemu --accel tcg` on image `index` (from the default images directory) with
/// `job`, plus `extra` arguments, within `deadline`.
pub fn qemu_tcg_on(index: &str, job: &TestJob, extra: &[&str], deadline: Duration) -> Run {
    qemu_on("tcg", index, job, extra, deadline)
}

/// `construir-qemu --accel ACCEL` on image `index` (from the default images directory) with
/// `job`, plus `extra` arguments, within `deadline`.
pub fn qemu_on(accel: &str, index: &str, job: &TestJob, extra: &[&str], deadline: Duration) -> Run {
    let images = images_dir(index);
    let mut args = vec![
        "--accel",
        accel,
        "--images-dir",
        images.to_str().unwrap(),
        "--job",
        job.path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_launcher(&binary("construir-qemu"), &args, deadline)
}

/// Runs a launcher binary with `args` plus `--json --console FILE`, killing it after `deadline`.
pub fn run_launcher(binary: &Path, args: &[&str], deadline: Duration) -> Run {
    let console = tempfile::NamedTempFile::new().expect("console file");
    let started = Instant::now();
    let child = Command::new(binary)
        .args(args)
        .args(["--json", "--console"])
        .arg(console.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start launcher");
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        let mut probe = ProcessProbe::default();
        while start.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(pid, 0) only probes whether the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return (false, probe);
            }
            probe.sample(pid);
        }
        // SAFETY: killing our own child that outlived its deadline.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        (true, probe)
    });
    let output = child.wait_with_output().expect("wait launcher");
    let (killed, probe) = watchdog.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let console_text =
        String::from_utf8_lossy(&std::fs::read(console.path()).unwrap_or_default()).into_owned();
    assert!(
        !killed,
        "{} {args:?} did not end within {deadline:?}\nstderr:\n{stderr}\nconsole:\n{console_text}",
        binary.display()
    );
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    Run {
        code: output.status.code().unwrap_or(-1),
        summary,
        console: console_text,
        stderr,
        elapsed: started.elapsed(),
        probe,
    }
}

/// What a launcher process looked like from outside while it ran (sampled every 100 ms).
#[derive(Debug, Default, Clone)]
pub struct ProcessProbe {
    /// Samples taken while the process existed.
    pub samples: u32,
    /// Socket descriptors ever seen open (`socket:[inode]`).
    pub sockets: Vec<String>,
    /// Most threads seen at once, and most of them under a seccomp filter at once (`Seccomp: 2`).
    pub threads: usize,
    pub filtered_threads: usize,
    /// `NoNewPrivs: 1` seen, and the core-dump limit seen at 0.
    pub no_new_privs: bool,
    pub no_core_dumps: bool,
}

impl ProcessProbe {
    pub fn sample(&mut self, pid: u32) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return;
        };
        self.samples += 1;
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if target.starts_with("socket:") && !self.sockets.contains(&target) {
                    self.sockets.push(target);
                }
            }
        }
        let (mut threads, mut filtered) = (0, 0);
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                threads += 1;
                if status
                    .lines()
                    .any(|l| l.starts_with("Seccomp:") && l.trim_end().ends_with('2'))
                {
                    filtered += 1;
                }
                if status
                    .lines()
                    .any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1'))
                {
                    self.no_new_privs = true;
                }
            }
        }
        self.threads = self.threads.max(threads);
        self.filtered_threads = self.filtered_threads.max(filtered);
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        if limits.lines().any(|l| {
            l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        }) {
            self.no_core_dumps = true;
        }
    }
}

impl Run {
    /// Panics with the whole story unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code {} (want {code})\nsummary: {}\nstderr:\n{}\nconsole:\n{}",
            self.code, self.summary, self.stderr, self.console
        );
        self
    }
}

/// The seed-format job: writes `out.txt` over `/dev/sdb`, as the seed's jobs do.
pub fn seed_job(index: &str) -> TestJob {
    TestJob::new(
        "seed",
        index,
        &[JobFile::script(
            "#!/bin/sh\nset -e\ncd /tmp\necho \"construir seed job ran on $(uname -r)\" > out.txt\ntar -cJf /dev/sdb out.txt\n",
        )],
        1 << 20,
    )
}

/// Checks the seed job's output.
pub fn check_seed_output(job: &TestJob) {
    let out = String::from_utf8(job.output("out.txt")).expect("utf-8");
    assert!(
        out.starts_with("construir seed job ran on 6.1."),
        "out.txt: {out:?}"
    );
}

/// A job carrying `len` random bytes: it writes back their sha256 and a byte-swapped copy.
pub fn data_job(index: &str, len: usize) -> (TestJob, Vec<u8>) {
    let data = random_bytes(len, len as u64);
    let script = "#!/bin/sh\nset -e\ncd /opt/job\nsha256sum data.bin > /tmp/sha256.txt\n\
                  dd if=data.bin of=/tmp/swab.bin conv=swab bs=64k 2>/dev/null\n\
                  cd /tmp && tar -cJf /dev/vdb sha256.txt swab.bin\n";
    let job = TestJob::new(
        "data",
        index,
        &[
            JobFile::script(script),
            JobFile::new("data.bin", data.clone(), 0o644),
        ],
        (len as u64) * 2 + (1 << 20),
    );
    (job, data)
}

/// Checks the data job's output against what went in.
pub fn check_data_output(job: &TestJob, data: &[u8]) {
    let sha = String::from_utf8(job.output("sha256.txt")).expect("utf-8");
    assert_eq!(
        sha.split_whitespace().next(),
        Some(sha256_hex(data).as_str()),
        "the guest saw other bytes than the host packed"
    );
    let swapped = job.output("swab.bin");
    assert_eq!(swapped.len(), data.len());
    assert!(
        swapped == swab(data),
        "the byte-swapped copy differs from the host's"
    );
}

/// A runner's finished runs: every run directory of `farm/sub` (done or failed) whose record
/// names `job`, with its record.
pub fn runs_of(farm: &Path, sub: &str, job: &str) -> Vec<(PathBuf, serde_json::Value)> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(farm.join(sub))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(bytes) = std::fs::read(entry.path().join("record.json")) else {
            continue;
        };
        let rec: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if rec["job"] == job {
            runs.push((entry.path(), rec));
        }
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    runs
}

/// The one finished run of `job` in `farm/sub`, if there is one (panics if there are several).
pub fn run_of(farm: &Path, sub: &str, job: &str) -> Option<(PathBuf, serde_json::Value)> {
    let mut runs = runs_of(farm, sub, job);
    assert!(runs.len() <= 1, "{job}: {} runs in {sub}/", runs.len());
    runs.pop()
}

/// The run directory in `farm/running` that holds `job`, if any.
pub fn running_run(farm: &Path, job: &str) -> Option<PathBuf> {
    std::fs::read_dir(farm.join("running"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join(job).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swab_and_random_are_what_the_checks_assume() {
        assert_eq!(swab(&[1, 2, 3, 4, 5]), vec![2, 1, 4, 3, 5]);
        let a = random_bytes(1000, 7);
        assert_eq!(a, random_bytes(1000, 7));
        assert_ne!(a, random_bytes(1000, 8));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
