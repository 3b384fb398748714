//! The pull mode end to end against a stand-in server (a few hundred lines of HTTP on a socket,
//! following docs/api.md and construir-api's rules) and a stand-in backend (a shell script with
//! the launchers' command line): the runner binary registers, claims, starts, downloads, runs,
//! streams the console, uploads the output cut at the archive's end and reports; a cancel, a
//! misfit, a flaky server and a SIGTERM each end the way the API says; a job pinned to a
//! published image runs on that image, fetched from the server by digest (resumed after a broken
//! transfer), and one whose image the server serves corrupt is reported, never run. No VM:
//! tests/tests/remote.rs is the same with construir-server and QEMU.

use construir_api::types::{ClaimRequest, ClaimResponse, JobLimits, ReportRequest};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const RUNNER_TOKEN: &str = "runner-secret";
const ATTEMPT_TOKEN: &str = "attempt-secret";

/// Writes its arguments and a lot of lines to the console, an xz archive over the start of the
/// job (stale data after it kept), a copy of that archive where $FAKE_OUT says, and a summary.
/// A job whose content is "sleep" waits for SIGTERM and exits as interrupted.
const BACKEND: &str = r#"#!/bin/sh
args="$*"
while [ $# -gt 0 ]; do
  case "$1" in --job) job=$2; shift ;; --console) con=$2; shift ;; --images-dir) imgs=$2; shift ;; esac
  shift
