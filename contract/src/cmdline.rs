//! The guest kernel command line: what every boot gets, what only an emulated-KVM host gets, and
//! the `construir.*` parameters the guest init reads.
//!
//! The host builds the line with [`KernelCmdline`]; the init parses `/proc/cmdline` with
//! [`GuestParams::parse`]. Both sides use the names defined here and nowhere else.

use crate::host::HostKind;

/// Parameters every construir guest boots with. `reboot=k` resets through the i8042's command port
/// (which ends the VM), `panic=-1` reboots at once on a panic, one UART is enough, and the root disk
/// is the first virtio disk, writable because its writes go to a throw-away overlay.
///
/// `quiet`: only kernel warnings and worse reach the console. Every console byte costs the guest
/// two port accesses (status poll, data), each a VM exit; the ~8 KiB informational boot log cost
/// ~4 s of an emulated-KVM boot. Panics, oopses and errors still print; `--kernel-arg loglevel=8`
/// shows everything when debugging a boot.
pub const BASE_PARAMS: &[&str] = &[
    "console=ttyS0",
    "quiet",
    "reboot=k",
    "panic=-1",
    "8250.nr_uarts=1",
    "root=/dev/vda",
    "rw",
    "rootwait",
];

/// Switch in our guest kernel's patch set for emulated-KVM hosts (see guest/kernel/README.md).
pub const EMULATED_SWITCH: &str = "construir.emulated";

/// What a guest needs on a host whose KVM emulates the guest kernel (module `kvm_pvm` and the
/// like): our kernel's switch, and the avoidance of instructions that host's emulator lacks
/// (`xrstor`, `clac`/`stac`, `popcnt`, AVX) or gets wrong (`rep movsb` corrupted data: `fsrm`,
/// `erms`), and `rodata=off mitigations=off` for boot time there. Measured on this workplace's host; see
/// guest/kernel/README.md. Never used on hardware.
pub const EMULATED_HOST_PARAMS: &[&str] = &[
    EMULATED_SWITCH,
    "noxsave",
    "nosmap",
    "nosmep",
    "nopti",
    "clearcpuid=popcnt,avx,avx2,avx512f,smap,smep,fsrm,erms",
    // Boot time: write-protecting the kernel's read-only data took ~7 s of an emulated boot. It
    // hardens the guest kernel against the guest itself, which runs the job as root anyway.
    "rodata=off",
    // Speculation mitigations (retpolines, buffer clearing on every return to user space) protect
    // the guest kernel from the guest's own user space; under emulation they only cost time.
    "mitigations=off",
    // Boot time: the default first percpu chunk is a 2 MiB block the boot zeroes and frees again;
    // allocating it page by page cut ~1-3 s of an emulated boot. On hardware the 2 MiB mapping is
    // the better choice, so only here.
    "percpu_alloc=page",
];

/// `construir.time=SECONDS`: the host's wall clock (Unix seconds) when it started the VM. The init
/// sets the guest clock from it when the guest has no better clock (TCG has no kvmclock).
pub const PARAM_TIME: &str = "construir.time";
/// `construir.clock=SECONDS`: the time (Unix seconds) the job's clock starts at, fixed by whoever
/// runs it (the server fixes one per job, so that its replicas see the same time). The init sets
/// the guest's clock to it unconditionally, and the job's `SOURCE_DATE_EPOCH` to it.
pub const PARAM_CLOCK: &str = "construir.clock";
/// `construir.timeout=SECONDS`: the job's time limit, enforced inside the guest by the init.
pub const PARAM_TIMEOUT: &str = "construir.timeout";
/// `construir.job=DEVICE`: the job disk, `/dev/vdb` unless given.
pub const PARAM_JOB_DEVICE: &str = "construir.job";
/// The job disk when the command line names none.
pub const DEFAULT_JOB_DEVICE: &str = "/dev/vdb";

/// Builds a guest kernel command line.
#[derive(Debug, Clone, Default)]
pub struct KernelCmdline {
    params: Vec<String>,
}

impl KernelCmdline {
    /// The base parameters, plus the emulated-host ones where `host` needs them.
    pub fn for_host(host: HostKind) -> Self {
        let mut line = Self::default();
        line.params
            .extend(BASE_PARAMS.iter().map(|p| p.to_string()));
        if host == HostKind::EmulatedKvm {
            line.params
                .extend(EMULATED_HOST_PARAMS.iter().map(|p| p.to_string()));
        }
        line
    }

    /// The whole line for running one job on `host`: the base and host-kind parameters, the host's
    /// clock now, the job's fixed clock if it has one, and the job's time limit (at least 1 s).
    pub fn for_job(host: HostKind, timeout: std::time::Duration, clock: Option<u64>) -> Self {
        let mut line = Self::for_host(host);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        line.push_guest_params(&GuestParams {
            host_time: Some(now),
            job_clock: clock,
            timeout_secs: Some(timeout.as_secs().max(1)),
            ..GuestParams::default()
        });
        line
    }

    /// Adds one parameter as given.
    pub fn push(&mut self, param: impl Into<String>) -> &mut Self {
        self.params.push(param.into());
        self
    }

    /// Adds the `construir.*` parameters for the init.
    pub fn push_guest_params(&mut self, guest: &GuestParams) -> &mut Self {
        if let Some(t) = guest.host_time {
            self.push(format!("{PARAM_TIME}={t}"));
        }
        if let Some(t) = guest.job_clock {
            self.push(format!("{PARAM_CLOCK}={t}"));
        }
        if let Some(t) = guest.timeout_secs {
            self.push(format!("{PARAM_TIMEOUT}={t}"));
        }
        if guest.job_device != DEFAULT_JOB_DEVICE {
            self.push(format!("{PARAM_JOB_DEVICE}={}", guest.job_device));
        }
        self
    }

