//! Fixtures for the pull mode's end-to-end fault tests: construir-server and construir-runner as
//! child processes on 127.0.0.1 (their logs in files, shown when a test fails), a server that can
//! be killed and started again on the same data directory and port, and a TCP proxy between a
//! runner and the server that can slow the runner's uploads and sees the attempt tokens the
//! server hands out (to replay one the way a runner that lost its lease would).

#![allow(dead_code)]
pub mod browser;
pub mod shared;

use construir_runner::remote::client::{ApiFailure, Client, Payload, http::Method, read_json};
use construir_tests::*;
use construir_tools::pack::JobFile;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A child process killed when dropped (a failed test leaves nothing running).
pub struct Proc {
    pub child: Child,
    _stdout: Option<ChildStdout>,
}

impl Proc {
    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Signals `sig`, then waits for the exit (within `within`); the exit status and how long
    /// it took.
    pub fn stop_with(
        &mut self,
        sig: i32,
        within: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        self.signal(sig);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "pid {} did not exit within {within:?} of signal {sig}",
                self.child.id()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound and let go: the server binds it with SO_REUSEADDR).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `construir-server --data DATA token create`: the token.
pub fn token(data: &Path, name: &str, role: &str) -> String {
    let out = Command::new(binary("construir-server"))
        .arg("--data")
        .arg(data)
        .args(["token", "create", "--name", name, "--role", role])
        .stderr(Stdio::null())
        .output()
        .expect("construir-server token create");
    assert!(out.status.success(), "token create: {}", out.status);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A construir-server on a fixed port of 127.0.0.1, started again there on the same data
/// directory after a kill.
pub struct Server {
    pub data: PathBuf,
    pub port: u16,
    pub url: String,
    pub log: PathBuf,
    args: Vec<String>,
    /// Variables set for it (and its token commands) beyond the test's own.
    pub env: Vec<(String, String)>,
    proc: Option<Proc>,
}

impl Server {
    pub fn new(data: PathBuf, log: PathBuf, args: &[&str]) -> Server {
        let port = free_port();
        Server {
            data,
            port,
            url: format!("http://127.0.0.1:{port}"),
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            proc: None,
        }
    }

    /// The flags it was made with (beyond --data and --listen).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Starts it; returns once it listens (it prints its address on stdout then).
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "the server runs already");
        let started = Instant::now();
        loop {
            let mut child = Command::new(binary("construir-server"))
                .arg("--data")
                .arg(&self.data)
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(&self.args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log_file(&self.log))
                .spawn()
                .expect("start construir-server");
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            if line.trim() == self.url {
                self.proc = Some(Proc {
                    child,
                    _stdout: Some(stdout.into_inner()),
                });
                return;
            }
            // It did not listen (the port not free yet after a kill): again, for a while.
            let _ = child.kill();
            let status = child.wait().unwrap();
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "construir-server did not start on port {} ({status}); its log ends:\n{}",
                self.port,
                tail(&self.log, 20)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill9(&mut self) {
        let mut p = self.proc.take().expect("a running server");
        p.stop_with(libc::SIGKILL, Duration::from_secs(10));
    }

    /// SIGTERM (its graceful stop); how long it took to exit.
    pub fn stop(&mut self, within: Duration) -> Duration {
        let mut p = self.proc.take().expect("a running server");
        let (status, took) = p.stop_with(libc::SIGTERM, within);
        assert!(status.success(), "construir-server stopped with {status}");
        took
    }
}

/// A TCP proxy from a port of its own to the server's: uploads from the runner may be slowed to
/// `rate` bytes a second per connection, and every attempt token in the server's answers is
/// noted. A connection the server drops (killed) is dropped on the runner's side too; a new one
/// while the server is down is closed at once, as a refused connection would be.
pub struct Proxy {
    pub port: u16,
    tokens: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16, rate: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let tokens: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tokens.clone(), stop.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || pipe(down, up, rate, None));
                let t = t.clone();
                std::thread::spawn(move || pipe(u2, d2, None, Some(&t)));
            }
        });
        Proxy { port, tokens, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The attempt tokens the server has handed out through this proxy.
    pub fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

const TOKEN_KEY: &[u8] = b"\"attempt_token\":\"";

/// Copies `from` to `to` until either ends, then shuts both down.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    rate: Option<u64>,
    tokens: Option<&Mutex<BTreeSet<String>>>,
) {
    let mut buf = vec![0u8; 16 << 10];
    // The end of the previous read, so a token cut between two reads is still seen.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(tokens) = tokens {
            carry.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while let Some(i) = find(&carry[at..], TOKEN_KEY) {
                let start = at + i + TOKEN_KEY.len();
                let Some(len) = carry[start..].iter().position(|&b| b == b'"') else {
                    break;
                };
                let token = String::from_utf8_lossy(&carry[start..start + len]).into_owned();
                tokens.lock().unwrap().insert(token);
                at = start + len;
            }
            let keep = carry.len().saturating_sub(256);
            carry.drain(..keep);
        }
        if let Some(rate) = rate {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A server, its users' tokens, and runners against it; the logs of all of them are shown when
/// the test fails.
pub struct Farm {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub server: Server,
    pub submitter: String,
    pub runner_token: PathBuf,
    pub client: Client,
    logs: Mutex<Vec<PathBuf>>,
}

impl Farm {
    /// A server started with `args` (`--lease 10s`, …).
    pub fn start(args: &[&str]) -> Farm {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let data = root.join("server");
        let submitter = token(&data, "alice", "submitter");
        let runner_token = root.join("runner.token");
        std::fs::write(&runner_token, token(&data, "bob", "runner") + "\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runner_token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let log = root.join("server.log");
        let mut server = Server::new(data, log.clone(), args);
        server.start();
        Farm {
            client: Client::new(server.url.clone()),
            dir,
            root,
            server,
            submitter,
            runner_token,
            logs: Mutex::new(vec![log]),
        }
    }

    /// A runner token of user `owner`, in a file of its own (mode 0600).
    pub fn runner_token_of(&self, owner: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.root.join(format!("{owner}.token"));
        std::fs::write(&path, token(&self.server.data, owner, "runner") + "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// A pull runner named `name` (its directory `ROOT/name`, its log `ROOT/name.log`) against
    /// `url` (the server's, or a proxy's), of user bob.
    pub fn runner(&self, name: &str, url: &str, extra: &[&str]) -> Proc {
        self.runner_with(&self.runner_token, name, url, extra)
    }

    /// [`Farm::runner`] with the runner token in `token_file` (another owner's).
    pub fn runner_with(&self, token_file: &Path, name: &str, url: &str, extra: &[&str]) -> Proc {
        let log = self.root.join(format!("{name}.log"));
        self.logs.lock().unwrap().push(log.clone());
        let child = Command::new(binary("construir-runner"))
            .args(["--server", url, "--name", name])
            .arg("--token-file")
            .arg(token_file)
            .arg("--dir")
            .arg(self.root.join(name))
            .args(["--backend", "qemu", "--images-dir"])
            .arg(images_dir("t0"))
            .args(["--max-vcpus", "1", "--max-timeout", "10m"])
            .args(["--max-output-size", "64M", "--grace", "5s"])
            .args(extra)
            .env("CONSTRUIR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&log))
            .spawn()
            .expect("start construir-runner");
        Proc {
            child,
            _stdout: None,
        }
    }

    /// Submits a job file (256 MiB, 1 vCPU, 2 min, 16 MiB of output); its id.
    pub fn submit(&self, job: &Path) -> u64 {
        let name = job.file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(job).unwrap();
        let path = format!(
            "/api/v1/jobs?name={name}&memory_mib=256&vcpus=1&timeout_s=120&output_size={}",
            16 << 20
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

    pub fn job(&self, id: u64) -> serde_json::Value {
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
            .unwrap_or_else(|e| panic!("show job {id}: {e}"));
        read_json(response).unwrap().unwrap()
    }

    /// Polls job `id` every 100 ms until `ok`; the job as it was then.
    pub fn wait(
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
                "job {id} never got {what} within {timeout:?}: {job:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for job `id` to end.
    pub fn wait_end(&self, id: u64, timeout: Duration) -> serde_json::Value {
        self.wait(id, "an end", timeout, |j| {
            !matches!(j["state"].as_str(), Some("queued" | "running"))
        })
    }

    /// GET `path` as the submitter: the body and its `Construir-Sha256` header.
    pub fn get(&self, path: &str) -> (Vec<u8>, Option<String>) {
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

    /// A call with an attempt's token, as its runner would make it: the JSON answer, or the
    /// refusal.
    pub fn attempt_call(
        &self,
        method: Method,
        attempt: u64,
        what: &str,
        token: &str,
        payload: Payload<'_>,
    ) -> Result<serde_json::Value, ApiFailure> {
        let response = self.client.exchange(
            method,
            &format!("/api/v1/runner/attempts/{attempt}/{what}"),
            token,
            &[],
            payload,
            &[],
        )?;
        Ok(read_json(response)
            .ok()
            .flatten()
            .unwrap_or(serde_json::Value::Null))
    }

    /// The client binary against this server, as the submitter, with `args`.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("construir"))
            .args(args)
            .env("CONSTRUIR_SERVER", &self.server.url)
            .env("CONSTRUIR_TOKEN", &self.submitter)
            .output()
            .expect("run construir")
    }

    /// `construir show ID --json`, the client binary against this server.
    pub fn show_json(&self, id: u64) -> serde_json::Value {
        let out = Command::new(binary("construir"))
            .args(["show", &id.to_string(), "--json"])
            .env("CONSTRUIR_SERVER", &self.server.url)
            .env("CONSTRUIR_TOKEN", &self.submitter)
            .output()
            .expect("run construir show");
        assert!(
            out.status.success(),
            "construir show {id} --json: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "construir show --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Fetches job `id`'s output and checks it against the server's own word (its
    /// `Construir-Sha256` header and the result attempt's `output_sha256`), then that `data.bin`
    /// in it is `data`, byte for byte, and that the guest saw the same bytes (its sha256.txt).
    pub fn check_output(&self, id: u64, job: &serde_json::Value, data: &[u8]) {
        let (output, sha) = self.get(&format!("/api/v1/jobs/{id}/output"));
        let digest = sha256_hex(&output);
        assert_eq!(sha.as_deref(), Some(digest.as_str()), "job {id}'s output");
        let result = job["result_attempt"].as_u64().expect("a result attempt");
        let attempt = job["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"].as_u64() == Some(result))
            .expect("the result attempt is listed");
        assert_eq!(attempt["output_sha256"].as_str(), Some(digest.as_str()));
        assert_eq!(attempt["output_size"].as_u64(), Some(output.len() as u64));
        use construir_contract::archive;
        let back = archive::read_file(&output[..], "data.bin", 1 << 30)
            .unwrap()
            .unwrap_or_else(|| panic!("job {id}'s output has no data.bin"));
        assert_eq!(
            sha256_hex(&back),
            sha256_hex(data),
            "job {id}: the bytes out are the bytes in"
        );
        let seen = archive::read_file(&output[..], "sha256.txt", 4096)
            .unwrap()
            .expect("sha256.txt");
        assert!(
            String::from_utf8_lossy(&seen).starts_with(&sha256_hex(data)),
            "job {id}: the guest saw other bytes"
        );
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        show_logs_if_failing(&self.logs);
    }
}

/// The last lines of every log in `logs`, when the test is failing (called from a fixture's drop).
pub fn show_logs_if_failing(logs: &Mutex<Vec<PathBuf>>) {
    if std::thread::panicking() {
        for log in logs.lock().unwrap().iter() {
            eprintln!(
                "----- {} (last lines) -----\n{}",
                log.display(),
                tail(log, 40)
            );
        }
    }
}

/// A job carrying `len` random bytes (seeded by `seed`) that sleeps `sleep_s` seconds in the
/// guest, then writes back a plain tar of `data.bin` (the same bytes) and `sha256.txt` (the
/// guest's sha256 of them).
pub fn echo_job(name: &str, len: usize, seed: u64, sleep_s: u32) -> (TestJob, Vec<u8>) {
    let data = random_bytes(len, seed);
    let script = format!(
        "#!/bin/sh\nset -e\necho {name}: sleeping {sleep_s} s\nsleep {sleep_s}\ncd /opt/job\n\
         sha256sum data.bin > /tmp/sha256.txt\ncp data.bin /tmp/data.bin\n\
         cd /tmp && tar -cf /dev/vdb sha256.txt data.bin\necho {name}: written\n"
    );
    let job = TestJob::new(
        name,
        "t0",
        &[
            JobFile::script(&script),
            JobFile::new("data.bin", data.clone(), 0o644),
        ],
        (len as u64) * 2 + (1 << 20),
    );
    (job, data)
}

/// Processes whose command line mentions `path` (a runner's VMs name their job file, which is
/// under the runner's directory).
pub fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Every blob under `DATA/blobs` is whole: a file named by a sha256 holds bytes with that
/// sha256. Returns how many there are, and the paths of any other files (staging files a killed
/// server left: not visible as blobs, but garbage).
pub fn check_blobs(data: &Path) -> (usize, Vec<PathBuf>) {
    check_blob_tree(&data.join("blobs"))
}

/// [`check_blobs`] for any directory of content-addressed files (the local store's, or an S3
/// server's bucket as s3s-fs keeps it).
pub fn check_blob_tree(root: &Path) -> (usize, Vec<PathBuf>) {
    let (mut n, mut other) = (0, Vec::new());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())) {
                other.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                sha256_hex(&bytes),
                name,
                "blob {} holds other bytes than its name says (half written, yet visible)",
                path.display()
            );
            n += 1;
        }
    }
    (n, other)
}
