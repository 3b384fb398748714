//! What the runner takes from queue/, where strangers' files arrive: the checks on a queue entry's
//! name and file, as pure functions where they can be. Only a regular file with one link, a
//! usable name, no larger than the size limit, and that nobody is still writing, is a job; any
//! other entry is moved out of the queue into a failed run with a record that says why (a
//! symbolic link is moved as a link: its target is never opened).

use crate::dirs::Refusal;
use construir_contract::jobname::parse_job_name;
use construir_launcher::jobfile::{JobFileRefusal, check_job_metadata};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The longest job file name taken, in bytes (a name must leave room for the paths built on it).
pub const MAX_JOB_NAME: usize = 200;

/// How long a file must have been left unchanged before it is taken, where the runner cannot ask
/// the kernel whether someone still has it open for writing.
pub const QUIET_PERIOD: Duration = Duration::from_secs(2);

/// The job's name if it is one the runner can run, else the `bad-name` reason.
pub fn job_name_of(name: &OsStr) -> Result<String, String> {
    let Some(text) = name.to_str() else {
        return Err(format!(
            "the job file name {} is not UTF-8",
            display_name(name)
        ));
    };
    if text.len() > MAX_JOB_NAME {
        return Err(format!(
            "the job file name is {} bytes long; at most {MAX_JOB_NAME} are taken",
            text.len()
        ));
    }
    parse_job_name(text).map_err(|e| e.to_string())?;
    Ok(text.to_string())
}

/// A name for records and messages: lossily decoded, control characters escaped, bounded.
pub fn display_name(name: &OsStr) -> String {
    let lossy = String::from_utf8_lossy(name.as_bytes());
    let mut out = String::new();
    for c in lossy.chars() {
        if out.len() >= 300 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why an entry (its `lstat`) cannot be run, if it cannot: the record's status and reason.
pub fn refusal_for(name: &OsStr, meta: &Metadata, max_job_size: u64) -> Option<Refusal> {
    if let Err(reason) = job_name_of(name) {
        return Some(Refusal {
            status: "bad-name".into(),
            reason,
        });
    }
    check_job_metadata(meta, max_job_size)
        .err()
        .map(|refusal| Refusal {
            status: match refusal {
                JobFileRefusal::TooBig { .. } => "too-big",
                _ => "not-a-job",
            }
            .into(),
            reason: format!("not run: {refusal}"),
        })
}

/// Whether someone may still be writing a file in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Nobody has it open for writing.
    None,
    /// Someone has it open for writing: take it later.
    Some,
    /// The kernel would not say (the file is not ours to lease): go by its modification time.
    Unknown,
}

/// Asks the kernel whether anyone has `path` open for writing: a read lease is granted only on a
/// file that nobody has open for writing (fcntl(2), F_SETLEASE). The lease is dropped at once.
/// Leases need the file's owner (or CAP_LEASE); otherwise the answer is `Unknown`.
pub fn writers(path: &Path) -> Writers {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Writers::Unknown;
    };
    // SAFETY: fcntl on a file descriptor we own, with an integer argument.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above; releases the lease just taken.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Writers::None;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Writers::Some,
        _ => Writers::Unknown,
    }
}

/// Whether a file whose writers are unknown has been left alone long enough to take. The later
/// of its modification and change times counts (a user can set the first to anything, not the
/// second); a time in the future (a clock set back, a skewed copy) says nothing, so it is taken.
pub fn settled(meta: &Metadata, now: SystemTime) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ctime = u64::try_from(meta.ctime()).ok().map(|s| {
        SystemTime::UNIX_EPOCH
            + Duration::from_secs(s)
            + Duration::from_nanos(u64::try_from(meta.ctime_nsec()).unwrap_or(0))
    });
    let latest = [meta.modified().ok(), ctime].into_iter().flatten().max();
    match latest {
        Some(t) if t > now + Duration::from_secs(1) => true,
        Some(t) => now.duration_since(t).unwrap_or_default() >= QUIET_PERIOD,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn names_that_are_not_utf8_or_too_long_are_bad_names() {
        assert_eq!(
            job_name_of(OsStr::new("hello_i0.tar.xz")).unwrap(),
            "hello_i0.tar.xz"
        );
        let bytes = OsString::from_vec(b"caf\xe9_i0.tar.xz".to_vec());
        let e = job_name_of(&bytes).unwrap_err();
        assert!(e.contains("not UTF-8") && e.contains("caf"), "{e}");
        let long = format!("{}_i0.tar.xz", "a".repeat(230));
        assert!(
            job_name_of(OsStr::new(&long))
                .unwrap_err()
                .contains("bytes long")
        );
        assert!(job_name_of(OsStr::new("no-index.tar.xz")).is_err());
        assert_eq!(display_name(OsStr::new("a\u{1b}[31mb")), "a\\u{1b}[31mb");
        assert!(display_name(OsStr::new(&"x".repeat(1000))).len() < 310);
    }

    #[test]
    fn links_directories_and_huge_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        let link = d.path().join("l_t0.tar.xz");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let meta = std::fs::symlink_metadata(&link).unwrap();
        let r = refusal_for(link.file_name().unwrap(), &meta, 1 << 20).unwrap();
        assert_eq!(r.status, "not-a-job");
        assert!(r.reason.contains("symbolic link"), "{}", r.reason);
        let meta = std::fs::symlink_metadata(d.path()).unwrap();
        assert_eq!(
            refusal_for(OsStr::new("d_t0.tar.xz"), &meta, 1 << 20)
                .unwrap()
                .status,
            "not-a-job"
        );
        let big = d.path().join("b_t0.tar.xz");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let meta = std::fs::symlink_metadata(&big).unwrap();
        assert_eq!(
            refusal_for(OsStr::new("b_t0.tar.xz"), &meta, 8 << 30)
                .unwrap()
                .status,
            "too-big"
        );
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(refusal_for(OsStr::new("t_t0.tar.xz"), &meta, 1 << 20).is_none());
        assert_eq!(
            refusal_for(OsStr::new("t.tar.xz"), &meta, 1 << 20)
                .unwrap()
                .status,
            "bad-name"
        );
    }

    #[test]
    fn a_file_open_for_writing_is_not_taken() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w_t0.tar.xz");
        let writer = std::fs::File::create(&p).unwrap();
        assert_eq!(writers(&p), Writers::Some);
        drop(writer);
        assert_eq!(writers(&p), Writers::None);
        // A reader does not hold it back.
        let _reader = std::fs::File::open(&p).unwrap();
        assert_eq!(writers(&p), Writers::None);
        let meta = std::fs::metadata(&p).unwrap();
        assert!(!settled(&meta, SystemTime::now()));
        assert!(settled(&meta, SystemTime::now() + QUIET_PERIOD));
        // A modification time set far back does not make a file just written look old: its
        // change time is now.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        assert!(!settled(&std::fs::metadata(&p).unwrap(), SystemTime::now()));
        // One set in the future is no reason to wait forever.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        assert!(settled(
            &std::fs::metadata(&p).unwrap(),
            SystemTime::now() + QUIET_PERIOD
        ));
    }
}
