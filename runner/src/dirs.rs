//! The runner's directory. Users drop jobs into `queue/`; every run of a job then lives in a
//! directory of its own, named by a run id that no other run has:
//!
//! ```text
//! queue/NAME                      dropped jobs (hostile names and files: see intake.rs)
//! running/RUN/NAME                the job file while it runs (a fresh copy of `submitted` for each
//!                                 start: the VM writes its output over it)
//! running/RUN/submitted           the job file as it was queued, until the run ends
//! running/RUN/run.json            the job's name and how many times it was started
//! running/RUN/console.log         the guest's console, and backend.log the backend's messages
//! done/RUN/…, failed/RUN/…        the same directory once the run ended, with record.json
//! ```
//!
//! A run's directory moves as a whole, by rename, and nothing is ever renamed over something that
//! exists (`RENAME_NOREPLACE`), so two jobs of the same name never touch each other's files, and a
//! job is always in exactly one place, whatever happens to the runner.

use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A run's state file, written before its job file is moved in and before each start.
pub const RUN_STATE: &str = "run.json";
/// A finished run's record.
pub const RECORD: &str = "record.json";
pub const CONSOLE_LOG: &str = "console.log";
pub const BACKEND_LOG: &str = "backend.log";
/// The job file as it was submitted, kept while its run lasts: each start gets a fresh copy of it
/// to write over (disk_copy.rs), so an interrupted start never leaves the next one a damaged job.
pub const SUBMITTED: &str = "submitted";
/// The name a job file is kept under when its own name is unusable (not UTF-8, too long, …).
pub const UNNAMED_JOB: &str = "job";

#[derive(Debug, Clone)]
pub struct QueueDirs {
    pub root: PathBuf,
    pub queue: PathBuf,
    pub running: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

/// What the runner keeps about a run while it is in running/.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// The job's name as it was queued (lossily decoded if it was not UTF-8).
    pub job: String,
    /// The job file's name inside the run's directory.
    pub file: String,
    /// How many times the job was started.
    pub attempts: u32,
    /// When it was taken from the queue (Unix milliseconds).
    pub taken_ms: u64,
    /// Why the job is refused, when it is (set at intake: it never starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
}

/// A job refused at intake: the record's status and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub status: String,
    pub reason: String,
}

impl QueueDirs {
    /// Creates (if needed) the directories under `root`.
    pub fn create(root: &Path) -> io::Result<Self> {
        let d = QueueDirs {
            root: root.to_path_buf(),
            queue: root.join("queue"),
            running: root.join("running"),
            done: root.join("done"),
            failed: root.join("failed"),
        };
        for dir in [&d.queue, &d.running, &d.done, &d.failed] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(d)
    }

    /// Takes the directory for this process: one runner per directory (a second one, even with
    /// `--once`, would start the first one's runs again). Held until the returned file is dropped.
    pub fn lock(&self) -> io::Result<std::fs::File> {
        lock_dir(&self.root)
    }

    /// Makes a new, empty run directory in running/ (mode 0700: a run's files are the runner's)
    /// and returns its id.
    pub fn new_run(&self) -> io::Result<String> {
        use std::os::unix::fs::DirBuilderExt;
        loop {
            let id = new_run_id();
            match std::fs::DirBuilder::new()
                .mode(0o700)
                .create(self.running.join(&id))
            {
                Ok(()) => return Ok(id),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.running.join(id)
    }

    pub fn read_state(&self, id: &str) -> io::Result<RunState> {
        let text = std::fs::read(self.run_dir(id).join(RUN_STATE))?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes the run's state durably.
    pub fn write_state(&self, id: &str, state: &RunState) -> io::Result<()> {
        write_atomic(
            &self.run_dir(id).join(RUN_STATE),
            &serde_json::to_vec_pretty(state).unwrap_or_default(),
        )
    }

    /// Entries of `dir` whose names may be jobs, oldest first (by modification time, then
    /// name). Each entry is looked at on its own: one that vanishes meanwhile is skipped.
    pub fn entries_in(&self, dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
        let mut jobs: Vec<(std::time::SystemTime, std::ffi::OsString)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            if !is_job_candidate(&name) {
                continue;
            }
            // symlink_metadata: the entry itself, never what a link points to.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            jobs.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), name));
        }
        jobs.sort();
        Ok(jobs.into_iter().map(|(_, n)| n).collect())
    }
}

/// Takes `root` for this process (`root/.lock`, flock): one runner per directory, whichever its
/// mode. Held until the returned file is dropped.
pub fn lock_dir(root: &Path) -> io::Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = root.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another construir-runner uses {} (pid {}); one runner per directory",
                root.display(),
                holder.trim()
            ),
        ));
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// A run id: the UTC time it was made and 32 random bits, `20261201-194012-1a2b3c4d`. Sortable by
/// time; unique because run directories are made with `mkdir`, which fails on an existing one.
pub fn new_run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = civil_time(secs);
    format!(
        "{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{:08x}",
        random_u32()
    )
}

