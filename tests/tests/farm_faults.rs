//! Faults of a farm on PostgreSQL and S3, survived: servers, runners (the real construir-runner
//! with a backend program that does a job's work at once) and s3s-fs as child processes on
//! 127.0.0.1, a balancer in front of the servers that can cut the link or delay it. Each test
//! ends with every job accounted for — succeeded once, with the bytes it carried — and every
//! object in the bucket whole.
//!
//! The link faults are a proxy's (this machine's kernel has no `sch_netem`, so no netem delay
//! or loss between network namespaces): a cut holds every byte in both directions until the
//! link is back, as a pulled cable does to TCP; a delay holds each chunk. Loss shows to TCP as
//! delay (retransmits), so it is the delay case.
//!
//! Runs in tools/test's PostgreSQL + S3 pass (CONSTRUIR_TEST_BACKENDS=postgres-s3).

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::echo_job;
use support::shared::{Balancer, SharedFarm, backends_here, restart_postgres};

/// `n` jobs of `len` random bytes each, submitted through `url`: (id, the bytes), and the job
/// files (kept until the end).
fn submit_jobs(
    farm: &SharedFarm,
    url: &str,
    n: usize,
    len: usize,
    seed: u64,
) -> (Vec<(u64, Vec<u8>)>, Vec<construir_tests::TestJob>) {
    let mut jobs = Vec::new();
    let mut files = Vec::new();
    for i in 0..n {
        let (job, data) = echo_job(&format!("j{i}"), len, seed + i as u64, 0);
        let id = farm.submit(url, &job.path);
        jobs.push((id, data));
        files.push(job);
    }
    (jobs, files)
}

