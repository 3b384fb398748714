//! A farm on shared storage for the fault tests of several servers: a PostgreSQL database of
//! its own (on the cluster tools/test starts), an S3 server of its own (s3s-fs, which the test
//! stops and starts again), servers on both with the same key, runners with a backend program
//! that does a job's work at once (what is tested is the farm, not the VM), and a balancer in
//! front of the servers. Run by tools/test's second pass (`CONSTRUIR_TEST_BACKENDS=postgres-s3`),
//! never by a plain `cargo test`.

use super::{Proc, Server, free_port, log_file, tail};
use construir_runner::remote::client::{Client, Payload, http::Method, read_json};
use construir_tests::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether this run has PostgreSQL and S3: these tests run only when asked for (Cargo.toml's
/// `test = false`), by tools/test's second pass, which starts both; without them they fail.
pub fn backends_here(test: &str) -> bool {
    assert_eq!(
        std::env::var("CONSTRUIR_TEST_BACKENDS").as_deref(),
        Ok("postgres-s3"),
        "{test} needs PostgreSQL and S3: run it through tools/test, which starts both \
         (CONSTRUIR_TEST_BACKENDS=postgres-s3 and the servers' addresses)"
    );
    true
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (tools/test sets it)"))
}

/// A new database on the test cluster: its URL.
pub fn new_database() -> String {
    let admin = var("CONSTRUIR_TEST_POSTGRES");
    let name = format!("f_{}", &sha256_hex(&random_bytes(16, nanos()))[..16]);
    let out = Command::new("psql")
        .arg(&admin)
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql CREATE DATABASE: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = admin.rsplit_once('/').unwrap().0;
    format!("{base}/{name}")
}

fn nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// PostgreSQL (the test cluster) restarted: `pg_ctl restart -m fast`.
pub fn restart_postgres() {
    let (bin, data) = (var("CONSTRUIR_TEST_PG_BIN"), var("CONSTRUIR_TEST_PG_DATA"));
    let restart =
        format!("'{bin}/pg_ctl' -D '{data}' -m fast -w -t 60 restart -l '{data}/../server.log'");
    // As the cluster's owner (tools/services.sh: the postgres user when run as root).
    // SAFETY: getuid has no preconditions.
    let out = match unsafe { libc::getuid() } {
        0 => Command::new("su")
            .args(["postgres", "-s", "/bin/sh", "-c", &restart])
            .output(),
        _ => Command::new("sh").args(["-c", &restart]).output(),
    }
    .expect("run pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl restart: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An s3s-fs of the test's own, on a port of its own, that can be stopped and started again.
pub struct S3 {
    pub port: u16,
    pub root: PathBuf,
    pub bucket: String,
    log: PathBuf,
    proc: Option<Proc>,
}

impl S3 {
    pub fn start(dir: &Path) -> S3 {
        let root = dir.join("s3");
        let bucket = "farm".to_string();
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let mut s3 = S3 {
            port: free_port(),
            root,
            bucket,
            log: dir.join("s3s-fs.log"),
            proc: None,
        };
        s3.up();
        s3
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        assert!(self.proc.is_none());
        let child = Command::new(var("CONSTRUIR_TEST_S3S_FS"))
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", &var("AWS_ACCESS_KEY_ID")])
            .args(["--secret-key", &var("AWS_SECRET_ACCESS_KEY")])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log))
            .spawn()
            .expect("start s3s-fs");
        self.proc = Some(Proc {
            child,
            _stdout: None,
        });
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "s3s-fs did not listen: {}",
                tail(&self.log, 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: the store is gone until [`S3::up`].
    pub fn down(&mut self) {
        let mut p = self.proc.take().expect("s3s-fs runs");
        p.stop_with(libc::SIGKILL, Duration::from_secs(10));
    }

    /// Every object in the bucket is whole (its bytes hash to its name); how many there are.
    pub fn check_objects(&self) -> usize {
        // (Anything else there, s3s-fs's own files for uploads under way, is not an object.)
        super::check_blob_tree(&self.root.join(&self.bucket)).0
    }
}

/// A backend that does a job at once: reads `data.bin` from the job, writes back a tar of it
/// and its sha256 over the job file (as a guest writes its disk), says success.
const FAKE_BACKEND: &str = r#"#!/bin/sh
set -e
while [ $# -gt 0 ]; do
  case "$1" in --job) job=$2; shift ;; --console) con=$2; shift ;; esac
  shift
done
d=$(mktemp -d)
xz -dc --single-stream "$job" | tar -x -C "$d"
data=$(find "$d" -name data.bin | head -n 1)
echo "fake backend: $(wc -c < "$data") bytes in" > "$con"
sleep 1
cd "$(dirname "$data")"
sha256sum data.bin > sha256.txt
tar -cf - sha256.txt data.bin | dd of="$job" conv=notrunc status=none
rm -rf "$d"
echo '{"status":"success","reason":"job succeeded","job_exit_status":0}'
"#;

/// Several servers on one database and bucket, users' tokens, runners, logs shown on failure.
pub struct SharedFarm {
    pub dir: tempfile::TempDir,
    pub database: String,
    pub s3: S3,
    pub servers: Vec<Server>,
    pub submitter: String,
    pub runner_token: PathBuf,
    pub fake: PathBuf,
    /// The link between the servers and S3 (a balancer with one upstream: it can be slowed).
    pub s3_link: Balancer,
    logs: Mutex<Vec<PathBuf>>,
}

impl SharedFarm {
    /// `n` servers (each its own data directory, the same key), with `args` (`--lease 10s`, …).
    pub fn start(n: usize, args: &[&str]) -> SharedFarm {
        SharedFarm::start_with(n, args, &|_| {})
    }

    /// [`SharedFarm::start`], with `prepare` called on each server's data directory (made,
    /// empty) before the server starts on it.
    pub fn start_with(n: usize, args: &[&str], prepare: &dyn Fn(&Path)) -> SharedFarm {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let database = new_database();
        let s3 = S3::start(&root);
        let s3_link = Balancer::start(vec![s3.port]);
        let store = format!("s3://{}", s3.bucket);
        let mut full: Vec<String> = vec![
            "--database".into(),
            database.clone(),
            "--store".into(),
            store,
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        let mut servers = Vec::new();
        let mut logs = vec![s3.log.clone()];
        for i in 0..n {
            let data = root.join(format!("server{i}"));
            std::fs::create_dir_all(&data).unwrap();
            prepare(&data);
            if i > 0 {
                // The farm's key, the same for all (configuration, like the settings).
                // (Made by server 0 as it starts, just after it prints its address.)
                let key = root.join("server0/server-key");
                let t0 = Instant::now();
                while !key.exists() {
                    assert!(
                        t0.elapsed() < Duration::from_secs(10),
                        "server 0 made no key"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::fs::copy(&key, data.join("server-key")).unwrap();
            }
            let log = root.join(format!("server{i}.log"));
            logs.push(log.clone());
            let mut s = Server::new(data, log, &full);
            s.env = vec![("AWS_ENDPOINT_URL".into(), s3_link.url())];
            s.start();
            servers.push(s);
        }
        let submitter = token(&servers[0], "alice", "submitter");
        let runner_token = root.join("runner.token");
        std::fs::write(&runner_token, token(&servers[0], "bob", "runner") + "\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runner_token, std::fs::Permissions::from_mode(0o600)).unwrap();
        // The backend program boots nothing: an image's manifest is all the runner reads.
        let images = root.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let manifest = serde_json::json!({
            "index": "t0", "description": "no image: the backend program boots nothing",
            "disk": "t0.qcow2", "disk_format": "qcow2", "disk_sha256": "a".repeat(64),
            "virtual_size": 1 << 20, "kernel": "kernels/vmlinux-k", "kernel_sha256": "b".repeat(64),
            "memory_mib": 128, "vcpus": 1, "init_sha256": "c".repeat(64), "installed": [],
            "build_key": "k"
        });
        std::fs::write(images.join("t0.json"), manifest.to_string()).unwrap();
        // (The runner offers an image whose disk and kernel are there; never read here.)
        std::fs::create_dir_all(images.join("kernels")).unwrap();
        std::fs::write(images.join("t0.qcow2"), b"not read").unwrap();
        std::fs::write(images.join("kernels/vmlinux-k"), b"not read").unwrap();
        let fake = root.join("fake-backend");
        std::fs::write(&fake, FAKE_BACKEND).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        SharedFarm {
            dir,
            database,
            s3,
            servers,
            submitter,
            runner_token,
            fake,
            s3_link,
            logs: Mutex::new(logs),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A pull runner against `url`, with the backend that does a job at once.
    pub fn runner(&self, name: &str, url: &str, extra: &[&str]) -> Proc {
        let log = self.root().join(format!("{name}.log"));
        self.logs.lock().unwrap().push(log.clone());
        let child = Command::new(binary("construir-runner"))
            .args(["--server", url, "--name", name])
            .arg("--token-file")
            .arg(&self.runner_token)
            .arg("--dir")
            .arg(self.root().join(name))
            .arg("--backend-program")
            .arg(&self.fake)
            .arg("--images-dir")
            .arg(self.root().join("images"))
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

    pub fn client(&self, url: &str) -> Client {
        Client::new(url.to_string())
    }

    /// Submits `job` through `url`; its id. Retries while the farm answers with a failure
    /// that is not a refusal (a server or the database down for a moment).
    pub fn submit(&self, url: &str, job: &Path) -> u64 {
        let name = job.file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(job).unwrap();
        let path = format!(
            "/api/v1/jobs?name={name}&memory_mib=256&vcpus=1&timeout_s=120&output_size={}&private=false",
            16 << 20
        );
        let t0 = Instant::now();
        loop {
            let r = self.client(url).exchange(
                Method::POST,
                &path,
                &self.submitter,
                &[],
                Payload::Bytes(&bytes),
                &[],
            );
            match r {
                Ok(response) => {
                    let view: serde_json::Value = read_json(response).unwrap().unwrap();
                    return view["id"].as_u64().expect("a job id");
                }
                Err(e) => {
                    assert!(t0.elapsed() < Duration::from_secs(60), "submit: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Job `id` as `url` shows it (retried while the farm does not answer).
    pub fn job(&self, url: &str, id: u64) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let r = self.client(url).exchange(
                Method::GET,
                &format!("/api/v1/jobs/{id}"),
                &self.submitter,
                &[],
                Payload::None,
                &[],
            );
            match r.map(read_json) {
                Ok(Ok(Some(v))) => return v,
                other => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "show job {id}: {other:?}"
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
    }

    /// Waits until every job in `ids` has ended (through `url`); the jobs as they ended.
    pub fn wait_all(&self, url: &str, ids: &[u64], timeout: Duration) -> Vec<serde_json::Value> {
        let t0 = Instant::now();
        let mut ended = Vec::new();
        for &id in ids {
            loop {
                let j = self.job(url, id);
                if !matches!(j["state"].as_str(), Some("queued" | "running")) {
                    ended.push(j);
                    break;
                }
                assert!(
                    t0.elapsed() < timeout,
                    "job {id} did not end within {timeout:?}: {j:#}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        ended
    }

    /// Every job succeeded once (one reported attempt, the result) and its output is the bytes
    /// it carried, read back through `url`.
    pub fn check_all(&self, url: &str, jobs: &[(u64, Vec<u8>)], ended: &[serde_json::Value]) {
        for ((id, data), job) in jobs.iter().zip(ended) {
            assert_eq!(job["state"], "succeeded", "job {id}: {job:#}");
            let reported = job["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["state"] == "reported")
                .count();
            assert_eq!(reported, 1, "job {id} took one result: {job:#}");
            let mut response = self
                .client(url)
                .exchange(
                    Method::GET,
                    &format!("/api/v1/jobs/{id}/output"),
                    &self.submitter,
                    &[],
                    Payload::None,
                    &[],
                )
                .unwrap();
            let output = response
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_vec()
                .unwrap();
            let back = construir_contract::archive::read_file(&output[..], "data.bin", 1 << 30)
                .unwrap()
                .unwrap_or_else(|| panic!("job {id}'s output has no data.bin"));
            assert_eq!(
                sha256_hex(&back),
                sha256_hex(data),
                "job {id}: bytes out = bytes in"
            );
        }
    }
}

impl Drop for SharedFarm {
    fn drop(&mut self) {
        super::show_logs_if_failing(&self.logs);
    }
}

/// A token made through `server`'s database.
pub fn token(server: &Server, name: &str, role: &str) -> String {
    let out = Command::new(binary("construir-server"))
        .arg("--data")
        .arg(&server.data)
        .args(server.args())
        .args(["token", "create", "--name", name, "--role", role])
        .envs(server.env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::inherit())
        .output()
        .expect("construir-server token create");
    assert!(out.status.success(), "token create: {}", out.status);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A TCP balancer in front of several servers: each new connection goes to the next upstream
/// that takes it (a dead one is passed over), as a load balancer with health checks would do.
/// `cut` black-holes every connection while set (nothing goes through either way, as when a
/// link is down; they resume when it clears), `delay` holds each chunk that long.
pub struct Balancer {
    pub port: u16,
    pub cut: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Balancer {
    pub fn start(upstreams: Vec<u16>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, delay_ms, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, dl, s) = (cut.clone(), delay_ms.clone(), stop.clone());
        std::thread::spawn(move || {
            let next = AtomicUsize::new(0);
            for down in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = down else { continue };
                let first = next.fetch_add(1, Ordering::SeqCst);
                let up = (0..upstreams.len()).find_map(|i| {
                    let port = upstreams[(first + i) % upstreams.len()];
                    TcpStream::connect(("127.0.0.1", port)).ok()
                });
                let Some(up) = up else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (c1, c2, dl1, dl2) = (c.clone(), c.clone(), dl.clone(), dl.clone());
                std::thread::spawn(move || faulty_pipe(down, up, &c1, &dl1));
                std::thread::spawn(move || faulty_pipe(u2, d2, &c2, &dl2));
            }
        });
        Balancer {
            port,
            cut,
            delay_ms,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn faulty_pipe(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, delay_ms: &AtomicUsize) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // A cut link carries nothing: the bytes wait here until it is back.
        while cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let d = delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            std::thread::sleep(Duration::from_millis(d as u64));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
