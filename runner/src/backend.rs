//! How a job runs: `construir-vmm` (hardware KVM), `construir-qemu` (TCG, or KVM when asked), or a
//! test program with the same command line. Every backend gets the same arguments and prints the
//! same one-line JSON summary, so the runner makes the same record from any of them.

use crate::runcore::VmLimits;
use construir_contract::host::HostKind;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// construir-vmm.
    Vmm { exe: PathBuf },
    /// construir-qemu with this accelerator.
    Qemu { exe: PathBuf, accel: &'static str },
    /// A program with the launchers' command line (tests drive failure cases with it).
    Program { exe: PathBuf },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Vmm { .. } => "vmm",
            Backend::Qemu { .. } => "qemu",
            Backend::Program { .. } => "program",
        }
    }

    /// The command that runs `job` in a guest of the image's size.
    pub fn command(
        &self,
        job: &Path,
        images_dir: &Path,
        timeout: Duration,
        console_log: &Path,
        max_job_size: u64,
    ) -> Command {
        self.command_with(
            job,
            images_dir,
            timeout,
            console_log,
            max_job_size,
            &VmLimits::default(),
        )
    }

    /// The command that runs `job` within `limits` (memory, vCPUs and console cap the job was
    /// given; the launchers take them as flags).
    pub fn command_with(
        &self,
        job: &Path,
        images_dir: &Path,
        timeout: Duration,
        console_log: &Path,
        max_job_size: u64,
        limits: &VmLimits,
    ) -> Command {
        let exe = match self {
            Backend::Vmm { exe } | Backend::Qemu { exe, .. } | Backend::Program { exe } => exe,
        };
        let mut cmd = Command::new(exe);
        cmd.arg("--job")
            .arg(job)
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--timeout")
            .arg(format!("{}s", timeout.as_secs().max(1)))
            .arg("--console")
            .arg(console_log)
            .arg("--max-job-size")
            .arg(max_job_size.to_string())
            .arg("--json");
        if let Backend::Qemu { accel, .. } = self {
            cmd.arg("--accel").arg(accel);
        }
        if let Some(mib) = limits.memory_mib {
            cmd.arg("--memory").arg(format!("{mib}M"));
        }
        if let Some(n) = limits.vcpus {
            cmd.arg("--vcpus").arg(n.to_string());
        }
        if let Some(cap) = limits.console_cap {
            cmd.arg("--console-cap").arg(cap.to_string());
        }
        if let Some(t) = limits.clock {
            cmd.arg("--clock").arg(t.to_string());
        }
        cmd
    }

    /// The accelerator this backend's guests get on `host`, as a speed class in the API's host
    /// kinds: `hardware` (hardware-assisted KVM), `emulated` (a software KVM: minutes per boot),
    /// `none` (QEMU's TCG, no KVM at all). A server ranks runners by it.
    pub fn speed_class(&self, host: HostKind) -> &'static str {
        let kvm_host = match host {
            HostKind::HardwareKvm => "hardware",
            HostKind::EmulatedKvm => "emulated",
            HostKind::NoKvm => "none",
        };
        match self {
            Backend::Vmm { .. } | Backend::Program { .. } => kvm_host,
            Backend::Qemu { accel: "kvm", .. } => kvm_host,
            Backend::Qemu { .. } => "none",
        }
    }

    /// How long the runner waits for the backend before killing it: the job's limit, the backend's
    /// own boot allowance, and a margin for its start and exit.
    pub fn hard_limit(&self, timeout: Duration, host: HostKind) -> Duration {
        let emulated_kernel = host == HostKind::EmulatedKvm
            && matches!(
                self,
                Backend::Vmm { .. } | Backend::Qemu { accel: "kvm", .. }
            );
        timeout + construir_launcher::boot_allowance(emulated_kernel) + Duration::from_secs(120)
    }
}

