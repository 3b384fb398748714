//! construir-init: PID 1 of a construir guest, installed as the image's `/sbin/init`.
//!
//! In order: announce itself on the status port; mount the pseudo file systems; alias
//! `/dev/sd[ab]` to `/dev/vd[ab]`; set the clock from the host's time if the guest has none;
//! unpack the job disk into `/`; run `/opt/job/construir` as root in `/opt/job` with a clean
//! environment and the in-guest time limit; kill what the job left behind; `sync`; report the
//! outcome on the status port; reboot (the i8042 reset ends the VM).
//!
//! Called as `construir-output` (the image installs it under that name too), it writes a job's
//! output deterministically instead (output.rs).
//!
//! It never hangs and never exits: every failure, a panic included, is printed, reported as
//! "init failed" and followed by the reboot. See `construir_contract::status` for the port protocol.

mod job;
mod output;
mod setup;
mod status_port;

use construir_contract::cmdline::GuestParams;
use construir_contract::status::{GuestReport, op};
use std::time::Instant;

/// Prints a line of the init's own on the console.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("construir-init: {}", format_args!($($arg)*))
    };
}
pub(crate) use say;

fn main() {
    // The same binary is the image's construir-output (a job's deterministic output).
    let args: Vec<String> = std::env::args().collect();
    if args
        .first()
        .is_some_and(|a| a.rsplit('/').next() == Some(output::NAME))
    {
        std::process::exit(output::main(&args[1..]));
    }
    let started = Instant::now();
    status_port::enable();
    status_port::send(&[op::INIT_STARTED]);
    std::panic::set_hook(Box::new(|info| {
        say!("panic: {info}");
        finish(GuestReport::InitFailed);
    }));
    if std::process::id() != 1 {
        say!("must run as PID 1 of a construir guest; refusing to run here");
        std::process::exit(2);
    }
    let report = match run() {
        Ok(report) => report,
        Err(e) => {
            say!("error: {e:#}");
            GuestReport::InitFailed
        }
    };
    say!(
        "outcome {report:?} after {:.1} s in the init",
        started.elapsed().as_secs_f64()
    );
    finish(report);
}

fn run() -> anyhow::Result<GuestReport> {
    setup::mount_filesystems()?;
    setup::alias_disks()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let params = GuestParams::parse(&cmdline)?;
    setup::set_clock(params.host_time, params.job_clock);
    match job::unpack(&params.job_device)? {
        job::Unpacked::Ready => {}
        job::Unpacked::Invalid(report) => return Ok(report),
    }
    status_port::send(&[op::JOB_UNPACKED]);
    job::run(params.timeout_secs, params.job_clock)
}

/// Ends the guest: no process of the job survives, the disks are synced, the outcome is on the
/// status port, the console is drained, then the reset. Never returns.
fn finish(report: GuestReport) -> ! {
    job::kill_everything_else();
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    status_port::send(&report.encode());
    // SAFETY: tcdrain on our console descriptor; failure only means nothing was pending.
    unsafe { libc::tcdrain(2) };
    loop {
        // SAFETY: reboot(2) with a valid command; as PID 1 with CAP_SYS_BOOT this resets the VM.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        say!(
            "reboot failed: {}; retrying",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