done
echo "args: $args" > "$con"
# What the launcher would boot: the image's files, as the runner laid them out.
(cd "$imgs" && sha256sum t0.json t0.qcow2 kernels/*) > "$FAKE_OUT/images.sha256"
if [ "$(head -c 5 "$job")" = "sleep" ]; then
  trap 'echo "{\"status\":\"interrupted\",\"reason\":\"interrupted\"}"; exit 106' TERM
  while :; do sleep 0.1; done
fi
i=0; while [ $i -lt 3000 ]; do echo "console line $i of the guest"; i=$((i+1)); done >> "$con"
d=$(mktemp -d); echo "built from $(head -c 4 "$job")" > "$d/out.txt"
tar -cJf "$d/out.tar.xz" -C "$d" out.txt
dd if="$d/out.tar.xz" of="$job" conv=notrunc 2>/dev/null
cp "$d/out.tar.xz" "$FAKE_OUT/expected.tar.xz"
echo '{"status":"success","reason":"job succeeded","job_exit_status":0,"accel":"fake"}'
"#;

#[derive(Default)]
struct State {
    /// Jobs to hand out: (job bytes, limits).
    queue: Vec<(Vec<u8>, JobLimits)>,
    job: Vec<u8>,
    claims: Vec<ClaimRequest>,
    /// The attempts started (their ids).
    started: Vec<String>,
    heartbeats: Vec<serde_json::Value>,
    log: Vec<u8>,
    received: u64,
    output: Option<Vec<u8>>,
    reports: Vec<ReportRequest>,
    aborts: Vec<String>,
    /// Answer heartbeats with cancel: true.
    cancel: bool,
    /// Answer this many report and log requests with a proxy's 503 first.
    flaky: u32,
    /// Answer with this protocol version.
    protocol: Option<&'static str>,
    /// Refuse output uploads (413 `output-too-big`).
    refuse_output: bool,
    /// Answer this many heartbeats with a proxy's 404 (no protocol header) first.
    foreign_heartbeats: u32,
    /// Answer this many claims with a proxy's 429 (no protocol header) first.
    foreign_claims: u32,
    bad_tokens: u32,
    /// Published images: digest → part (`manifest`, `kernel`, `disk`) → bytes.
    images: HashMap<String, HashMap<String, Vec<u8>>>,
    /// The sha256 the server says a part has (its record: a blob overwritten after publishing
    /// keeps it), by digest and part; else that of the bytes.
    image_sha256: HashMap<(String, String), String>,
    /// Jobs are pinned to this digest.
    pin: Option<String>,
    /// Image requests: path and Range header.
    image_requests: Vec<(String, Option<String>)>,
    /// The next transfer of this part is cut after this many bytes.
    cut_image: Option<(String, usize)>,
    /// Image requests wait this long first (a slow line), the state not held meanwhile.
    image_delay: Duration,
}

struct Server {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Server { port, state }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, cv) = &*self.state;
        let r = f(&mut lock.lock().unwrap());
        cv.notify_all();
        r
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&State) -> bool) {
        let start = Instant::now();
        while !self.with(|s| ok(s)) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Method, target, headers (lower-case names), body.
type Request = (String, String, HashMap<String, String>, Vec<u8>);

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((method, target, headers, body))
}

fn respond(mut conn: &TcpStream, status: u16, protocol: Option<&str>, body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(p) = protocol {
        head.push_str(&format!(
            "Construir-Protocol: {p}\r\nContent-Type: application/json\r\n"
        ));
    }
    head.push_str("\r\n");
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body);
}

fn serve(conn: TcpStream, state: &(Mutex<State>, Condvar)) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let Some((method, target, headers, body)) = read_request(&mut reader) else {
        return;
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (lock, cv) = state;
    let mut s = lock.lock().unwrap();
    let protocol = s.protocol.unwrap_or("1");
    assert_eq!(
        headers.get("construir-protocol").map(String::as_str),
        Some("1"),
        "{target}"
    );
    let token = headers.get("authorization").cloned().unwrap_or_default();
    let runner_call = path.starts_with("/api/v1/runner/register")
        || path.starts_with("/api/v1/runner/claim")
        || path.starts_with("/api/v1/images/");
    let want = if runner_call {
        RUNNER_TOKEN
    } else {
        ATTEMPT_TOKEN
    };
    if token != format!("Bearer {want}") {
        s.bad_tokens += 1;
        return respond(
            &conn,
            401,
            Some(protocol),
            br#"{"error":"unauthorized","message":"no"}"#,
        );
    }
    if s.foreign_claims > 0 && path.ends_with("/claim") {
        s.foreign_claims -= 1;
        return respond(&conn, 429, None, b"<html>429 Too Many Requests</html>");
    }
    if s.foreign_heartbeats > 0 && path.ends_with("/heartbeat") {
        s.foreign_heartbeats -= 1;
        return respond(&conn, 404, None, b"<html>404 Not Found (nginx)</html>");
    }
    if s.flaky > 0 && (path.ends_with("/report") || path.ends_with("/log")) {
        s.flaky -= 1;
        return respond(&conn, 503, None, b"<html>bad gateway</html>");
    }
    let json = |v: serde_json::Value| v.to_string().into_bytes();
    if let ("GET", Some(rest)) = (method.as_str(), path.strip_prefix("/api/v1/images/")) {
        s.image_requests
            .push((path.to_string(), headers.get("range").cloned()));
        let delay = s.image_delay;
        if !delay.is_zero() {
            drop(s);
            std::thread::sleep(delay);
            s = lock.lock().unwrap();
        }
        return serve_image(&conn, &mut s, rest, headers.get("range"));
    }
    let (status, answer) = match (method.as_str(), path) {
        ("POST", "/api/v1/runner/register") => (200, json(serde_json::json!({"runner_id": 7}))),
        ("POST", "/api/v1/runner/claim") => {
            assert_eq!(
                headers.get("construir-runner").map(String::as_str),
                Some("7")
            );
            let claim: ClaimRequest = serde_json::from_slice(&body).expect("a claim");
            claim.validate().expect("a valid claim");
            s.claims.push(claim);
            if s.queue.is_empty() {
                s = cv.wait_timeout(s, Duration::from_millis(500)).unwrap().0;
            }
            if s.queue.is_empty() {
                (204, Vec::new())
            } else {
                let (job, limits) = s.queue.remove(0);
                let offer = ClaimResponse {
                    attempt_id: construir_api::types::AttemptId(s.claims.len() as u64),
                    attempt_token: ATTEMPT_TOKEN.into(),
                    job_id: construir_api::types::JobId(1),
                    job_name: "hello_t0.tar.xz".into(),
                    image: "t0".into(),
                    image_digest: s.pin.clone(),
                    sha256: sha256_hex(&job),
                    size: job.len() as u64,
                    limits,
                    accept_by_ms: u64::MAX / 2,
                    lease_until_ms: u64::MAX / 2,
                    heartbeat_interval_s: 1,
                    lease_s: 30,
                    clock_s: None,
                };
                s.job = job;
                s.log.clear();
                s.received = 0;
                (200, serde_json::to_vec(&offer).unwrap())
            }
        }
        ("GET", p) if p.ends_with("/job") => (200, s.job.clone()),
        ("POST", p) if p.ends_with("/start") => {
            let id = p.trim_end_matches("/start").rsplit('/').next().unwrap();
            s.started.push(id.to_string());
            (
                200,
                json(serde_json::json!({"lease_until_ms": 1, "cancel": false})),
            )
        }
        ("POST", p) if p.ends_with("/heartbeat") => {
            s.heartbeats.push(serde_json::from_slice(&body).unwrap());
            (
                200,
                json(serde_json::json!({"lease_until_ms": 1, "cancel": s.cancel})),
            )
        }
        ("PATCH", p) if p.ends_with("/log") => {
            let offset: u64 = query.strip_prefix("offset=").unwrap().parse().unwrap();
            let plan =
                construir_api::log::plan_append(s.received, offset, body.len() as u64, u64::MAX);
            let kept = body[plan.skip as usize..(plan.skip + plan.keep) as usize].to_vec();
            s.log.extend_from_slice(&kept);
            s.received = plan.next_offset;
            (
                plan.kind.http_status(),
                json(serde_json::json!({"next_offset": plan.next_offset})),
            )
        }
        ("PUT", p) if p.ends_with("/output") && s.refuse_output => (
            413,
            json(serde_json::json!({"error": "output-too-big", "message": "over the limit"})),
        ),
        ("PUT", p) if p.ends_with("/output") => {
            let answer = json(serde_json::json!({"sha256": sha256_hex(&body), "size": body.len()}));
            s.output = Some(body);
            (201, answer)
        }
        ("POST", p) if p.ends_with("/report") => {
            let report: ReportRequest = serde_json::from_slice(&body).expect("a report");
            report.validate().expect("a valid report");
            s.reports.push(report);
            (200, json(serde_json::json!({})))
        }
        ("POST", p) if p.ends_with("/abort") => {
            let abort: serde_json::Value = serde_json::from_slice(&body).unwrap();
            s.aborts.push(abort["reason"].as_str().unwrap().to_string());
            (200, json(serde_json::json!({})))
        }
        _ => (
            404,
            json(serde_json::json!({"error": "not-found", "message": target})),
        ),
    };
    drop(s);
    cv.notify_all();
    respond(&conn, status, Some(protocol), &answer);
}

/// `GET /api/v1/images/DIGEST/PART` as docs/api.md says: the part's bytes with its sha256, one
/// `bytes=N-` range (206), 416 past the end, 404 for what is not published.
fn serve_image(mut conn: &TcpStream, s: &mut State, rest: &str, range: Option<&String>) {
    let (digest, part) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(bytes) = s.images.get(digest).and_then(|i| i.get(part)).cloned() else {
        return respond(
            conn,
            404,
            Some("1"),
            br#"{"error":"not-found","message":"no image published under that digest"}"#,
        );
    };
    let sha = s
        .image_sha256
        .get(&(digest.to_string(), part.to_string()))
        .cloned()
        .unwrap_or_else(|| sha256_hex(&bytes));
    let from: usize = range
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or(0);
    let len = bytes.len();
    if from > 0 && from >= len {
        let head = format!(
            "HTTP/1.1 416 X\r\nConstruir-Protocol: 1\r\nContent-Range: bytes */{len}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        let _ = conn.write_all(head.as_bytes());
        return;
    }
    let (status, extra) = if from > 0 {
        (
            206,
            format!("Content-Range: bytes {from}-{}/{len}\r\n", len - 1),
        )
    } else {
        (200, String::new())
    };
    let body = &bytes[from..];
    let head = format!(
        "HTTP/1.1 {status} X\r\nConstruir-Protocol: 1\r\nConstruir-Sha256: {sha}\r\n{extra}\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    // A broken transfer: the connection closes part way, the length promised not met.
    let cut = match s.cut_image.take() {
        Some((p, at)) if p == part => at.min(body.len()),
        other => {
            s.cut_image = other;
            body.len()
        }
    };
    let _ = conn.write_all(&body[..cut]);
}

