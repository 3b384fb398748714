//! What kind of host runs the guest: hardware KVM, an emulated (software, nested) KVM, or none.
//!
//! Emulated KVM (this workplace's `kvm_pvm`) runs the guest kernel through KVM's instruction
//! emulator: it boots only with our kernel's `construir.emulated` switch and takes minutes, and
//! QEMU's TCG is faster there for real work. The test: `/dev/kvm` exists, and either the `kvm_pvm`
//! module is loaded, or the CPU is itself a guest (`hypervisor` flag) that shows neither `vmx` nor
//! `svm` — without those, the KVM it offers cannot be hardware-assisted.

use std::path::Path;

/// The kind of host, as far as running guests goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostKind {
    /// `/dev/kvm` backed by VMX or SVM.
    HardwareKvm,
    /// `/dev/kvm` backed by a software KVM (guest kernel emulated instruction by instruction).
    EmulatedKvm,
    /// No usable `/dev/kvm`.
    NoKvm,
}

impl HostKind {
    /// A stable lower-case name for records and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::HardwareKvm => "hardware-kvm",
            HostKind::EmulatedKvm => "emulated-kvm",
            HostKind::NoKvm => "no-kvm",
        }
    }

    /// Whether KVM can be used at all.
    pub fn has_kvm(self) -> bool {
        self != HostKind::NoKvm
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HostKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hardware" | "hardware-kvm" => Ok(HostKind::HardwareKvm),
            "emulated" | "emulated-kvm" => Ok(HostKind::EmulatedKvm),
            "none" | "no-kvm" => Ok(HostKind::NoKvm),
            other => Err(format!(
                "unknown host kind {other:?} (expected hardware, emulated or none)"
            )),
        }
    }
}

/// The facts the classification rests on, read from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` can be opened read-write.
    pub kvm_device: bool,
    /// A software KVM module is loaded (`/sys/module/kvm_pvm`).
    pub software_kvm_module: bool,
    /// The CPU flags of `/proc/cpuinfo` (first processor).
    pub cpu_flags: Vec<String>,
}

impl HostFacts {
    /// Reads the facts from this host.
    pub fn read() -> Self {
        Self::read_from(Path::new("/"))
    }

    /// Reads the facts below `root` (a test can lay out a fake `/dev`, `/sys`, `/proc`).
    pub fn read_from(root: &Path) -> Self {
        let kvm_device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(root.join("dev/kvm"))
            .is_ok();
        let software_kvm_module = root.join("sys/module/kvm_pvm").exists();
        let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        HostFacts {
            kvm_device,
            software_kvm_module,
            cpu_flags: cpu_flags(&cpuinfo),
        }
    }

    /// Classifies the host.
    pub fn kind(&self) -> HostKind {
        if !self.kvm_device {
            return HostKind::NoKvm;
        }
        let has = |f: &str| self.cpu_flags.iter().any(|x| x == f);
        let hardware_virt = has("vmx") || has("svm");
        if self.software_kvm_module || (has("hypervisor") && !hardware_virt) {
            HostKind::EmulatedKvm
        } else {
            HostKind::HardwareKvm
        }
    }
}

/// The `flags` line of the first processor in a `/proc/cpuinfo` text.
pub fn cpu_flags(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// Detects this host's kind.
pub fn detect() -> HostKind {
    HostFacts::read().kind()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kvm: bool, pvm: bool, flags: &str) -> HostFacts {
        HostFacts {
            kvm_device: kvm,
            software_kvm_module: pvm,
            cpu_flags: cpu_flags(&format!("processor\t: 0\nflags\t\t: {flags}\n")),
        }
    }

    #[test]
    fn classification() {
        assert_eq!(facts(false, false, "vmx").kind(), HostKind::NoKvm);
        assert_eq!(
            facts(true, false, "fpu vmx sse").kind(),
            HostKind::HardwareKvm
        );
        assert_eq!(facts(true, false, "fpu svm").kind(), HostKind::HardwareKvm);
        // A nested guest with VMX passed through is hardware-assisted.
        assert_eq!(
            facts(true, false, "hypervisor vmx").kind(),
            HostKind::HardwareKvm
        );
        // This workplace: kvm_pvm, hypervisor flag, no vmx/svm.
        assert_eq!(
            facts(true, true, "fpu hypervisor").kind(),
            HostKind::EmulatedKvm
        );
        assert_eq!(
            facts(true, false, "fpu hypervisor sse").kind(),
            HostKind::EmulatedKvm
        );
        assert_eq!(facts(true, true, "svm").kind(), HostKind::EmulatedKvm);
    }

    #[test]
    fn reads_a_fake_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/module/kvm_pvm")).unwrap();
        std::fs::write(dir.path().join("dev/kvm"), b"").unwrap();
        std::fs::write(dir.path().join("proc/cpuinfo"), "flags : fpu hypervisor\n").unwrap();
        let f = HostFacts::read_from(dir.path());
        assert!(f.kvm_device && f.software_kvm_module);
        assert_eq!(f.kind(), HostKind::EmulatedKvm);
        std::fs::remove_file(dir.path().join("dev/kvm")).unwrap();
        assert_eq!(HostFacts::read_from(dir.path()).kind(), HostKind::NoKvm);
    }

    #[test]
    fn names_parse_back() {
        for k in [
            HostKind::HardwareKvm,
            HostKind::EmulatedKvm,
            HostKind::NoKvm,
        ] {
            assert_eq!(k.as_str().parse::<HostKind>().unwrap(), k);
        }
        assert!("tcg".parse::<HostKind>().is_err());
    }
}
