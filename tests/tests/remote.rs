//! The pull mode end to end: construir-server and construir-runner --server as child processes,
//! a real VM (QEMU with TCG, image t0), jobs submitted over HTTP (the runner's own client: ureq,
//! the protocol header checked). The output the server hands back is the archive the job wrote,
//! cut at its end, byte for byte; a SIGTERM on the runner gives its attempt back at once.

use construir_contract::archive;
use construir_runner::remote::client::{Client, Payload, http::Method, read_json};
use construir_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped (a failed test leaves nothing running).
struct Proc(Child);

impl Proc {
    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, sig) };
    }

    /// SIGTERM, then its exit status (within `within`).
    fn stop(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "did not stop within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Farm {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: String,
    server: Proc,
    submitter: String,
    runner_token: PathBuf,
    client: Client,
}

fn token(data: &Path, name: &str, role: &str) -> String {
    let out = Command::new(binary("construir-server"))
        .arg("--data")
        .arg(data)
        .args(["token", "create", "--name", name, "--role", role])
        .stderr(Stdio::inherit())
        .output()
        .expect("construir-server token create");
    assert!(out.status.success(), "token create: {}", out.status);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Farm {
    fn start() -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("server");
        let submitter = token(&data, "alice", "submitter");
        let runner_token = root.join("runner.token");
        std::fs::write(&runner_token, token(&data, "bob", "runner") + "\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runner_token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Proc(
            Command::new(binary("construir-server"))
                .arg("--data")
                .arg(&data)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start construir-server"),
        );
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Farm {
            _dir: dir,
            root,
            client: Client::new(base.clone()),
            base,
            server,
            submitter,
            runner_token,
        }
    }

    fn runner(&self, extra: &[&str]) -> Proc {
        Proc(
            Command::new(binary("construir-runner"))
                .args(["--server", &self.base])
                .arg("--token-file")
                .arg(&self.runner_token)
                .arg("--dir")
                .arg(self.root.join("runner"))
                .args(["--backend", "qemu", "--images-dir"])
                .arg(images_dir("t0"))
                .args(["--jobs", "1", "--max-memory", "1G", "--max-vcpus", "1"])
                .args(["--max-timeout", "10m", "--max-output-size", "64M"])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start construir-runner"),
        )
    }

    /// Submits a job file; its id.
    fn submit(&self, job: &Path) -> u64 {
        let name = job.file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(job).unwrap();
        let path = format!(
            "/api/v1/jobs?name={name}&memory_mib=256&vcpus=1&timeout_s=120&output_size=4194304"
        );
        let response = self
            .client
            .exchange(
                Method::POST,
                &path,
                &self.submitter,
                &[],
                Payload::Bytes(&bytes),
                &[],
            )
            .expect("submit");
        let view: serde_json::Value = read_json(response).unwrap().unwrap();
        view["id"].as_u64().expect("a job id")
    }

    fn job(&self, id: u64) -> serde_json::Value {
        let response = self
            .client
            .exchange(
                Method::GET,
                &format!("/api/v1/jobs/{id}"),
                &self.submitter,
                &[],
                Payload::None,
                &[],
            )
            .expect("show the job");
        read_json(response).unwrap().unwrap()
    }

    fn wait(
        &self,
        id: u64,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let job = self.job(id);
            if ok(&job) {
                return job;
            }
            assert!(
                start.elapsed() < timeout,
                "job {id} never got {what}: {job:#}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn get(&self, path: &str) -> (Vec<u8>, Option<String>) {
        let mut response = self
            .client
            .exchange(Method::GET, path, &self.submitter, &[], Payload::None, &[])
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let sha = response
            .headers()
            .get("Construir-Sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .unwrap();
        (body, sha)
    }
}

#[test]
fn a_submitted_job_runs_on_a_pull_runner_and_its_output_comes_back_byte_for_byte() {
    let mut farm = Farm::start();
    let mut runner = farm.runner(&[]);
    let (job, data) = data_job("t0", 300_000);
    let id = farm.submit(&job.path);
    let done = farm.wait(id, "an end", Duration::from_secs(240), |j| {
        !matches!(j["state"].as_str(), Some("queued" | "running"))
    });
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let attempt = &done["attempts"][0];
    assert_eq!(attempt["status"], "success");
    let (output, sha) = farm.get(&format!("/api/v1/jobs/{id}/output"));
    assert_eq!(sha.as_deref(), Some(sha256_hex(&output).as_str()));
    assert_eq!(attempt["output_size"].as_u64(), Some(output.len() as u64));
    // The archive and nothing after it: it ends exactly where the upload ends.
    let end = archive::archive_end(&output[..], &archive::Limits::DEFAULT, u64::MAX).unwrap();
    assert_eq!(end.len, output.len() as u64);
    assert!(
        output.len() < 2 * data.len(),
        "not the padded disk: {} bytes",
        output.len()
    );
    let swapped = archive::read_file(&output[..], "swab.bin", 1 << 30)
        .unwrap()
        .unwrap();
    assert!(
        swapped == swab(&data),
        "the guest's byte-swapped copy, byte for byte"
    );
    let sums = archive::read_file(&output[..], "sha256.txt", 4096)
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&sums).starts_with(&sha256_hex(&data)));
    // The console arrived while it ran, whole.
    let (log, _) = farm.get(&format!("/api/v1/jobs/{id}/log"));
    assert!(!log.is_empty());
    assert_eq!(attempt["console_size"].as_u64(), Some(log.len() as u64));
    assert!(runner.stop(Duration::from_secs(60)).success());
    farm.server.stop(Duration::from_secs(30));
}

#[test]
fn sigterm_on_the_runner_gives_its_attempt_back_at_once() {
    let mut farm = Farm::start();
    let mut runner = farm.runner(&["--grace", "1s"]);
    let job = TestJob::new(
        "sleepy",
        "t0",
        &[construir_tools::pack::JobFile::script(
            "#!/bin/sh\necho started; sleep 300\n",
        )],
        1 << 20,
    );
    let id = farm.submit(&job.path);
    farm.wait(id, "a running VM", Duration::from_secs(120), |j| {
        j["attempts"][0]["phase"] == "running"
    });
    let t = Instant::now();
    assert!(runner.stop(Duration::from_secs(60)).success());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // Not blamed, not left to wait out the lease: aborted, and the job is queued again.
    let job = farm.job(id);
    assert_eq!(job["state"], "queued", "{job:#}");
    assert_eq!(job["attempts"][0]["state"], "aborted", "{job:#}");
    let why = job["attempts"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("runner stopped (SIGTERM)"), "{why}");
    farm.server.stop(Duration::from_secs(30));
}