struct Runner {
    child: Child,
    _dir: tempfile::TempDir,
    out: PathBuf,
}

impl Runner {
    fn start(server: &Server, extra: &[&str]) -> Runner {
        Runner::start_with(server, extra, true)
    }

    /// A runner whose --images-dir holds t0 (`local_image`), or is empty.
    fn start_with(server: &Server, extra: &[&str], local_image: bool) -> Runner {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        if local_image {
            write_local_t0(&images);
        }
        let backend = dir.path().join("backend");
        std::fs::write(&backend, BACKEND).unwrap();
        std::fs::set_permissions(&backend, std::fs::Permissions::from_mode(0o755)).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{RUNNER_TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_construir-runner"))
            .args(["--server", &format!("http://127.0.0.1:{}", server.port)])
            .arg("--token-file")
            .arg(&token)
            .arg("--dir")
            .arg(dir.path().join("farm"))
            .arg("--images-dir")
            .arg(&images)
            .arg("--backend-program")
            .arg(&backend)
            .args([
                "--jobs",
                "1",
                "--max-memory",
                "1G",
                "--max-vcpus",
                "2",
                "--grace",
                "1s",
            ])
            .args(extra)
            .env("FAKE_OUT", &out)
            // Proxies that do not exist: a loopback server is never reached through one.
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Runner {
            child,
            _dir: dir,
            out,
        }
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the runner did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // A failed test must not leave its runner behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Image t0 in an images directory, as image/build leaves it (its sha256s made up: the stand-in
/// backend boots nothing).
fn write_local_t0(images: &std::path::Path) {
    std::fs::create_dir_all(images.join("kernels")).unwrap();
    let manifest = serde_json::json!({
        "index": "t0", "description": "test", "disk": "t0.qcow2", "disk_format": "qcow2",
        "disk_sha256": "a".repeat(64), "virtual_size": 1 << 20, "kernel": "kernels/vmlinux-k",
        "kernel_sha256": "b".repeat(64), "memory_mib": 128, "vcpus": 1,
        "init_sha256": "c".repeat(64), "installed": [], "build_key": "k"
    });
    std::fs::write(images.join("t0.json"), manifest.to_string()).unwrap();
    std::fs::write(images.join("t0.qcow2"), b"disk").unwrap();
    std::fs::write(images.join("kernels/vmlinux-k"), b"kernel").unwrap();
}

/// Publishes image t0 on the stand-in server (a disk of `disk_len` bytes) and pins jobs to it;
/// returns its digest and its parts.
fn publish_t0(server: &Server, disk_len: usize) -> (String, HashMap<String, Vec<u8>>) {
    let kernel = b"an ELF vmlinux, as far as the stand-in backend cares".to_vec();
    let disk: Vec<u8> = (0..disk_len).map(|i| (i % 253) as u8).collect();
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "index": "t0", "description": "published", "disk": "t0.qcow2", "disk_format": "qcow2",
        "disk_sha256": sha256_hex(&disk), "virtual_size": 1 << 20,
        "kernel": "kernels/vmlinux-p", "kernel_sha256": sha256_hex(&kernel), "memory_mib": 128,
        "vcpus": 1, "init_sha256": "c".repeat(64), "installed": [], "build_key": "k"
    }))
    .unwrap();
    let digest = sha256_hex(&manifest);
    let parts: HashMap<String, Vec<u8>> = [
        ("manifest".to_string(), manifest),
        ("kernel".to_string(), kernel),
        ("disk".to_string(), disk),
    ]
    .into();
    server.with(|s| {
        s.images.insert(digest.clone(), parts.clone());
        s.pin = Some(digest.clone());
    });
    (digest, parts)
}

