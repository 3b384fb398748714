//! The QEMU launcher: boots a construir kernel, image and job with `qemu-system-x86_64 -M
//! microvm`, like construir-vmm does, so the guest side can be proven end to end, used where
//! construir-vmm should not run (no `/dev/kvm`, or an emulated KVM where TCG is faster), and
//! measured as the baseline.
//!
//! The VM: the image's kernel (PVH entry of the ELF vmlinux), the root disk (qcow2, with
//! `snapshot=on` so the guest's writes are thrown away), the job file as a writable raw disk,
//! the serial console on our stdin-less pipe, an i8042 (the guest's `reboot=k` reset ends QEMU
//! with `-no-reboot`), the status port as an `isa-debugcon` that copies the guest's bytes to a
//! file, and no network device. The host kills QEMU at the host deadline; SIGINT/SIGTERM stop it.

use construir_abi::cmdline::KernelCmdline;
use construir_abi::console::CappedSink;
use construir_abi::host::HostKind;
use construir_abi::outcome::RunOutcome;
use construir_abi::status::{self, STATUS_PORT};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    pub root_disk: PathBuf,
    pub root_format: String,
    pub job: PathBuf,
    pub accel: Accel,
    /// The host kind, deciding the emulated-host kernel parameters under KVM.
    pub host: HostKind,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The job's time limit (enforced in the guest).
    pub job_timeout: Duration,
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
    construir_abi::launcher::boot_allowance(accel == Accel::Kvm && host == HostKind::EmulatedKvm)
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
    #[error("the job file {path} cannot be used")]
    Job {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("I/O error around QEMU")]
    Io(#[from] std::io::Error),
}

/// Set by SIGINT/SIGTERM (`construir_abi::launcher::stop_on_termination_signals`); the launcher
/// then stops the VM.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The kernel command line for a launch.
pub fn kernel_cmdline(config: &LaunchConfig) -> KernelCmdline {
    let host = if config.accel == Accel::Kvm {
        config.host
    } else {
        HostKind::NoKvm
    };
    let mut cmdline = KernelCmdline::for_job(host, config.job_timeout);
    if config.machine == Machine::Pc {
        // The last root= wins; the init links /dev/vd[ab] to the IDE disks.
        cmdline.push("root=/dev/sda");
    }
    for param in &config.kernel_args {
        cmdline.push(param.clone());
    }
    cmdline
}

/// QEMU's arguments for a launch (the status file receives the status port's bytes).
pub fn qemu_args(config: &LaunchConfig, cmdline: &str, status_file: &Path) -> Vec<String> {
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
            push("-cpu");
            push("max");
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
    let root = qemu_path(&config.root_disk);
    let job = qemu_path(&config.job);
    let disks = match config.machine {
        Machine::Microvm => vec![
            "-drive".to_string(),
            format!(
                "id=root,file={root},format={},if=none,snapshot=on,read-only=off",
                config.root_format
            ),
            "-device".to_string(),
            "virtio-blk-device,drive=root".to_string(),
            "-drive".to_string(),
            format!("id=job,file={job},format=raw,if=none,cache=writeback"),
            "-device".to_string(),
            "virtio-blk-device,drive=job".to_string(),
            "-device".to_string(),
            "i8042".to_string(),
        ],
        Machine::Pc => vec![
            "-drive".to_string(),
            format!(
                "file={root},format={},if=ide,index=0,snapshot=on",
                config.root_format
            ),
            "-drive".to_string(),
            format!("file={job},format=raw,if=ide,index=1,cache=writeback"),
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
/// so the guest sees all of it. Returns the size.
pub fn prepare_job_disk(path: &Path) -> Result<u64, LaunchError> {
    let err = |source| LaunchError::Job {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let rounded = size.div_ceil(512) * 512;
    if rounded != size {
        tracing::info!("padding the job file from {size} to {rounded} bytes (whole sectors)");
        file.set_len(rounded).map_err(err)?;
    }
    Ok(rounded)
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
    for path in [&config.kernel, &config.root_disk] {
        if !path.exists() {
            return Err(LaunchError::Missing(path.clone()));
        }
    }
    if config.accel == Accel::Kvm && !config.host.has_kvm() {
        return Err(LaunchError::NoKvm);
    }
    prepare_job_disk(&config.job)?;
    let status_dir = tempdir()?;
    let status_file = status_dir.join("status");
    std::fs::write(&status_file, b"")?;
    let cmdline = kernel_cmdline(config).to_string();
    let mut config = config.clone();
    config.vcpus = effective_vcpus(config.accel, config.host, config.vcpus);
    let args = qemu_args(&config, &cmdline, &status_file);
    tracing::debug!(qemu = %config.qemu.display(), ?args, "starting QEMU");
    let mut command = Command::new(&config.qemu);
    // QEMU dies with its launcher, whatever kills the launcher.
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LaunchError::NoQemu {
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
    let _ = std::fs::remove_dir_all(&status_dir);
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

fn tempdir() -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("construir-qemu-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("cannot make a temporary directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(accel: Accel, host: HostKind) -> LaunchConfig {
        LaunchConfig {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k/vmlinux".into(),
            root_disk: "/i/t0.qcow2".into(),
            root_format: "qcow2".into(),
            job: "/j/a,b_t0.tar.xz".into(),
            accel,
            host,
            memory_mib: 256,
            vcpus: 1,
            job_timeout: Duration::from_secs(30),
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
    fn args_have_no_network_and_a_throwaway_root() {
        let c = config(Accel::Tcg, HostKind::NoKvm);
        let args = qemu_args(&c, "console=ttyS0", Path::new("/tmp/status"));
        let joined = args.join(" ");
        assert!(joined.contains("-nic none") && joined.contains("-nodefaults"));
        assert!(!joined.contains("virtio-net") && !joined.contains("netdev"));
        assert!(joined.contains("file=/i/t0.qcow2,format=qcow2,if=none,snapshot=on"));
        assert!(
            joined.contains("file=/j/a,,b_t0.tar.xz,format=raw"),
            "commas escaped: {joined}"
        );
        assert!(joined.contains("isa-debugcon,iobase=0x5f0"));
        assert!(joined.contains("-no-reboot") && joined.contains("-device i8042"));
        assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
    }

    #[test]
    fn job_disks_are_padded_to_sectors() {
        let dir = std::env::temp_dir().join(format!("construir-pad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let job = dir.join("x_t0.tar.xz");
        std::fs::write(&job, vec![1u8; 1000]).unwrap();
        assert_eq!(prepare_job_disk(&job).unwrap(), 1024);
        let data = std::fs::read(&job).unwrap();
        assert_eq!(&data[..1000], &[1u8; 1000][..]);
        assert!(data[1000..].iter().all(|&b| b == 0));
        assert!(prepare_job_disk(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
