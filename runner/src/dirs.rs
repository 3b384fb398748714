//! The runner's directory: `queue/` (users drop jobs here), `running/`, `done/`, `failed/`,
//! `logs/`, and `state/` (attempt counts). Jobs move only by rename within this one file system,
//! so a job is always in exactly one place, whatever happens to the runner.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct QueueDirs {
    pub root: PathBuf,
    pub queue: PathBuf,
    pub running: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
    pub logs: PathBuf,
    pub state: PathBuf,
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
            logs: root.join("logs"),
            state: root.join("state"),
        };
        for dir in [&d.queue, &d.running, &d.done, &d.failed, &d.logs, &d.state] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(d)
    }

    fn attempts_path(&self, job: &str) -> PathBuf {
        self.state.join(format!("{job}.attempts"))
    }

    /// How many times the job was started.
    pub fn attempts(&self, job: &str) -> u32 {
        std::fs::read_to_string(self.attempts_path(job))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records how many times the job was started (durably, before it moves to running/); 0
    /// removes the count.
    pub fn set_attempts(&self, job: &str, n: u32) -> io::Result<()> {
        if n == 0 {
            self.clear_attempts(job);
            return Ok(());
        }
        write_atomic(&self.attempts_path(job), format!("{n}\n").as_bytes())
    }

    pub fn clear_attempts(&self, job: &str) {
        let _ = std::fs::remove_file(self.attempts_path(job));
    }

    /// Job files in `dir`, oldest first (by modification time, then name).
    pub fn jobs_in(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut jobs: Vec<(std::time::SystemTime, String)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_job_candidate(&name) || !entry.file_type()?.is_file() {
                continue;
            }
            let mtime = entry
                .metadata()?
                .modified()
                .unwrap_or(std::time::UNIX_EPOCH);
            jobs.push((mtime, name));
        }
        jobs.sort();
        Ok(jobs.into_iter().map(|(_, n)| n).collect())
    }
}

/// Whether a file name in queue/ is a job to take: not hidden, not a record, not a partial copy.
/// (Names that are not valid job names are still taken, and failed with a reason.)
pub fn is_job_candidate(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with(".json")
        && !name.ends_with(".partial")
        && !name.ends_with(".tmp")
        && !name.ends_with('~')
}

/// A destination name in `dir` that does not overwrite an earlier job of the same name:
/// `NAME`, else `NAME.1`, `NAME.2`, …
pub fn unique_name(dir: &Path, name: &str) -> String {
    if !dir.join(name).exists() && !dir.join(format!("{name}.json")).exists() {
        return name.to_string();
    }
    (1u32..)
        .map(|i| format!("{name}.{i}"))
        .find(|n| !dir.join(n).exists() && !dir.join(format!("{n}.json")).exists())
        .expect("some free name")
}

/// Writes a file so that readers see the old content or the new, never a part.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_and_unique_names() {
        assert!(is_job_candidate("hello_i0.tar.xz"));
        assert!(is_job_candidate("no-index.tar.xz"));
        for skip in [".hidden", "x.json", "x.partial", "x.tmp", "x~"] {
            assert!(!is_job_candidate(skip), "{skip}");
        }
        let d = tempfile::tempdir().unwrap();
        assert_eq!(unique_name(d.path(), "a_i0.tar.xz"), "a_i0.tar.xz");
        std::fs::write(d.path().join("a_i0.tar.xz"), b"").unwrap();
        std::fs::write(d.path().join("a_i0.tar.xz.1.json"), b"").unwrap();
        assert_eq!(unique_name(d.path(), "a_i0.tar.xz"), "a_i0.tar.xz.2");
    }

    #[test]
    fn dirs_attempts_and_ordering() {
        let d = tempfile::tempdir().unwrap();
        let q = QueueDirs::create(d.path()).unwrap();
        assert_eq!(q.attempts("j"), 0);
        q.set_attempts("j", 2).unwrap();
        assert_eq!(q.attempts("j"), 2);
        q.clear_attempts("j");
        assert_eq!(q.attempts("j"), 0);
        q.set_attempts("j", 1).unwrap();
        q.set_attempts("j", 0).unwrap();
        assert!(
            !q.state.join("j.attempts").exists(),
            "0 leaves no file behind"
        );
        std::fs::write(q.queue.join("b_t0.tar.xz"), b"1").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(q.queue.join("a_t0.tar.xz"), b"2").unwrap();
        std::fs::write(q.queue.join(".partial-copy"), b"3").unwrap();
        assert_eq!(
            q.jobs_in(&q.queue).unwrap(),
            vec!["b_t0.tar.xz", "a_t0.tar.xz"]
        );
        write_atomic(&q.done.join("r.json"), b"{}").unwrap();
        assert_eq!(std::fs::read(q.done.join("r.json")).unwrap(), b"{}");
        assert_eq!(
            std::fs::read_dir(&q.done).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