fn limits() -> JobLimits {
    JobLimits {
        timeout_s: 60,
        output_size: 1 << 20,
        console_cap: 1 << 20,
        memory_mib: 256,
        vcpus: 1,
    }
}

/// A job file: its first bytes say what the fake backend does; padded like a real one.
fn job(content: &[u8]) -> Vec<u8> {
    let mut j = content.to_vec();
    j.resize(256 << 10, 0);
    j.extend(b"stale tail");
    j.resize(512 << 10, 0);
    j
}

fn no_namespaces() -> bool {
    let p = construir_runner::netns::probe();
    if p.isolation == construir_runner::netns::Isolation::None {
        eprintln!(
            "\n!!!!!!!!!! NOT RUN: no network namespace can be made here; the pull mode refuses to start !!!!!!!!!!\n"
        );
        return true;
    }
    false
}

#[test]
fn a_job_is_claimed_run_streamed_uploaded_cut_and_reported() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    server.with(|s| {
        s.queue.push((job(b"ABCD"), limits()));
        s.flaky = 3;
    });
    let mut runner = Runner::start(&server, &[]);
    server.wait_for("the report", Duration::from_secs(60), |s| {
        !s.reports.is_empty()
    });
    let expected = std::fs::read(runner.out.join("expected.tar.xz")).unwrap();
    server.with(|s| {
        let claim = &s.claims[0];
        assert_eq!(claim.wait_s, 25);
        let caps = &claim.capabilities;
        assert_eq!(caps.arch, std::env::consts::ARCH);
        assert_eq!(caps.images, ["t0"]);
        assert_eq!((caps.max_memory_mib, caps.max_vcpus), (1024, 2));
        assert_eq!((caps.free_slots, caps.free_memory_mib), (1, 1024));
        assert_eq!(s.started, ["1"]);
        let report = &s.reports[0];
        assert_eq!(report.status.as_str(), "success", "{report:?}");
        assert_eq!(report.job_exit_status, Some(0));
        // The output is the archive the job wrote, not the padded disk behind it.
        let output = s.output.as_ref().expect("an output");
        assert_eq!(output.len(), expected.len());
        assert!(
            *output == expected,
            "the output is the archive, byte for byte"
        );
        // The whole console, in order, every byte once, with the limits on the command line.
        let log = String::from_utf8_lossy(&s.log);
        assert!(
            log.starts_with("args: --job "),
            "{}",
            &log[..100.min(log.len())]
        );
        assert!(
            log.contains("--memory 256M --vcpus 1 --console-cap 1048576"),
            "{}",
            &log[..300]
        );
        assert!(log.ends_with("console line 2999 of the guest\n"));
        assert_eq!(log.lines().count(), 3001);
        assert!(s.aborts.is_empty(), "{:?}", s.aborts);
        assert_eq!(s.bad_tokens, 0);
    });
    // Its run directory is gone; it claims again, with the slot free again.
    server.wait_for("the next claim", Duration::from_secs(10), |s| {
        s.claims.len() >= 2
    });
    server.with(|s| assert_eq!(s.claims.last().unwrap().capabilities.free_memory_mib, 1024));
    assert!(runner.stop().success());
}