/// What `auto` picks on `host`, and why (said once at start).
pub fn choose(requested: &str, host: HostKind, dir: &Path) -> Result<(Backend, String), String> {
    let vmm = Backend::Vmm {
        exe: dir.join("construir-vmm"),
    };
    let tcg = Backend::Qemu {
        exe: dir.join("construir-qemu"),
        accel: "tcg",
    };
    match requested {
        "vmm" => Ok((vmm, "asked for".into())),
        "qemu" => {
            let accel = if host == HostKind::HardwareKvm { "kvm" } else { "tcg" };
            Ok((Backend::Qemu { exe: dir.join("construir-qemu"), accel }, format!("asked for (QEMU with {accel})")))
        }
        "auto" => Ok(match host {
            HostKind::HardwareKvm => (vmm, "this host has hardware KVM".into()),
            HostKind::EmulatedKvm => (
                tcg,
                "this host's KVM is emulated (no hardware virtualization): QEMU's TCG runs jobs far faster here; \
                 construir-vmm's path on such hosts is for tests"
                    .into(),
            ),
            HostKind::NoKvm => (tcg, "this host has no /dev/kvm: QEMU with TCG".into()),
        }),
        other => Err(format!("--backend {other:?}: expected auto, vmm or qemu")),
    }
}

/// The directory the construir binaries live in (next to the runner's own executable).
pub fn binaries_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_vmm_only_on_hardware() {
        let d = Path::new("/bin");
        assert_eq!(
            choose("auto", HostKind::HardwareKvm, d).unwrap().0.name(),
            "vmm"
        );
        let (b, why) = choose("auto", HostKind::EmulatedKvm, d).unwrap();
        assert_eq!(
            b,
            Backend::Qemu {
                exe: d.join("construir-qemu"),
                accel: "tcg"
            }
        );
        assert!(why.contains("emulated"));
        assert_eq!(choose("auto", HostKind::NoKvm, d).unwrap().0.name(), "qemu");
        assert_eq!(
            choose("qemu", HostKind::HardwareKvm, d).unwrap().0,
            Backend::Qemu {
                exe: d.join("construir-qemu"),
                accel: "kvm"
            }
        );
        assert!(choose("firecracker", HostKind::NoKvm, d).is_err());
    }

    #[test]
    fn the_speed_class_is_what_the_guests_get() {
        let d = Path::new("/bin");
        let class = |req, host| choose(req, host, d).unwrap().0.speed_class(host);
        assert_eq!(class("auto", HostKind::HardwareKvm), "hardware");
        assert_eq!(class("qemu", HostKind::HardwareKvm), "hardware");
        assert_eq!(class("auto", HostKind::EmulatedKvm), "none", "TCG there");
        assert_eq!(class("vmm", HostKind::EmulatedKvm), "emulated");
        assert_eq!(class("auto", HostKind::NoKvm), "none");
    }

    #[test]
    fn commands_carry_the_same_arguments() {
        let b = Backend::Qemu {
            exe: "/x/construir-qemu".into(),
            accel: "tcg",
        };
        let cmd = b.command(
            Path::new("/q/a_t0.tar.xz"),
            Path::new("/img"),
            Duration::from_secs(90),
            Path::new("/l/a.log"),
            1 << 20,
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--job",
                "/q/a_t0.tar.xz",
                "--images-dir",
                "/img",
                "--timeout",
                "90s",
                "--console",
                "/l/a.log",
                "--max-job-size",
                "1048576",
                "--json",
                "--accel",
                "tcg"
            ]
        );
        assert_eq!(
            b.hard_limit(Duration::from_secs(10), HostKind::EmulatedKvm),
            Duration::from_secs(190)
        );
        let v = Backend::Vmm {
            exe: "/x/construir-vmm".into(),
        };
        assert_eq!(
            v.hard_limit(Duration::from_secs(10), HostKind::EmulatedKvm),
            Duration::from_secs(730)
        );
    }
}
