//! A minimal HTTP/1.1 client and the server under test as a child process, for the benches that
//! drive a real server over sockets (server.rs, load.rs).

use construir_api::types::{ClaimRequest, RunnerCapabilities};
use construir_server::db::Db;
use construir_server::tokens;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client (keep-alive, Content-Length or chunked answers): a thousand of them
// must be cheap, and what is measured is the server, not a client library.

pub struct Http {
    s: BufStream<TcpStream>,
}

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Res<T> {
        Ok(serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "HTTP {}: {e}: {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })?)
    }

    pub fn expect(self, status: u16, what: &str) -> Res<Answer> {
        if self.status != status {
            return Err(format!(
                "{what}: HTTP {} (want {status}): {}",
                self.status,
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
            .into());
        }
        Ok(self)
    }
}

impl Http {
    pub async fn connect(addr: SocketAddr) -> Res<Http> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Http {
            s: BufStream::with_capacity(16 << 10, 16 << 10, s),
        })
    }

    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        runner: Option<u64>,
        body: &[u8],
    ) -> Res<Answer> {
        self.send(method, path, token, runner, body).await?;
        self.answer().await
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        runner: Option<u64>,
        body: &[u8],
    ) -> Res<()> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConstruir-Protocol: 1\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(r) = runner {
            head.push_str(&format!("Construir-Runner: {r}\r\n"));
        }
        if !body.is_empty() {
            let json = body.first() == Some(&b'{');
            head.push_str(if json {
                "Content-Type: application/json\r\n"
            } else {
                "Content-Type: application/octet-stream\r\n"
            });
        }
        head.push_str("\r\n");
        self.s.write_all(head.as_bytes()).await?;
        self.s.write_all(body).await?;
        self.s.flush().await?;
        Ok(())
    }

    pub async fn answer(&mut self) -> Res<Answer> {
        let mut line = String::new();
        if self.s.read_line(&mut line).await? == 0 {
            return Err("the server closed the connection".into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP status line: {line:?}"))?;
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.s.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse()?;
                } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.s.read_line(&mut line).await?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)?;
                if n == 0 {
                    loop {
                        line.clear();
                        if self.s.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let at = body.len();
                body.resize(at + n, 0);
                self.s.read_exact(&mut body[at..]).await?;
                let mut crlf = [0u8; 2];
                self.s.read_exact(&mut crlf).await?;
            }
        } else {
            body.resize(len, 0);
            self.s.read_exact(&mut body).await?;
        }
        Ok(Answer { status, body })
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test, as a child process.

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
}