#[test]
fn an_output_the_server_did_not_take_is_aborted_not_reported_as_a_success() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    server.with(|s| {
        s.queue.push((job(b"ABCD"), limits()));
        s.refuse_output = true;
    });
    let mut runner = Runner::start(&server, &[]);
    server.wait_for("the abort", Duration::from_secs(60), |s| {
        !s.aborts.is_empty() || !s.reports.is_empty()
    });
    server.with(|s| {
        assert!(s.reports.is_empty(), "{:?}", s.reports);
        assert_eq!(s.aborts.len(), 1);
        assert!(
            s.aborts[0].contains("output was not delivered") && s.aborts[0].contains("413"),
            "{:?}",
            s.aborts
        );
    });
    assert!(runner.stop().success());
}

#[test]
fn a_proxys_own_answers_are_neither_a_protocol_mismatch_nor_a_lost_lease() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    server.with(|s| {
        s.queue.push((job(b"ABCD"), limits()));
        s.foreign_heartbeats = 2;
        s.foreign_claims = 2;
    });
    let mut runner = Runner::start(&server, &[]);
    server.wait_for("the report", Duration::from_secs(60), |s| {
        !s.reports.is_empty() || !s.aborts.is_empty()
    });
    server.with(|s| {
        assert_eq!(
            (s.foreign_claims, s.foreign_heartbeats),
            (0, 0),
            "the proxy answered"
        );
        assert!(s.aborts.is_empty(), "{:?}", s.aborts);
        assert_eq!(s.reports[0].status.as_str(), "success");
        assert!(s.output.is_some());
    });
    assert!(runner.stop().success());
}

