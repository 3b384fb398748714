//! The QEMU launcher: boots a construir kernel, image and job with `qemu-system-x86_64 -M
//! microvm`, like construir-vmm does, so the guest side can be proven end to end, used where
//! construir-vmm should not run (no `/dev/kvm`, or an emulated KVM where TCG is faster), and
//! measured as the baseline.
//!
//! The VM: the image's kernel (PVH entry of the ELF vmlinux), the root disk (the image's raw base,
//! the one construir-vmm uses: converted once, checked against the manifest, read-only, with
//! `snapshot=on` so the guest's writes go to QEMU's throw-away overlay), the job file as a
//! writable raw disk, the serial console on our stdin-less pipe, an i8042 (the guest's `reboot=k`
//! reset ends QEMU with `-no-reboot`), the status port as an `isa-debugcon` that copies the guest's
//! bytes to a file, and no network device. The host kills QEMU at the host deadline;
//! SIGINT/SIGTERM stop it.
//!
//! QEMU opens neither disk by path: both are files the launcher opened (the job through
//! `JobArgs::open_job`, the base through `construir_rawbase`), inherited by QEMU and named with
//! `-add-fd` as `/dev/fdset/N`, with `format=raw` (no probing, no qcow2 header for QEMU to follow
//! to a backing or data file). A link swapped in for the job after the launcher's checks is
//! never opened.

use construir_contract::cmdline::KernelCmdline;
use construir_contract::host::HostKind;
use construir_contract::outcome::RunOutcome;
use construir_contract::status::{self, STATUS_PORT};
use construir_launcher::console::CappedSink;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// What `auto` picks on `host`, and why.
    pub fn auto(host: HostKind) -> (Accel, &'static str) {
        match host {
            HostKind::HardwareKvm => (Accel::Kvm, "hardware KVM is available"),
            HostKind::EmulatedKvm => (
                Accel::Tcg,
                "this host's KVM is emulated (no hardware virtualization): TCG runs jobs far faster here",
            ),
            HostKind::NoKvm => (Accel::Tcg, "there is no usable /dev/kvm"),
        }
    }
}

/// Which QEMU machine the guest gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M microvm` with virtio-mmio disks: what construir runs.
    Microvm,
    /// QEMU's default machine (i440FX PC, SeaBIOS) with its default devices and the disks on its
    /// IDE controller: the seed's way of running jobs, kept as a benchmark baseline. Needs the
    /// `pc` kernel variant (`guest/kernel/build --variant pc`), which has PCI and ATA.
    Pc,
}

impl Machine {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "microvm" => Some(Machine::Microvm),
            "pc" => Some(Machine::Pc),
            _ => None,
        }
    }
}

/// Everything a launch needs.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    /// The root disk: a raw file open read-only (the image's cached raw base). QEMU gets this
    /// descriptor, and the guest's writes go to QEMU's temporary overlay.
    pub root: Arc<File>,
    /// The job file, open read-write (from `JobArgs::open_job`); QEMU gets this descriptor.
    pub job: Arc<File>,
    pub accel: Accel,
    /// The host kind, deciding the emulated-host kernel parameters under KVM.
    pub host: HostKind,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The job's time limit (enforced in the guest).
    pub job_timeout: Duration,
    /// The job's fixed clock (Unix seconds), if it has one.
    pub clock: Option<u64>,
    /// Extra time the host allows for boot and shutdown before it kills the VM.
    pub boot_allowance: Duration,
    pub console_cap: u64,
    /// Extra kernel command-line parameters (profiling).
    pub kernel_args: Vec<String>,
    pub machine: Machine,
}