/// Whether `name` has the shape of a run id (anything else in running/ is not a run).
pub fn is_run_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 24
        && b[8] == b'-'
        && b[15] == b'-'
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 15 => true,
            16.. => c.is_ascii_hexdigit(),
            _ => c.is_ascii_digit(),
        })
}

/// 32 random bits (getrandom; a time-and-counter mix where there is no entropy source).
pub fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != 4 {
        // No entropy source: time and a counter still make ids distinct within this process,
        // and mkdir refuses a duplicate.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t ^ (COUNTER.fetch_add(1, Ordering::Relaxed) as u32).wrapping_mul(0x9e37_79b9);
    }
    u32::from_ne_bytes(buf)
}

/// Seconds since the epoch as (year, month, day, hour, minute, second), UTC (days-from-civil,
/// inverted; valid for every date after 1970).
pub fn civil_time(secs: u64) -> (u64, u64, u64, u64, u64, u64) {
    let days = secs / 86400;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Whether a name in queue/ is to be taken: not hidden, not a record, not a partial copy.
/// (Names that are not valid job names are still taken, and failed with a reason.)
pub fn is_job_candidate(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.starts_with(b".")
        && !b.ends_with(b".json")
        && !b.ends_with(b".partial")
        && !b.ends_with(b".tmp")
        && !b.ends_with(b"~")
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`, and nothing moved).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) {
        // A file system without RENAME_NOREPLACE: check, then rename. The destinations are the
        // runner's own directories (running/, done/, failed/), which nobody else writes.
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", to.display()),
            ));
        }
        return std::fs::rename(from, to);
    }
    Err(e)
}

/// Writes a file so that readers see the old content or the new, never a part. The temporary
/// name is short and unique to this call (a long file name cannot make it too long, and two
/// threads writing the same file never share one).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(path.parent());
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable.
pub fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn candidates() {
        assert!(is_job_candidate(OsStr::new("hello_i0.tar.xz")));
        assert!(is_job_candidate(OsStr::new("no-index.tar.xz")));
        assert!(is_job_candidate(&OsString::from_vec(
            b"\xff\xfe_i0.tar.xz".to_vec()
        )));
        for skip in [".hidden", "x.json", "x.partial", "x.tmp", "x~"] {
            assert!(!is_job_candidate(OsStr::new(skip)), "{skip}");
        }
    }

    #[test]
    fn run_ids_are_distinct_and_recognised() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_run_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(is_run_id(id), "{id}");
        }
        for not in [
            "a_t0.tar.xz",
            "20261201-194012-1a2b3c4",
            "20261201-194012-1a2b3c4g",
            "",
        ] {
            assert!(!is_run_id(not), "{not}");
        }
        assert_eq!(civil_time(0), (1970, 1, 1, 0, 0, 0));
        // 2026-12-01 19:40:12 UTC
        assert_eq!(civil_time(1_796_154_012), (2026, 12, 1, 19, 40, 12));
        assert_eq!(civil_time(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn renames_never_replace() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"first").unwrap();
        std::fs::write(&b, b"second").unwrap();
        let e = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"second");
        assert_eq!(std::fs::read(&a).unwrap(), b"first");
        let c = d.path().join("c");
        rename_noreplace(&a, &c).unwrap();
        assert_eq!(std::fs::read(&c).unwrap(), b"first");
        // A directory onto a file, and a file onto a directory: refused, both kept.
        std::fs::create_dir(d.path().join("dir")).unwrap();
        assert!(rename_noreplace(&c, &d.path().join("dir")).is_err());
        assert!(c.exists());
    }

    #[test]
    fn states_runs_and_atomic_writes() {
        let d = tempfile::tempdir().unwrap();
        let q = QueueDirs::create(d.path()).unwrap();
        let id = q.new_run().unwrap();
        assert!(q.run_dir(&id).is_dir());
        let st = RunState {
            job: "a_t0.tar.xz".into(),
            file: "a_t0.tar.xz".into(),
            attempts: 2,
            taken_ms: 5,
            refused: None,
        };
        q.write_state(&id, &st).unwrap();
        assert_eq!(q.read_state(&id).unwrap(), st);
        assert_eq!(
            std::fs::read_dir(q.run_dir(&id)).unwrap().count(),
            1,
            "no temporary file left"
        );
        // A file name near NAME_MAX still gets its atomic write.
        let long = "x".repeat(250);
        write_atomic(&q.done.join(&long), b"{}").unwrap();
        assert_eq!(std::fs::read(q.done.join(&long)).unwrap(), b"{}");

        std::fs::write(q.queue.join("b_t0.tar.xz"), b"1").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(q.queue.join("a_t0.tar.xz"), b"2").unwrap();
        std::fs::write(q.queue.join(".partial-copy"), b"3").unwrap();
        std::fs::create_dir(q.queue.join("dir_t0.tar.xz")).unwrap();
        let names = q.entries_in(&q.queue).unwrap();
        assert_eq!(names.len(), 3);
        assert_eq!(names[0], "b_t0.tar.xz");
        assert_eq!(names[1], "a_t0.tar.xz");
    }
}