#[test]
fn sigterm_aborts_running_attempts_after_the_grace_period() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    server.with(|s| s.queue.push((job(b"sleep"), limits())));
    let mut runner = Runner::start(&server, &[]);
    server.wait_for("the VM to run", Duration::from_secs(30), |s| {
        s.heartbeats.iter().any(|h| h["phase"] == "running")
    });
    let t = Instant::now();
    let status = runner.stop();
    assert!(status.success(), "{status}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    server.with(|s| {
        assert_eq!(s.aborts, ["runner stopped (SIGTERM)"]);
        assert!(s.reports.is_empty());
    });
}

#[test]
fn a_cancel_stops_the_vm_and_an_offer_beyond_the_limits_is_refused() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    let greedy = JobLimits {
        memory_mib: 2048,
        ..limits()
    };
    server.with(|s| {
        s.queue.push((job(b"ABCD"), greedy));
        s.queue.push((job(b"sleep"), limits()));
    });
    let mut runner = Runner::start(&server, &[]);
    server.wait_for("the refusal", Duration::from_secs(30), |s| {
        !s.aborts.is_empty()
    });
    server.with(|s| {
        assert!(s.aborts[0].contains("cannot take it"), "{:?}", s.aborts);
        assert!(!s.started.contains(&"1".to_string()), "never started");
    });
    server.wait_for("the VM to run", Duration::from_secs(30), |s| {
        s.heartbeats.iter().any(|h| h["phase"] == "running")
    });
    server.with(|s| s.cancel = true);
    server.wait_for("the abort", Duration::from_secs(30), |s| {
        s.aborts.len() == 2
    });
    server.with(|s| assert!(s.aborts[1].contains("canceled"), "{:?}", s.aborts));
    assert!(runner.stop().success());
}

#[test]
fn a_server_of_another_protocol_version_stops_the_runner_with_a_clear_error() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    server.with(|s| s.protocol = Some("2"));
    let mut runner = Runner::start(&server, &[]);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = runner.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "it should stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
}

#[test]
fn plain_http_to_another_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_construir-runner"))
        .args(["--server", "http://farm.example.org"])
        .arg("--token-file")
        .arg(&token)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure"), "{err}");
}

