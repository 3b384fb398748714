//! `construir`, the submitter's client, against a real construir-server on loopback (no runner:
//! the jobs stay queued until they are canceled).

use construir_tests::*;
use construir_tools::pack::{JobFile, write_job};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A construir-server on 127.0.0.1, a port of its own choosing; killed when dropped.
struct Server {
    child: Child,
    url: String,
    token_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let made = Command::new(binary("construir-server"))
            .arg("--data")
            .arg(&data)
            .args(["token", "create", "--name", "u", "--role", "submitter"])
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &made.stdout).unwrap();
        let mut child = Command::new(binary("construir-server"))
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // It prints its address on stdout, one line, once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().to_string();
        assert!(url.starts_with("http://127.0.0.1:"), "{url:?}");
        Server {
            child,
            url,
            token_file,
            dir,
        }
    }

    /// `construir ARGS` against this server, with the token from its file.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary("construir"));
        c.args(args)
            .arg("--server")
            .arg(&self.url)
            .arg("--token-file")
            .arg(&self.token_file)
            .env_remove("CONSTRUIR_SERVER")
            .env_remove("CONSTRUIR_TOKEN");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code, with the output to show when it is not the one expected.
fn expect(out: &Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn show_json(server: &Server, id: &str) -> serde_json::Value {
    let out = server.run(&["show", id, "--json"]);
    serde_json::from_str(&expect(&out, 0)).unwrap()
}

fn job_dir(root: &Path) -> PathBuf {
    let dir = root.join("hello-dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("construir"), "#!/bin/sh\necho hi\n").unwrap();
    dir
}

#[test]
fn submit_show_list_and_cancel_against_a_real_server() {
    let server = Server::start();
    let root = server.dir.path();

    // A directory, packed as construir-pack packs it.
    let dir = job_dir(root);
    let out = server.run(&[
        "submit",
        "--dir",
        dir.to_str().unwrap(),
        "--image",
        "t0",
        "--output-size",
        "1M",
        "--priority",
        "3",
    ]);
    let packed_id = expect(&out, 0).trim().to_string();
    assert!(
        packed_id.parse::<u64>().is_ok(),
        "one line, the id: {packed_id:?}"
    );
    let packed = show_json(&server, &packed_id);
    assert_eq!(packed["name"], "hello-dir_t0.tar.xz");
    assert_eq!(
        (packed["image"].as_str(), packed["priority"].as_i64()),
        (Some("t0"), Some(3))
    );
    assert_eq!(packed["size"], 1 << 20, "padded to --output-size");
    assert_eq!(packed["limits"]["output_size"], 1 << 20);

    // A job file, with limits: only those given are sent, the rest are the server's.
    let job = root.join("hello_t0.tar.xz");
    write_job(&job, &[JobFile::script("#!/bin/sh\ntrue\n")], 1 << 16).unwrap();
    let out = server.run(&[
        "submit",
        job.to_str().unwrap(),
        "--memory",
        "256M",
        "--timeout",
        "5m",
        "--vcpus",
        "1",
    ]);
    let id = expect(&out, 0).trim().to_string();
    let view = show_json(&server, &id);
    assert_eq!(view["state"], "queued");
    assert_eq!(view["name"], "hello_t0.tar.xz");
    assert_eq!(view["image"], "t0", "from the job's name");
    assert_eq!(view["limits"]["memory_mib"], 256);
    assert_eq!(view["limits"]["timeout_s"], 300);
    assert_eq!(view["limits"]["vcpus"], 1);
    assert_eq!(
        view["attempts"],
        serde_json::json!([]),
        "attempts are a list"
    );
    assert_eq!(view["sha256"], sha256_hex(&std::fs::read(&job).unwrap()));

    // The readable summary.
    let summary = expect(&server.run(&["show", &id]), 0);
    assert!(
        summary.contains(&format!("job {id}: hello_t0.tar.xz")),
        "{summary}"
    );
    assert!(summary.contains("state     queued"), "{summary}");
    assert!(summary.contains("memory 256 MiB, 1 vCPU"), "{summary}");

    // The table and the JSON list, newest first.
    let table = expect(&server.run(&["list"]), 0);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[0].contains("ID") && rows[0].contains("CREATED"),
        "{table}"
    );
    assert!(
        rows[1].trim_start().starts_with(&format!("{id} ")),
        "{table}"
    );
    assert!(
        rows[1].contains("queued") && rows[1].contains("hello_t0.tar.xz"),
        "{table}"
    );
    assert!(rows[2].contains("hello-dir_t0.tar.xz"), "{table}");
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&expect(&server.run(&["list", "--json"]), 0)).unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"].to_string(), id);

    // No console yet: said, not an error.
    let out = server.run(&["logs", &id]);
    assert_eq!(expect(&out, 0), "");
    assert!(
        text(&out.stderr).contains("no runner has taken it yet"),
        "{}",
        text(&out.stderr)
    );
    // Nothing to fetch before the end.
    let fetched = root.join("fetched");
    expect(
        &server.run(&["fetch", &id, "-o", fetched.to_str().unwrap()]),
        112,
    );

    // Cancel: the queued job ends at once; twice is refused.
    let out = server.run(&["cancel", &id]);
    assert!(expect(&out, 0).contains(&format!("job {id} canceled")));
    assert_eq!(show_json(&server, &id)["state"], "canceled");
    let again = server.run(&["cancel", &id]);
    expect(&again, 112);
    assert!(
        text(&again.stderr).contains("job-finished"),
        "{}",
        text(&again.stderr)
    );

    // A canceled job: fetch writes its record and exits 110.
    expect(
        &server.run(&["fetch", &id, "-o", fetched.to_str().unwrap()]),
        110,
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fetched.join("record.json")).unwrap()).unwrap();
    assert_eq!(record["state"], "canceled");
    // logs --follow of an ended job ends at once, with the job's code.
    expect(&server.run(&["logs", &id, "--follow"]), 110);

    // Someone else's or no job: refused.
    expect(&server.run(&["show", "999999"]), 112);
    // A bad token: refused.
    let bad = root.join("bad-token");
    std::fs::write(&bad, "not-a-token\n").unwrap();
    let out = Command::new(binary("construir"))
        .args(["list", "--server", &server.url, "--token-file"])
        .arg(&bad)
        .output()
        .unwrap();
    expect(&out, 112);
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn submit_wait_ends_with_the_jobs_code_when_it_is_canceled() {
    let server = Server::start();
    let dir = job_dir(server.dir.path());
    let mut waiting = server
        .command(&[
            "submit",
            "--dir",
            dir.to_str().unwrap(),
            "--image",
            "t0",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut id = String::new();
    BufReader::new(waiting.stdout.take().unwrap())
        .read_line(&mut id)
        .unwrap();
    let id = id.trim().to_string();
    assert!(id.parse::<u64>().is_ok(), "{id:?}");
    expect(&server.run(&["cancel", &id]), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = waiting.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "submit --wait did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(110), "canceled");
}

#[test]
fn settings_and_unreachable_servers_have_their_codes() {
    let client = || {
        let mut c = Command::new(binary("construir"));
        c.env_remove("CONSTRUIR_SERVER")
            .env_remove("CONSTRUIR_TOKEN");
        c
    };
    // No server, no token: bad usage.
    expect(&client().arg("list").output().unwrap(), 114);
    // http:// to another machine: refused before anything is sent.
    let out = client()
        .args(["list", "--server", "http://build.example.invalid"])
        .env("CONSTRUIR_TOKEN", "t")
        .output()
        .unwrap();
    expect(&out, 114);
    assert!(
        text(&out.stderr).contains("--insecure"),
        "{}",
        text(&out.stderr)
    );
    // Nothing listens: unreachable (a POST is not retried, so this is quick).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = client()
        .args([
            "cancel",
            "1",
            "--server",
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("CONSTRUIR_TOKEN", "t")
        .output()
        .unwrap();
    expect(&out, 113);
    // Bad flags are bad usage, not clap's 2 (a job's own code).
    expect(
        &client()
            .args(["submit", "--priority", "500", "x_i0.tar.xz"])
            .output()
            .unwrap(),
        114,
    );
    expect(&client().arg("--help").output().unwrap(), 0);
}

/// One HTTP/1.1 request to the server, as a runner would send it (the tests crate has no HTTP
/// client; runner calls answer with a length, never chunked): the status and the body.
fn raw_http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConstruir-Protocol: 1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = text(&answer[..split])
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, answer[split + 4..].to_vec())
}

fn json_of(answer: (u16, Vec<u8>), want: u16) -> serde_json::Value {
    assert_eq!(answer.0, want, "{}", text(&answer.1));
    serde_json::from_slice(&answer.1).unwrap()
}

#[test]
fn follow_and_fetch_a_job_that_a_stand_in_runner_runs() {
    let server = Server::start();
    let root = server.dir.path();
    let job = root.join("built_t0.tar.xz");
    write_job(&job, &[JobFile::script("#!/bin/sh\nmake\n")], 1 << 16).unwrap();
    let id = expect(&server.run(&["submit", job.to_str().unwrap()]), 0)
        .trim()
        .to_string();
    // Following before any runner has it: it waits for the first attempt.
    let follower = server
        .command(&["logs", &id, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // A runner, by hand: register, claim, start, console, output, report.
    let made = Command::new(binary("construir-server"))
        .arg("--data")
        .arg(root.join("data"))
        .args(["token", "create", "--name", "r", "--role", "runner"])
        .output()
        .unwrap();
    let runner_token = text(&made.stdout).trim().to_string();
    let bearer = format!("Bearer {runner_token}");
    let auth = ("Authorization", bearer.as_str());
    let json = ("Content-Type", "application/json");
    let url = &server.url;
    let reg = raw_http(
        url,
        "POST",
        "/api/v1/runner/register",
        &[auth, json],
        br#"{"name": "stand-in"}"#,
    );
    let runner = json_of(reg, 200)["runner_id"].to_string();
    let claim = serde_json::json!({
        "capabilities": {
            "arch": "x86_64", "backend": "vmm", "host_kind": "hardware", "images": ["t0"],
            "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 3600,
            "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
            "free_slots": 1, "free_memory_mib": 4096
        },
        "wait_s": 0
    });
    let claimed = raw_http(
        url,
        "POST",
        "/api/v1/runner/claim",
        &[auth, json, ("Construir-Runner", &runner)],
        claim.to_string().as_bytes(),
    );
    let claimed = json_of(claimed, 200);
    assert_eq!(claimed["job_id"].to_string(), id);
    let attempt = claimed["attempt_id"].to_string();
    let bearer = format!("Bearer {}", claimed["attempt_token"].as_str().unwrap());
    let auth = ("Authorization", bearer.as_str());
    let at = |what: &str| format!("/api/v1/runner/attempts/{attempt}/{what}");
    json_of(raw_http(url, "POST", &at("start"), &[auth], b""), 200);
    let console: &[&[u8]] = &[b"building\n", b"done \x1b[31mred\x1b[0m\n"];
    let mut offset = 0;
    for piece in console {
        let path = format!("{}?offset={offset}", at("log"));
        json_of(raw_http(url, "PATCH", &path, &[auth], piece), 202);
        offset += piece.len();
        // Pieces apart in time, so the follower sees them come.
        std::thread::sleep(Duration::from_millis(300));
    }
    let output = construir_tools::pack::job_archive(&[
        JobFile::script("#!/bin/sh\nmake\n"),
        JobFile::new("hello", b"built\n".to_vec(), 0o4755),
    ])
    .unwrap();
    let stored = json_of(raw_http(url, "PUT", &at("output"), &[auth], &output), 201);
    assert_eq!(stored["sha256"], sha256_hex(&output));
    let report = br#"{"status": "failed", "exit_code": 2, "job_exit_status": 2, "reason": "job failed with exit status 2"}"#;
    json_of(
        raw_http(url, "POST", &at("report"), &[auth, json], report),
        200,
    );

    // The follower printed the console as it came (raw: its stdout is no terminal) and ends
    // with the job's own exit status.
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(expect(&followed, 2), "building\ndone \x1b[31mred\x1b[0m\n");
    assert!(
        text(&followed.stderr).contains("failed"),
        "{}",
        text(&followed.stderr)
    );
    let summary = expect(&server.run(&["show", &id]), 0);
    assert!(summary.contains("exit code 2"), "{summary}");
    let view = show_json(&server, &id);
    assert_eq!(view["state"], "failed");
    assert_eq!(view["attempts"][0]["job_exit_status"], 2);
    assert_eq!(
        expect(&server.run(&["logs", &id]), 0),
        text(&followed.stdout)
    );

    // Fetch: checked, unpacked by the capped reader (no set-user-ID bit survives), with the
    // record and the console beside it.
    let dir = root.join("fetched");
    let out = server.run(&["fetch", &id, "-o", dir.to_str().unwrap(), "--keep-archive"]);
    expect(&out, 0);
    assert_eq!(
        std::fs::read(dir.join("output/opt/job/hello")).unwrap(),
        b"built\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("output/opt/job/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0, "{mode:o}");
    assert_eq!(std::fs::read(dir.join("output.archive")).unwrap(), output);
    assert_eq!(
        std::fs::read(dir.join("console.log")).unwrap(),
        console.concat()
    );
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("record.json")).unwrap()).unwrap();
    assert_eq!(record["state"], "failed");
    assert_eq!(record["result_attempt"].to_string(), attempt);
}
