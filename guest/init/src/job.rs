//! The job: unpacking it from its disk, running its script under the time limit, and reading
//! how it ended.

use crate::{say, status_port};
use anyhow::Context;
use construir_contract::archive::{self, ArchiveError, JOB_DIR, JOB_SCRIPT};
use construir_contract::status::{GuestReport, op};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Whether the job disk held a job.
pub enum Unpacked {
    Ready,
    Invalid(GuestReport),
}

/// Unpacks the archive at the start of `device` into `/`.
pub fn unpack(device: &str) -> anyhow::Result<Unpacked> {
    let started = Instant::now();
    let disk =
        std::fs::File::open(device).with_context(|| format!("open the job disk {device}"))?;
    // Small reads: every byte the guest kernel copies is emulated on an emulated-KVM host, and the
    // archive usually ends long before the disk does.
    let reader = std::io::BufReader::with_capacity(64 << 10, disk);
    match archive::unpack(reader, Path::new("/")) {
        Ok(summary) => say!(
            "unpacked {} entries ({} bytes, {}) from {device} in {:.1} s",
            summary.entries,
            summary.bytes,
            summary.compression.unwrap_or("?"),
            started.elapsed().as_secs_f64()
        ),
        // A job past the archive reader's limits (huge headers, millions of entries, a stream
        // bomb) is the submitter's doing: an invalid job, like an unreadable one.
        Err(
            e @ (ArchiveError::NotAnArchive
            | ArchiveError::Corrupt { .. }
            | ArchiveError::MetadataTooLarge { .. }
            | ArchiveError::TooManyEntries { .. }
            | ArchiveError::StreamTooLarge { .. }),
        ) => {
            say!("invalid job: {}", error_chain(&e));
            return Ok(Unpacked::Invalid(GuestReport::NoArchive));
        }
        Err(e) => return Err(e).context("unpacking the job"),
    }
    let script = Path::new("/").join(JOB_SCRIPT);
    match std::fs::metadata(&script) {
        Ok(meta) if meta.is_file() => {
            if meta.permissions().mode() & 0o111 == 0 {
                say!("{JOB_SCRIPT} is not executable; making it so");
                std::fs::set_permissions(
                    &script,
                    std::fs::Permissions::from_mode(meta.permissions().mode() | 0o755),
                )?;
            }
            Ok(Unpacked::Ready)
        }
        _ => {
            say!("invalid job: the archive has no {JOB_SCRIPT}");
            Ok(Unpacked::Invalid(GuestReport::NoScript))
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The environment the job runs with: complete enough for compilers and autotools (measured:
/// without PATH, `gcc` cannot find `cc1`), and nothing from the kernel's.
pub const JOB_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("SHELL", "/bin/sh"),
    ("LANG", "C.UTF-8"),
    ("TMPDIR", "/tmp"),
    ("TERM", "dumb"),
    ("CONSTRUIR", "1"),
];

/// The report for a `waitpid` status of the job.
pub fn report_for_wait_status(status: libc::c_int) -> GuestReport {
    if libc::WIFEXITED(status) {
        GuestReport::Exited(libc::WEXITSTATUS(status) as u8)
    } else if libc::WIFSIGNALED(status) {
        GuestReport::Signaled(libc::WTERMSIG(status) as u8)
    } else {
        GuestReport::InitFailed
    }
}

/// Starts the job script in a session of its own, in the job directory, with `JOB_ENV`, stdin
/// from /dev/null and the console as stdout/stderr. A script with no `#!` line runs under
/// /bin/sh, as a shell would run it.
///
/// fork/exec by hand: std's `Command` falls back to a socketpair-based path when it needs a
/// working directory or a pre-exec hook, and the init must not depend on the guest kernel's sockets
/// (until 2026-12 it had none; now only AF_UNIX).
fn spawn_job(script: &str, source_date_epoch: Option<u64>) -> std::io::Result<libc::pid_t> {
    use std::ffi::CString;
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let path = cstr(script)?;
    let shell = cstr("/bin/sh")?;
    let dir = cstr(&format!("/{JOB_DIR}"))?;
    let null = cstr("/dev/null")?;
    let mut env: Vec<CString> = JOB_ENV
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    // The job's fixed clock, for tools that stamp their outputs (reproducible-builds.org).
    if let Some(t) = source_date_epoch {
        env.push(cstr(&format!("SOURCE_DATE_EPOCH={t}"))?);
    }
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let argv = [path.as_ptr(), std::ptr::null()];
    let sh_argv = [shell.as_ptr(), path.as_ptr(), std::ptr::null()];
    let mut pipe = [0; 2];
    // SAFETY: pipe is a valid array of two descriptors.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the child only calls async-signal-safe functions on data prepared before fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls only; every pointer stays valid (prepared above).
        unsafe {
            libc::close(pipe[0]);
            libc::setsid();
            let fd = libc::open(null.as_ptr(), libc::O_RDONLY);
            if fd >= 0 {
                libc::dup2(fd, 0);
            }
            if libc::chdir(dir.as_ptr()) == 0 {
                libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
                if *libc::__errno_location() == libc::ENOEXEC {
                    libc::execve(sh_argv[0], sh_argv.as_ptr(), envp.as_ptr());
                }
            }
            let errno = *libc::__errno_location();
            libc::write(pipe[1], (&errno as *const libc::c_int).cast(), 4);
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(pipe[1]) };
    let mut errno: libc::c_int = 0;
    // SAFETY: reading at most 4 bytes into errno; EOF (0) means exec succeeded.
    let n = unsafe { libc::read(pipe[0], (&mut errno as *mut libc::c_int).cast(), 4) };
    // SAFETY: closing our read end.
    unsafe { libc::close(pipe[0]) };
    if n == 4 {
        let mut status = 0;
        // SAFETY: reaping the child that failed to exec.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(std::io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
}

/// Runs the job script and waits for it, killing everything at the time limit.
pub fn run(timeout_secs: Option<u64>, clock: Option<u64>) -> anyhow::Result<GuestReport> {
    let script = Path::new("/").join(JOB_SCRIPT);
    let script = script.to_str().expect("constant path");
    let pid = match spawn_job(script, clock) {
        Ok(pid) => pid,
        Err(e) => {
            say!("cannot start {script}: {e}; reporting exit status 127 as a shell would");
            return Ok(GuestReport::Exited(127));
        }
    };
    status_port::send(&[op::JOB_STARTED]);
    say!(
        "job started (pid {pid}), time limit {}",
        match timeout_secs {
            Some(s) => format!("{s} s"),
            None => "none".to_string(),
        }
    );
    let started = Instant::now();
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(secs) = timeout_secs {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            if !finished.load(Ordering::SeqCst) {
                timed_out.store(true, Ordering::SeqCst);
                say!("time limit of {secs} s reached: killing the job");
                kill_everything_else();
            }
        });
    }
    let status = wait_for(pid);
    finished.store(true, Ordering::SeqCst);
    let report = if timed_out.load(Ordering::SeqCst) {
        GuestReport::TimeLimit
    } else {
        report_for_wait_status(status)
    };
    say!(
        "job ended after {:.1} s: {report:?}",
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

/// Reaps children (as PID 1 every orphan is ours) until `pid` has ended; returns its status.
fn wait_for(pid: libc::pid_t) -> libc::c_int {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got == pid {
            return status;
        }
        if got < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            // Cannot happen while the job lives; treat as a failure rather than hang.
            return 0x7f00;
        }
    }
}

/// Kills every process but this one and reaps them, so nothing writes to the disks after the
/// outcome is reported.
pub fn kill_everything_else() {
    // SAFETY: kill(-1, SIGKILL) from PID 1 signals every other user process.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if got > 0 {
            continue;
        }
        if got == 0 {
            // Some are still dying: give them a moment, then look again.
            std::thread::sleep(Duration::from_millis(10));
            // SAFETY: as above.
            unsafe { libc::kill(-1, libc::SIGKILL) };
            continue;
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_map_to_reports() {
        assert_eq!(report_for_wait_status(3 << 8), GuestReport::Exited(3));
        assert_eq!(report_for_wait_status(0), GuestReport::Exited(0));
        assert_eq!(report_for_wait_status(9), GuestReport::Signaled(9));
    }

    #[test]
    fn the_environment_is_complete() {
        for key in ["PATH", "HOME", "LANG", "TMPDIR"] {
            assert!(JOB_ENV.iter().any(|(k, _)| *k == key), "{key}");
        }
        let path = JOB_ENV.iter().find(|(k, _)| *k == "PATH").unwrap().1;
        assert!(path.split(':').any(|p| p == "/usr/bin"));
    }
}