/// How long booting may take on top of the job's limit before the host kills the VM: minutes
/// where the guest kernel is emulated instruction by instruction, seconds elsewhere.
pub fn boot_allowance(accel: Accel, host: HostKind) -> Duration {
    construir_launcher::boot_allowance(accel == Accel::Kvm && host == HostKind::EmulatedKvm)
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct LaunchResult {
    pub outcome: RunOutcome,
    pub accel: Accel,
    pub host: HostKind,
    /// Process start to QEMU's exit.
    pub total: Duration,
    /// Process start to the init's first status write (polled, so to within ~50 ms).
    pub to_init: Option<Duration>,
    pub console_bytes: u64,
    pub console_dropped: u64,
    pub qemu_exit: Option<i32>,
    pub qemu_stderr: String,
    pub cmdline: String,
}

/// Errors before or around the VM (the guest's own failures are outcomes, not errors).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {qemu}: is QEMU installed (Debian package qemu-system-x86)?")]
    NoQemu {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM was asked for, but this host has no usable /dev/kvm")]
    NoKvm,
    #[error("the job file cannot be used")]
    Job(#[source] std::io::Error),
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("I/O error around QEMU")]
    Io(#[from] std::io::Error),
}

/// Set by SIGINT/SIGTERM (`construir_launcher::stop_on_termination_signals`); the launcher
/// then stops the VM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The CPU model of a TCG guest.
pub const TCG_CPU: &str = "Nehalem";

/// The kernel command line for a launch.
pub fn kernel_cmdline(config: &LaunchConfig) -> KernelCmdline {
    let host = if config.accel == Accel::Kvm {
        config.host
    } else {
        HostKind::NoKvm
    };
    let mut cmdline = KernelCmdline::for_job(host, config.job_timeout, config.clock);
    if config.machine == Machine::Pc {
        // The last root= wins; the init links /dev/vd[ab] to the IDE disks.
        cmdline.push("root=/dev/sda");
    }
    for param in &config.kernel_args {
        cmdline.push(param.clone());
    }
    cmdline
}

/// The descriptors QEMU inherits for the disks (numbers in QEMU's process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFds {
    /// The root disk, read-only.
    pub root: RawFd,
    /// The job file, read-write.
    pub job: RawFd,
}

/// The `-add-fd` sets the disks are in: QEMU opens `/dev/fdset/N`, taking a duplicate of the
/// inherited descriptor with the same access mode.
const ROOT_FDSET: u32 = 1;
const JOB_FDSET: u32 = 2;

/// QEMU's arguments for a launch (the status file receives the status port's bytes; the disks
/// are the inherited descriptors `fds`).
pub fn qemu_args(
    config: &LaunchConfig,
    cmdline: &str,
    status_file: &Path,
    fds: DiskFds,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |a: &str| args.push(a.to_string());
    // The PIT stays on: under TCG the guest hangs calibrating the TSC without it.
    push("-M");
    push(match config.machine {
        Machine::Microvm => "microvm,acpi=off,rtc=off,x-option-roms=off",
        Machine::Pc => "pc",
    });
    match config.accel {
        Accel::Kvm => {
            push("-accel");
            push("kvm");
            // arch-capabilities: QEMU cannot set MSR 0x10a on this workplace's emulated KVM.
            push("-cpu");
            push("host,-arch-capabilities");
        }
        Accel::Tcg => {
            push("-accel");
            push("tcg");
            // One CPU model, not `max` (whatever this QEMU emulates): a job sees the same CPUID
            // on every TCG runner, whichever QEMU version it has. Nehalem is x86-64-v2 (SSE4.2,
            // POPCNT): what distributions build for.
            push("-cpu");
            push(TCG_CPU);
        }
    }
    if config.machine == Machine::Microvm {
        push("-nodefaults");
    }
    for a in [
        "-m".to_string(),
        format!("{}M", config.memory_mib),
        "-smp".to_string(),
        config.vcpus.to_string(),
        "-no-user-config".to_string(),
        "-no-reboot".to_string(),
        "-display".to_string(),
        "none".to_string(),
        "-monitor".to_string(),
        "none".to_string(),
        "-nic".to_string(),
        "none".to_string(),
        "-chardev".to_string(),
        "stdio,id=console,signal=off".to_string(),
        "-serial".to_string(),
        "chardev:console".to_string(),
        "-kernel".to_string(),
        config.kernel.display().to_string(),
        "-append".to_string(),
        cmdline.to_string(),
    ] {
        args.push(a);
    }
    // The disks are descriptors, never paths; raw, so QEMU reads no image header. `snapshot=on`
    // opens the base read-only and puts the guest's writes in a deleted temporary file.
    // `auto-read-only=off`: QEMU would otherwise first open the job read-only, and the set holds
    // only the read-write descriptor.
    for (fd, set, name) in [
        (fds.root, ROOT_FDSET, "construir-root"),
        (fds.job, JOB_FDSET, "construir-job"),
    ] {
        args.push("-add-fd".to_string());
        args.push(format!("fd={fd},set={set},opaque={name}"));
    }
    let root = format!("file=/dev/fdset/{ROOT_FDSET},format=raw");
    let job = format!("file=/dev/fdset/{JOB_FDSET},format=raw,auto-read-only=off");
    let disks = match config.machine {
        Machine::Microvm => vec![
            "-drive".to_string(),
            format!("id=root,{root},if=none,snapshot=on,read-only=off"),
            "-device".to_string(),
            "virtio-blk-device,drive=root".to_string(),
            "-drive".to_string(),
            format!("id=job,{job},if=none,cache=writeback"),
            "-device".to_string(),
            "virtio-blk-device,drive=job".to_string(),
            "-device".to_string(),
            "i8042".to_string(),
        ],
        Machine::Pc => vec![
            "-drive".to_string(),
            format!("{root},if=ide,index=0,snapshot=on"),
            "-drive".to_string(),
            format!("{job},if=ide,index=1,cache=writeback"),
        ],
    };
    args.extend(disks);
    for a in [
        // QEMU's own seccomp filter: no obsolete calls, no privilege changes, no new processes,
        // no scheduler or resource-control calls.
        "-sandbox".to_string(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".to_string(),
        "-chardev".to_string(),
        format!("file,id=status,path={}", qemu_path(status_file)),
        "-device".to_string(),
        format!("isa-debugcon,iobase={STATUS_PORT:#x},chardev=status"),
    ] {
        args.push(a);
    }
    args
}

/// A path as a QEMU option value (commas doubled).
fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Rounds the job file up to whole 512-byte sectors (zero padding; the archive is untouched),
/// so the guest sees all of it. Works on the open job file (never its path, which may name
/// something else by now). Returns the size.
pub fn prepare_job_disk(file: &File) -> Result<u64, LaunchError> {
    let meta = file.metadata().map_err(LaunchError::Job)?;
    if !meta.is_file() {
        return Err(LaunchError::Job(std::io::Error::other(
            "not a regular file",
        )));
    }
    let size = meta.len();
    let rounded = size.div_ceil(512) * 512;
    if rounded != size {
        tracing::info!("padding the job file from {size} to {rounded} bytes (whole sectors)");
        file.set_len(rounded).map_err(LaunchError::Job)?;
    }
    Ok(rounded)
}

/// A close-on-exec duplicate of `file`'s descriptor numbered 10 or more, clear of the standard
/// streams a child's set-up rewires (the launcher may have started with one of them closed).
fn dup_for_child(file: &File) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor or -1.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The vCPUs a launch really gets: one under an emulated KVM, where secondary vCPUs never come up
/// (measured here: the guest hangs at "Booting SMP configuration", with QEMU and construir-vmm alike).
pub fn effective_vcpus(accel: Accel, host: HostKind, wanted: u32) -> u32 {
    if accel == Accel::Kvm && host == HostKind::EmulatedKvm && wanted > 1 {
        tracing::warn!(
            "using 1 vCPU instead of {wanted}: secondary vCPUs never come up on an emulated-KVM host"
        );
        1
    } else {
        wanted
    }
}

/// Largest status stream a guest may write before the launcher calls it misbehaving.
const STATUS_FILE_CAP: u64 = 1 << 20;

/// Boots the VM and waits for it to end; console bytes go to `console`.
pub fn launch<W: Write + Send + 'static>(
    config: &LaunchConfig,
    console: W,
) -> Result<LaunchResult, LaunchError> {
    let started = Instant::now();
    if !config.kernel.exists() {
        return Err(LaunchError::Missing(config.kernel.clone()));
    }
    if config.accel == Accel::Kvm && !config.host.has_kvm() {
        return Err(LaunchError::NoKvm);
    }
    prepare_job_disk(&config.job)?;
    // Random name, private, removed however this function returns (a predictable one could be
    // pre-created by another user to make launches fail).
    let status_dir = tempfile::Builder::new()
        .prefix("construir-qemu-")
        .tempdir()?;
    let status_file = status_dir.path().join("status");
    std::fs::write(&status_file, b"")?;
    let cmdline = kernel_cmdline(config).to_string();
    let mut config = config.clone();
    config.vcpus = effective_vcpus(config.accel, config.host, config.vcpus);
    let root_fd = dup_for_child(&config.root)?;
    let job_fd = dup_for_child(&config.job).map_err(LaunchError::Job)?;
    let fds = DiskFds {
        root: root_fd.as_raw_fd(),
        job: job_fd.as_raw_fd(),
    };
    let args = qemu_args(&config, &cmdline, &status_file, fds);
    tracing::debug!(qemu = %config.qemu.display(), ?args, "starting QEMU");
    let mut command = Command::new(&config.qemu);
    // QEMU dies with its launcher, whatever kills the launcher. It inherits the standard streams
    // and the two disks' descriptors, nothing else: not even a descriptor our own parent let us
    // inherit (a make jobserver's pipe, say).
    // SAFETY: prctl(PR_SET_PDEATHSIG), close_range and fcntl(F_SETFD) are async-signal-safe
    // system calls; the descriptors are open in the child (copies of ours, kept open until after
    // the spawn).
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // Marks every descriptor from 3 up close-on-exec (a kernel without close_range,
            // before 5.11, leaves them: ours are all close-on-exec already).
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            for fd in [fds.root, fds.job] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    // QEMU has its copies now; ours go.
    drop((root_fd, job_fd));
    let mut child = spawned.map_err(|source| LaunchError::NoQemu {
        qemu: config.qemu.clone(),
        source,
    })?;
    let console_thread = {
        let mut stdout = child.stdout.take().expect("piped");
        let cap = config.console_cap;
        std::thread::spawn(move || {
            let mut sink = CappedSink::new(console, cap);
            let mut buf = [0u8; 16 * 1024];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.accept(&buf[..n]).is_err() {
                            // The sink failed (disk full?): keep draining so QEMU never blocks.
                            continue;
                        }
                    }
                }
            }
            (sink.written(), sink.dropped())
        })
    };
    let stderr_thread = {
        let mut stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut text);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            String::from_utf8_lossy(&text).into_owned()
        })
    };

    let deadline = config.job_timeout + config.boot_allowance;
    let mut to_init = None;
    let mut forced: Option<RunOutcome> = None;
    let qemu_exit = loop {
        if let Some(status) = child.try_wait()? {
            break status.code();
        }
        let status_len = std::fs::metadata(&status_file)
            .map(|m| m.len())
            .unwrap_or(0);
        if to_init.is_none() && status_len > 0 {
            to_init = Some(started.elapsed());
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            forced = Some(RunOutcome::Interrupted);
        } else if started.elapsed() > deadline {
            forced = Some(RunOutcome::TimedOut { in_guest: false });
        } else if status_len > STATUS_FILE_CAP {
            forced = Some(RunOutcome::GuestFailed(format!(
                "the guest wrote more than {STATUS_FILE_CAP} bytes to the status port"
            )));
        }
        if forced.is_some() {
            kill(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (console_bytes, console_dropped) = console_thread.join().unwrap_or((0, 0));
    let qemu_stderr = stderr_thread.join().unwrap_or_default();
    let stream = std::fs::read(&status_file).unwrap_or_default();
    drop(status_dir);
    let decoder = status::decode(&stream[..stream.len().min(STATUS_FILE_CAP as usize)]);
    if to_init.is_none() && decoder.init_started() {
        to_init = Some(started.elapsed());
    }
    let outcome = match forced {
        Some(outcome) => outcome,
        None => {
            let how = match qemu_exit {
                Some(0) => "the VM reset or powered off".to_string(),
                Some(code) => format!("QEMU exited with status {code}: {}", qemu_stderr.trim()),
                None => "QEMU was killed".to_string(),
            };
            RunOutcome::from_report(decoder.outcome(), &how)
        }
    };
    Ok(LaunchResult {
        outcome,
        accel: config.accel,
        host: config.host,
        total: started.elapsed(),
        to_init,
        console_bytes,
        console_dropped,
        qemu_exit,
        qemu_stderr,
        cmdline,
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel, host: HostKind) -> LaunchConfig {
        let null = || Arc::new(File::open("/dev/null").unwrap());
        LaunchConfig {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k/vmlinux".into(),
            root: null(),
            job: null(),
            accel,
            host,
            memory_mib: 256,
            vcpus: 1,
            job_timeout: Duration::from_secs(30),
            clock: None,
            kernel_args: Vec::new(),
            machine: Machine::Microvm,
            boot_allowance: boot_allowance(accel, host),
            console_cap: 1000,
        }
    }

    #[test]
    fn auto_prefers_tcg_unless_kvm_is_hardware() {
        assert_eq!(Accel::auto(HostKind::HardwareKvm).0, Accel::Kvm);
        assert_eq!(Accel::auto(HostKind::EmulatedKvm).0, Accel::Tcg);
        assert_eq!(Accel::auto(HostKind::NoKvm).0, Accel::Tcg);
    }

    #[test]
    fn emulated_params_only_under_kvm_on_an_emulated_host() {
        let kvm = kernel_cmdline(&config(Accel::Kvm, HostKind::EmulatedKvm)).to_string();
        assert!(kvm.contains("construir.emulated") && kvm.contains("fsrm,erms"));
        let tcg = kernel_cmdline(&config(Accel::Tcg, HostKind::EmulatedKvm)).to_string();
        assert!(!tcg.contains("construir.emulated"));
        let hw = kernel_cmdline(&config(Accel::Kvm, HostKind::HardwareKvm)).to_string();
        assert!(!hw.contains("construir.emulated") && !hw.contains("clearcpuid"));
        assert!(tcg.contains("construir.timeout=30") && tcg.contains("construir.time="));
        assert_eq!(
            boot_allowance(Accel::Kvm, HostKind::EmulatedKvm),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn emulated_kvm_gets_one_vcpu() {
        assert_eq!(effective_vcpus(Accel::Kvm, HostKind::EmulatedKvm, 2), 1);
        assert_eq!(effective_vcpus(Accel::Tcg, HostKind::EmulatedKvm, 2), 2);
        assert_eq!(effective_vcpus(Accel::Kvm, HostKind::HardwareKvm, 4), 4);
    }

    #[test]
    fn args_have_no_network_a_throwaway_raw_root_and_no_disk_paths() {
        for machine in [Machine::Microvm, Machine::Pc] {
            let c = LaunchConfig {
                machine,
                ..config(Accel::Tcg, HostKind::NoKvm)
            };
            let fds = DiskFds { root: 12, job: 13 };
            let args = qemu_args(&c, "console=ttyS0", Path::new("/tmp/a,b/status"), fds);
            let joined = args.join(" ");
            assert!(joined.contains("-nic none"));
            assert!(!joined.contains("virtio-net") && !joined.contains("netdev"));
            assert!(joined.contains("-add-fd fd=12,set=1,opaque=construir-root"));
            assert!(joined.contains("-add-fd fd=13,set=2,opaque=construir-job"));
            // Raw only: QEMU never sees a qcow2 header (no backing or data file to follow).
            assert!(!joined.contains("qcow2"), "{joined}");
            let drives: Vec<&String> = args
                .iter()
                .zip(args.iter().skip(1))
                .filter(|(a, _)| *a == "-drive")
                .map(|(_, d)| d)
                .collect();
            assert_eq!(drives.len(), 2);
            assert!(
                drives[0].contains("file=/dev/fdset/1,format=raw")
                    && drives[0].contains("snapshot=on")
            );
            assert!(drives[1].contains("file=/dev/fdset/2,format=raw,auto-read-only=off"));
            assert!(!drives[1].contains("snapshot"));
            // The only path QEMU opens besides the kernel is the status file (commas escaped).
            assert!(joined.contains("path=/tmp/a,,b/status"), "{joined}");
            assert!(joined.contains("isa-debugcon,iobase=0x5f0"));
            assert!(joined.contains("-no-reboot"));
            assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
            if machine == Machine::Microvm {
                assert!(joined.contains("-nodefaults") && joined.contains("-device i8042"));
            }
        }
    }

    #[test]
    fn job_disks_are_padded_to_sectors_through_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("x_t0.tar.xz");
        std::fs::write(&job, vec![1u8; 1000]).unwrap();
        let file = File::options().read(true).write(true).open(&job).unwrap();
        // Swapped for a link to another file after the open: the link's target is not touched.
        let secret = dir.path().join("i0.json");
        std::fs::write(&secret, b"{}").unwrap();
        std::fs::rename(&job, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&secret, &job).unwrap();
        assert_eq!(prepare_job_disk(&file).unwrap(), 1024);
        let data = std::fs::read(dir.path().join("moved")).unwrap();
        assert_eq!(&data[..1000], &[1u8; 1000][..]);
        assert!(data[1000..].iter().all(|&b| b == 0));
        assert_eq!(std::fs::read(&secret).unwrap(), b"{}");
        assert_eq!(
            prepare_job_disk(&file).unwrap(),
            1024,
            "already whole sectors"
        );
        let dir_handle = File::open(dir.path()).unwrap();
        assert!(prepare_job_disk(&dir_handle).is_err());
    }

    /// A stand-in for QEMU: a shell script that records its arguments and what each of its open
    /// descriptors is, then exits as a VM that powered off would.
    fn fake_qemu(dir: &Path) -> PathBuf {
        let script = dir.join("fake-qemu");
        let out = dir.join("seen");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done >{out}.args\n\
                 for fd in $(ls /proc/$$/fd); do echo \"$fd $(readlink /proc/$$/fd/$fd)\"; done >{out}.fds\n",
                out = out.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn qemu_gets_the_opened_files_never_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 4096]).unwrap();
        let job = dir.path().join("j_t0.tar.xz");
        std::fs::write(&job, vec![7u8; 700]).unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"ELF").unwrap();
        let job_file = File::options().read(true).write(true).open(&job).unwrap();
        // After the launcher's checks, the job's name is pointed at another file.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"not yours").unwrap();
        let opened = dir.path().join("opened-job");
        std::fs::rename(&job, &opened).unwrap();
        std::os::unix::fs::symlink(&secret, &job).unwrap();
        let c = LaunchConfig {
            qemu: fake_qemu(dir.path()),
            kernel,
            root: Arc::new(File::open(&base).unwrap()),
            job: Arc::new(job_file),
            ..config(Accel::Tcg, HostKind::NoKvm)
        };
        // A fork elsewhere in the test process may briefly hold the script's write descriptor.
        let result = (0..50)
            .find_map(|_| match launch(&c, std::io::sink()) {
                Err(LaunchError::NoQemu { source, .. })
                    if source.raw_os_error() == Some(libc::ETXTBSY) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
                other => Some(other),
            })
            .unwrap()
            .unwrap();
        assert_eq!(result.qemu_exit, Some(0));
        assert!(matches!(result.outcome, RunOutcome::GuestFailed(_)));
        let args = std::fs::read_to_string(dir.path().join("seen.args")).unwrap();
        let fds = std::fs::read_to_string(dir.path().join("seen.fds")).unwrap();
        assert!(!args.contains(job.to_str().unwrap()), "{args}");
        assert!(
            !args.contains("base.raw") && !args.contains("opened-job"),
            "{args}"
        );
        let fd_of = |set: &str| -> String {
            let line = args
                .lines()
                .find(|l| l.starts_with("fd=") && l.contains(&format!(",set={set},")))
                .unwrap_or_else(|| panic!("no set {set}: {args}"));
            line["fd=".len()..line.find(',').unwrap()].to_string()
        };
        let target = |fd: String| -> String {
            fds.lines()
                .find_map(|l| l.strip_prefix(&format!("{fd} ")))
                .unwrap_or_else(|| panic!("descriptor {fd} not inherited: {fds}"))
                .to_string()
        };
        assert_eq!(target(fd_of("1")), base.display().to_string());
        assert_eq!(target(fd_of("2")), opened.display().to_string());
        // Nothing else of ours reaches QEMU: the other descriptors are the shell's own (its
        // script, its output file, command substitutions' pipes) and the standard streams.
        let expected = ["base.raw", "opened-job", "fake-qemu", "seen.fds"]
            .map(|n| dir.path().join(n).display().to_string());
        for line in fds.lines() {
            let (fd, target) = line.split_once(' ').unwrap();
            let fd: i32 = fd.parse().unwrap();
            assert!(
                fd <= 2
                    || expected.iter().any(|e| e == target)
                    || (target.starts_with("pipe:") && fd < 20)
                    || target == "/dev/null"
                    // closed between the listing and the readlink: the shell's own
                    || target.is_empty(),
                "descriptor {fd} ({target}) leaked into QEMU: {fds}"
            );
        }
        // Padded through the descriptor; the link's target untouched.
        assert_eq!(std::fs::metadata(&opened).unwrap().len(), 1024);
        assert_eq!(std::fs::read(&secret).unwrap(), b"not yours");
    }
}