/// Waits until at least `n` of `jobs` have ended (through `url`).
fn until_ended(farm: &SharedFarm, url: &str, jobs: &[(u64, Vec<u8>)], n: usize) {
    let t0 = Instant::now();
    loop {
        let ended = jobs
            .iter()
            .filter(|(id, _)| {
                !matches!(
                    farm.job(url, *id)["state"].as_str(),
                    Some("queued" | "running")
                )
            })
            .count();
        if ended >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{ended} of {n} ended"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn one_of_two_servers_killed_under_load_loses_nothing() {
    if !backends_here("one_of_two_servers_killed_under_load_loses_nothing") {
        return;
    }
    let mut farm = SharedFarm::start(2, &["--lease", "15s"]);
    let lb = Balancer::start(farm.servers.iter().map(|s| s.port).collect());
    let runners: Vec<_> = (0..3)
        .map(|i| farm.runner(&format!("r{i}"), &lb.url(), &["--jobs", "2"]))
        .collect();
    let (jobs, _files) = submit_jobs(&farm, &lb.url(), 24, 64 << 10, 100);
    until_ended(&farm, &lb.url(), &jobs, 6);
    // Half-way: server 0 dies; its connections with it. The balancer sends everyone to server 1.
    farm.servers[0].kill9();
    let ended = farm.wait_all(&lb.url(), &ids(&jobs), Duration::from_secs(180));
    farm.check_all(&farm.servers[1].url.clone(), &jobs, &ended);
    assert!(farm.s3.check_objects() >= jobs.len());
    drop(runners);
}

#[test]
fn a_server_killed_while_it_streams_an_upload_into_s3_loses_nothing() {
    if !backends_here("a_server_killed_while_it_streams_an_upload_into_s3_loses_nothing") {
        return;
    }
    let mut farm = SharedFarm::start(1, &["--lease", "30s"]);
    let url = farm.servers[0].url.clone();
    let _runner = farm.runner("r0", &url, &[]);
    let (jobs, _files) = submit_jobs(&farm, &url, 1, 8 << 20, 200);
    // The server's link to S3 slowed: publishing the 8 MiB output takes seconds (the runner's
    // upload to the server is quick), so the kill comes while the server streams it into S3.
    farm.s3_link.delay_ms.store(25, Ordering::SeqCst);
    let t0 = Instant::now();
    loop {
        let j = farm.job(&url, jobs[0].0);
        let uploading = j["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["state"] == "uploading");
        if uploading {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "never uploading: {j:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let before = farm.s3.check_objects();
    farm.servers[0].kill9();
    // Nothing half-written is visible: the objects are the ones there before, each whole.
    assert_eq!(farm.s3.check_objects(), before, "no half blob is visible");
    farm.s3_link.delay_ms.store(0, Ordering::SeqCst);
    farm.servers[0].start();
    let ended = farm.wait_all(&url, &ids(&jobs), Duration::from_secs(120));
    farm.check_all(&url, &jobs, &ended);
    assert!(
        farm.s3.check_objects() > before,
        "the output was stored after the restart"
    );
}

#[test]
fn postgres_restarted_under_load_loses_nothing() {
    if !backends_here("postgres_restarted_under_load_loses_nothing") {
        return;
    }
    let farm = SharedFarm::start(1, &["--lease", "15s"]);
    let url = farm.servers[0].url.clone();
    let _runners: Vec<_> = (0..2)
        .map(|i| farm.runner(&format!("r{i}"), &url, &["--jobs", "2"]))
        .collect();
    let (jobs, _files) = submit_jobs(&farm, &url, 16, 64 << 10, 300);
    until_ended(&farm, &url, &jobs, 3);
    restart_postgres();
    let ended = farm.wait_all(&url, &ids(&jobs), Duration::from_secs(180));
    farm.check_all(&url, &jobs, &ended);
}

#[test]
fn the_s3_server_down_for_30_s_loses_nothing() {
    if !backends_here("the_s3_server_down_for_30_s_loses_nothing") {
        return;
    }
    let mut farm = SharedFarm::start(1, &["--lease", "15s"]);
    let url = farm.servers[0].url.clone();
    let _runner = farm.runner("r0", &url, &["--jobs", "2"]);
    let (jobs, _files) = submit_jobs(&farm, &url, 6, 256 << 10, 400);
    until_ended(&farm, &url, &jobs, 1);
    farm.s3.down();
    std::thread::sleep(Duration::from_secs(30));
    farm.s3.up();
    let ended = farm.wait_all(&url, &ids(&jobs), Duration::from_secs(240));
    farm.check_all(&url, &jobs, &ended);
    assert!(farm.s3.check_objects() >= jobs.len());
}

#[test]
fn the_link_cut_mid_upload_then_slow_loses_nothing() {
    if !backends_here("the_link_cut_mid_upload_then_slow_loses_nothing") {
        return;
    }
    let farm = SharedFarm::start(1, &["--lease", "30s"]);
    let lb = Balancer::start(vec![farm.servers[0].port]);
    let url = farm.servers[0].url.clone();
    let _runner = farm.runner("r0", &lb.url(), &["--jobs", "2"]);
    let (jobs, _files) = submit_jobs(&farm, &url, 4, 4 << 20, 500);
    lb.delay_ms.store(20, Ordering::SeqCst);
    let t0 = Instant::now();
    while !jobs.iter().any(|(id, _)| {
        farm.job(&url, *id)["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["state"] == "uploading")
    }) {
        assert!(t0.elapsed() < Duration::from_secs(60), "never uploading");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The link is down for 10 s mid-upload (beats and log pieces wait too), then back but slow.
    lb.cut.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(10));
    lb.cut.store(false, Ordering::SeqCst);
    let ended = farm.wait_all(&url, &ids(&jobs), Duration::from_secs(240));
    farm.check_all(&url, &jobs, &ended);
}

/// A tmpfs mounted on a directory, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs on {} (the disk-full test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn the_servers_disk_full_refuses_uploads_until_space_is_freed() {
    if !backends_here("the_servers_disk_full_refuses_uploads_until_space_is_freed") {
        return;
    }
    // The server's data directory (where uploads are received before S3) on a disk of its
    // own: roomy for the submission, then 3 MiB when the runner uploads the output.
    let mounted = std::sync::Mutex::new(None);
    let mut farm = SharedFarm::start_with(1, &["--lease", "20s"], &|data| {
        *mounted.lock().unwrap() = Some(Tmpfs::mount(data, "64m"));
    });
    let disk = mounted.lock().unwrap().take().unwrap();
    let url = farm.servers[0].url.clone();
    let (jobs, _files) = submit_jobs(&farm, &url, 1, 6 << 20, 600);
    disk.resize("3m");
    let _runner = farm.runner("r0", &url, &[]);
    // The upload is refused (503, nothing stored) while the disk is full; the runner retries.
    let log = &farm.servers[0].log;
    let t0 = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("No space left")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the disk never filled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let j = farm.job(&url, jobs[0].0);
    assert_eq!(j["state"], "running", "waiting, not failed: {j:#}");
    disk.resize("64m");
    let ended = farm.wait_all(&url, &ids(&jobs), Duration::from_secs(120));
    farm.check_all(&url, &jobs, &ended);
    // The server stopped before its disk goes, the disk before the directory.
    farm.servers[0].kill9();
    drop(disk);
}

fn ids(jobs: &[(u64, Vec<u8>)]) -> Vec<u64> {
    jobs.iter().map(|(id, _)| *id).collect()
}
