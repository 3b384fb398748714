//! What every host-side binary (construir-vmm, construir-qemu, construir-runner) sets up the same
//! way: logging, argument errors as the documented setup-error exit code, SIGINT/SIGTERM as a
//! flag, the console sink, and how long a boot may take.

use crate::outcome::EXIT_SETUP_ERROR;
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Logs to stderr through `tracing`, filtered by `CONSTRUIR_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONSTRUIR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Parses the command line; bad arguments exit with the setup-error code (`--help` with 0).
pub fn parse_args<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                i32::from(EXIT_SETUP_ERROR)
            } else {
                0
            };
            let _ = e.print();
            std::process::exit(code);
        }
    }
}

static STOP_FLAG: OnceLock<&'static AtomicBool> = OnceLock::new();

extern "C" fn on_termination(_: libc::c_int) {
    if let Some(flag) = STOP_FLAG.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// Makes SIGINT and SIGTERM set `flag` instead of killing the process.
pub fn stop_on_termination_signals(flag: &'static AtomicBool) {
    let _ = STOP_FLAG.set(flag);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only reads a OnceLock that is set before, and stores to an atomic;
        // both are async-signal-safe.
        unsafe { libc::signal(sig, on_termination as *const () as libc::sighandler_t) };
    }
}

/// The console sink for `--console`: a file, `-` for stdout, `none`, or stderr when not given.
pub fn open_console(spec: Option<&str>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match spec {
        None => Box::new(std::io::stderr()),
        Some("-") => Box::new(std::io::stdout()),
        Some("none") => Box::new(std::io::sink()),
        Some(path) => Box::new(std::fs::File::create(path)?),
    })
}

/// How long a boot (and shutdown) may take on top of the job's limit before the host stops the VM:
/// minutes where KVM emulates the guest kernel, a minute elsewhere.
pub fn boot_allowance(kernel_emulated: bool) -> Duration {
    Duration::from_secs(if kernel_emulated { 600 } else { 60 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consoles_and_allowances() {
        assert!(open_console(Some("none")).unwrap().write_all(b"x").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        open_console(Some(path.to_str().unwrap()))
            .unwrap()
            .write_all(b"hello")
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert!(open_console(Some("/nonexistent/dir/x")).is_err());
        assert_eq!(boot_allowance(true), Duration::from_secs(600));
        assert_eq!(boot_allowance(false), Duration::from_secs(60));
    }

    #[test]
    fn signals_set_the_flag() {
        static FLAG: AtomicBool = AtomicBool::new(false);
        stop_on_termination_signals(&FLAG);
        // SAFETY: raising SIGTERM in our own process, whose handler only sets FLAG.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(FLAG.load(Ordering::SeqCst));
    }
}