    pub fn params(&self) -> &[String] {
        &self.params
    }
}

impl std::fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.params.join(" "))
    }
}

/// The `construir.*` parameters, as the init reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestParams {
    /// Host wall clock at VM start, Unix seconds.
    pub host_time: Option<u64>,
    /// The job's fixed clock, Unix seconds ([`PARAM_CLOCK`]).
    pub job_clock: Option<u64>,
    /// The job's time limit in seconds (`None`: no in-guest limit).
    pub timeout_secs: Option<u64>,
    /// The job disk's device path.
    pub job_device: String,
    /// Whether the emulated-host switch is on.
    pub emulated: bool,
}

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            host_time: None,
            job_clock: None,
            timeout_secs: None,
            job_device: DEFAULT_JOB_DEVICE.to_string(),
            emulated: false,
        }
    }
}

/// A `construir.*` parameter the init cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel command line: {param}={value:?} is not valid: {reason}")]
pub struct CmdlineError {
    pub param: String,
    pub value: String,
    pub reason: &'static str,
}

impl GuestParams {
    /// Parses a kernel command line (the contents of `/proc/cmdline`). Parameters that are not
    /// ours are ignored; a malformed one of ours is an error, never silently dropped.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut params = GuestParams::default();
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            let number = |reason| -> Result<u64, CmdlineError> {
                value
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| CmdlineError {
                        param: key.to_string(),
                        value: value.unwrap_or_default().to_string(),
                        reason,
                    })
            };
            match key {
                PARAM_TIME => params.host_time = Some(number("expected Unix seconds")?),
                PARAM_CLOCK => params.job_clock = Some(number("expected Unix seconds")?),
                PARAM_TIMEOUT => {
                    let secs = number("expected a number of seconds")?;
                    params.timeout_secs = (secs > 0).then_some(secs);
                }
                PARAM_JOB_DEVICE => match value {
                    Some(dev) if dev.starts_with("/dev/") && dev.len() > 5 => {
                        params.job_device = dev.to_string()
                    }
                    _ => {
                        return Err(CmdlineError {
                            param: key.to_string(),
                            value: value.unwrap_or_default().to_string(),
                            reason: "expected a /dev/ path",
                        });
                    }
                },
                EMULATED_SWITCH => params.emulated = true,
                _ => {}
            }
        }
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_hosts_get_no_emulated_params() {
        let line = KernelCmdline::for_host(HostKind::HardwareKvm).to_string();
        assert!(line.contains("reboot=k") && line.contains("root=/dev/vda"));
        for p in EMULATED_HOST_PARAMS {
            assert!(!line.contains(p), "{p} in {line}");
        }
        assert!(
            !KernelCmdline::for_host(HostKind::NoKvm)
                .to_string()
                .contains("construir.emulated")
        );
    }

    #[test]
    fn emulated_hosts_get_the_switch_and_the_avoidances() {
        let line = KernelCmdline::for_host(HostKind::EmulatedKvm).to_string();
        for p in ["construir.emulated", "noxsave", "nosmap", "nosmep", "nopti"] {
            assert!(line.split(' ').any(|w| w == p), "{p} missing in {line}");
        }
        let clear = line
            .split(' ')
            .find(|w| w.starts_with("clearcpuid="))
            .unwrap();
        for f in ["popcnt", "avx", "smap", "smep", "fsrm", "erms"] {
            assert!(
                clear["clearcpuid=".len()..].split(',').any(|x| x == f),
                "{f}"
            );
        }
    }

    #[test]
    fn guest_params_round_trip_through_the_command_line() {
        let want = GuestParams {
            host_time: Some(1_795_000_000),
            job_clock: Some(1_700_000_000),
            timeout_secs: Some(90),
            job_device: "/dev/vdc".into(),
            emulated: true,
        };
        let mut line = KernelCmdline::for_host(HostKind::EmulatedKvm);
        line.push_guest_params(&want);
        assert_eq!(GuestParams::parse(&line.to_string()).unwrap(), want);
    }

    #[test]
    fn a_job_line_carries_the_clock_and_the_limit() {
        let p = GuestParams::parse(
            &KernelCmdline::for_job(HostKind::NoKvm, std::time::Duration::from_millis(10), None)
                .to_string(),
        )
        .unwrap();
        assert_eq!(p.timeout_secs, Some(1));
        assert!(p.host_time.unwrap() > 1_700_000_000);
        assert!(!p.emulated);
        assert_eq!(p.job_clock, None, "no fixed clock unless given");
        let fixed =
            KernelCmdline::for_job(HostKind::NoKvm, std::time::Duration::from_secs(5), Some(42));
        assert_eq!(
            GuestParams::parse(&fixed.to_string()).unwrap().job_clock,
            Some(42)
        );
    }

    #[test]
    fn defaults_when_absent_and_errors_when_malformed() {
        let p = GuestParams::parse("console=ttyS0 rw\n").unwrap();
        assert_eq!(p, GuestParams::default());
        assert_eq!(
            GuestParams::parse("construir.timeout=0")
                .unwrap()
                .timeout_secs,
            None
        );
        for bad in [
            "construir.time=soon",
            "construir.clock=yesterday",
            "construir.timeout=-1",
            "construir.timeout",
            "construir.job=vdb",
            "construir.job=/dev/",
        ] {
            assert!(GuestParams::parse(bad).is_err(), "{bad}");
        }
    }
}