#[test]
fn a_job_pinned_to_a_digest_runs_on_the_image_fetched_from_the_server() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    let (digest, parts) = publish_t0(&server, 600_000);
    server.with(|s| {
        s.queue.push((job(b"ABCD"), limits()));
        // The disk's first transfer breaks off: the runner asks for the rest only.
        s.cut_image = Some(("disk".into(), 250_000));
        // Slow enough for heartbeats (every second here) to go out while it fetches.
        s.image_delay = Duration::from_millis(800);
    });
    // Nothing in --images-dir: everything comes from the server.
    let mut runner = Runner::start_with(&server, &["--cache-size", "1G"], false);
    server.wait_for("the report", Duration::from_secs(60), |s| {
        !s.reports.is_empty() || !s.aborts.is_empty()
    });
    server.with(|s| {
        assert!(s.aborts.is_empty(), "{:?}", s.aborts);
        assert_eq!(s.reports[0].status.as_str(), "success", "{:?}", s.reports);
        let caps = &s.claims[0].capabilities;
        assert!(caps.images.is_empty(), "{:?}", caps.images);
        assert!(caps.fetch_images && caps.image_digests.is_empty());
        assert_eq!(caps.image_cache_bytes, 1 << 30);
        let base = format!("/api/v1/images/{digest}");
        let asked: Vec<(String, Option<String>)> = s.image_requests.clone();
        assert_eq!(
            asked,
            [
                (format!("{base}/manifest"), None),
                (format!("{base}/kernel"), None),
                (format!("{base}/disk"), None),
                (format!("{base}/disk"), Some("bytes=250000-".into())),
            ]
        );
        // The VM was given the digest's directory, holding exactly the published bits.
        let log = String::from_utf8_lossy(&s.log);
        assert!(
            log.contains(&format!("image-cache/{digest} ")),
            "{}",
            &log[..300.min(log.len())]
        );
        // The heartbeats held the lease while it fetched.
        assert!(
            s.heartbeats.iter().any(|h| h["phase"] == "downloading"),
            "{:?}",
            s.heartbeats
        );
    });
    let listed = std::fs::read_to_string(runner.out.join("images.sha256")).unwrap();
    for (name, part) in [
        ("t0.json", "manifest"),
        ("t0.qcow2", "disk"),
        ("kernels/vmlinux-p", "kernel"),
    ] {
        let line = format!("{}  {name}", sha256_hex(&parts[part]));
        assert!(listed.contains(&line), "{line} in {listed}");
    }
    assert_eq!(sha256_hex(&parts["manifest"]), digest);
    // The next claim says it holds the digest; a second job of it fetches nothing.
    server.wait_for("the next claim", Duration::from_secs(10), |s| {
        s.claims.len() >= 2
    });
    server.with(|s| {
        assert_eq!(
            s.claims.last().unwrap().capabilities.image_digests,
            [digest.as_str()]
        );
        s.queue.push((job(b"EFGH"), limits()));
    });
    server.wait_for("the second report", Duration::from_secs(60), |s| {
        s.reports.len() >= 2
    });
    server.with(|s| {
        s.image_delay = Duration::ZERO;
        assert_eq!(s.reports[1].status.as_str(), "success");
        assert_eq!(s.image_requests.len(), 4, "nothing fetched again");
    });
    assert!(runner.stop().success());
}

#[test]
fn an_image_the_server_serves_corrupt_is_refused_and_reported_never_run() {
    if no_namespaces() {
        return;
    }
    let server = Server::start();
    let (digest, parts) = publish_t0(&server, 200_000);
    server.with(|s| {
        // The blob overwritten after publishing: the server still says the published sha256.
        let disk = s.images.get_mut(&digest).unwrap().get_mut("disk").unwrap();
        disk[100_000] ^= 0xff;
        s.image_sha256
            .insert((digest.clone(), "disk".into()), sha256_hex(&parts["disk"]));
        s.queue.push((job(b"ABCD"), limits()));
    });
    let mut runner = Runner::start_with(&server, &[], false);
    server.wait_for("the report", Duration::from_secs(60), |s| {
        !s.reports.is_empty() || !s.aborts.is_empty()
    });
    let corrupt = server.with(|s| sha256_hex(&s.images[&digest]["disk"]));
    server.with(|s| {
        assert!(s.aborts.is_empty(), "{:?}", s.aborts);
        let report = &s.reports[0];
        assert_eq!(report.status.as_str(), "unknown-image", "{report:?}");
        assert!(
            report.reason.contains("disk")
                && report.reason.contains(&corrupt)
                && report.reason.contains(&sha256_hex(&parts["disk"])),
            "{}",
            report.reason
        );
        assert!(s.output.is_none(), "nothing uploaded");
        assert!(s.log.is_empty(), "no console: the VM never started");
        assert!(!s.heartbeats.iter().any(|h| h["phase"] == "running"));
    });
    assert!(
        !runner.out.join("images.sha256").exists(),
        "the backend never ran"
    );
    assert!(runner.stop().success());
}