impl Server {
    pub fn start(data: &Path, args: &[&str]) -> Res<Server> {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_construir-server"))
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--requests-per-second", "0"])
            .args(args)
            .env("CONSTRUIR_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("http://")
            .ok_or_else(|| format!("the server printed {line:?}"))?
            .parse()?;
        Ok(Server {
            child,
            addr,
            data: data.to_path_buf(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (VmRSS, VmHWM) in KiB, threads, open descriptors.
    pub fn footprint(&self) -> (u64, u64, u64, usize) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0);
        (field("VmRSS:"), field("VmHWM:"), field("Threads:"), fds)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// What the benches send.

/// A ustar archive of one file `out.bin` holding `data` (an output as a job writes one).
pub fn tar_of(data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..7].copy_from_slice(b"out.bin");
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = Vec::with_capacity(data.len() + 2048);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

/// A trivial t0 job (`true`), padded to 1 MiB, as a submit body.
pub fn trivial_job() -> Vec<u8> {
    use construir_tools::pack::{JobFile, job_archive};
    let mut job = job_archive(&[JobFile::script("#!/bin/sh\ntrue\n")]).expect("pack a job");
    job.resize(1 << 20, 0);
    job
}

pub fn caps(images: &[&str], free_slots: u32) -> RunnerCapabilities {
    RunnerCapabilities {
        arch: std::env::consts::ARCH.into(),
        backend: "qemu".into(),
        host_kind: "none".into(),
        images: images.iter().map(|s| s.to_string()).collect(),
        max_memory_mib: 4096,
        max_vcpus: 2,
        max_timeout_s: 7200,
        max_job_size: 1 << 30,
        max_output_size: 4 << 30,
        free_slots,
        free_memory_mib: 4096,
        image_digests: Vec::new(),
        fetch_images: false,
        image_cache_bytes: 0,
    }
}

pub fn claim_body_with(wait_s: u32, images: &[&str], free_slots: u32) -> Vec<u8> {
    serde_json::to_vec(&ClaimRequest {
        capabilities: caps(images, free_slots),
        wait_s,
    })
    .expect("claim JSON")
}

/// Users with one token each of `role`, written straight into the database (before the server
/// starts: a thousand `token create` processes would take longer than the benchmark).
pub async fn make_tokens(data: &Path, prefix: &str, role: &str, n: usize) -> Res<Vec<String>> {
    make_tokens_in(data, None, prefix, role, n).await
}

/// [`make_tokens`] in the database `database` names (a `postgres://` URL), or the embedded one.
pub async fn make_tokens_in(
    data: &Path,
    database: Option<&str>,
    prefix: &str,
    role: &str,
    n: usize,
) -> Res<Vec<String>> {
    std::fs::create_dir_all(data)?;
    let url = database
        .map(construir_server::db::DatabaseUrl::parse)
        .transpose()?;
    let db = Db::open(url.as_ref(), data).await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let user = db.ensure_user(&format!("{prefix}{i:04}")).await?;
        let token = tokens::generate()?;
        db.add_token(user, role, &tokens::digest(&token)).await?;
        out.push(token);
    }
    db.pool().close().await;
    Ok(out)
}

pub async fn register(addr: SocketAddr, token: &str, name: &str) -> Res<u64> {
    let mut c = Http::connect(addr).await?;
    let a = c
        .call(
            "POST",
            "/api/v1/runner/register",
            token,
            None,
            format!("{{\"name\":\"{name}\"}}").as_bytes(),
        )
        .await?
        .expect(200, "register")?;
    let v: serde_json::Value = a.json()?;
    Ok(v["runner_id"].as_u64().ok_or("no runner_id")?)
}

pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `len` bytes that do not compress, the same for the same `seed` (xorshift).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A new database (`bench_WHAT_PID`) on the PostgreSQL `admin` names: its URL.
pub async fn new_pg_database(admin: &str, what: &str) -> Res<String> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let name = format!("bench_{what}_{}", std::process::id());
    let mut conn = sqlx::AnyConnection::connect(admin).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

/// Where a server under test keeps its state: the embedded default, or PostgreSQL + S3.
pub struct BackendSet {
    pub name: &'static str,
    /// A `postgres://` URL (None: SQLite in the data directory).
    pub database: Option<String>,
    /// An `s3://BUCKET` URL (None: files in the data directory).
    pub store: Option<String>,
}

impl BackendSet {
    pub fn embedded() -> BackendSet {
        BackendSet {
            name: "SQLite + files",
            database: None,
            store: None,
        }
    }

    /// PostgreSQL + S3, when the bench is given them: a new database on the cluster
    /// `CONSTRUIR_BENCH_POSTGRES` names and a new bucket in the s3s-fs root
    /// `CONSTRUIR_BENCH_S3_ROOT` (the server reads the endpoint and keys from `AWS_*`), both
    /// named after `what`. None, said loudly, when either is missing.
    pub async fn postgres_s3(what: &str) -> Res<Option<BackendSet>> {
        let (Ok(admin), Ok(root)) = (
            std::env::var("CONSTRUIR_BENCH_POSTGRES"),
            std::env::var("CONSTRUIR_BENCH_S3_ROOT"),
        ) else {
            eprintln!(
                "bench: NOT measured on PostgreSQL + S3: set CONSTRUIR_BENCH_POSTGRES and \
                 CONSTRUIR_BENCH_S3_ROOT (tools/bench-server does)"
            );
            return Ok(None);
        };
        let database = new_pg_database(&admin, what).await?;
        let bucket = format!("bench-{what}-{}", std::process::id());
        // A bucket of s3s-fs is a directory of its root.
        std::fs::create_dir_all(Path::new(&root).join(&bucket))?;
        Ok(Some(BackendSet {
            name: "PostgreSQL + S3",
            database: Some(database),
            store: Some(format!("s3://{bucket}")),
        }))
    }

    /// The server's flags for it.
    pub fn args(&self) -> Vec<&str> {
        let mut args = Vec::new();
        if let Some(url) = &self.database {
            args.extend(["--database", url.as_str()]);
        }
        if let Some(url) = &self.store {
            args.extend(["--store", url.as_str()]);
        }
        args
    }
}

/// Submits `job` (a t0 job; `extra`: more query parameters): its id.
pub async fn submit(c: &mut Http, token: &str, job: &[u8], extra: &str) -> Res<u64> {
    let a = c
        .call(
            "POST",
            &format!("/api/v1/jobs?name=bench_t0.tar.xz&memory_mib=256&timeout_s=600{extra}"),
            token,
            None,
            job,
        )
        .await?
        .expect(201, "submit")?;
    let v: serde_json::Value = a.json()?;
    Ok(v["id"].as_u64().ok_or("no job id")?)
}
