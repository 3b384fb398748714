//! The VMM's own confinement, for when the guest breaks out of KVM's model into ours: resource
//! limits, a landlock ruleset that leaves only the VM's own files, and one seccomp filter per
//! thread kind. Installed after setup (everything is open and mapped) and before the first
//! KVM_RUN; docs/security.md lists and justifies every system call allowed here.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("build the seccomp filter for the {0:?} threads: {1}")]
    Filter(ThreadKind, String),
    #[error("install the seccomp filter for a {0:?} thread: {1}")]
    Install(ThreadKind, String),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("set the {what} limit: {source}")]
    Limit {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The threads of a construir-vmm process, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop (queue notifications → disk I/O →
    /// interrupts), the deadline, and the report at the end.
    Vmm,
    /// A vCPU: KVM_RUN, and port/MMIO exits handled in place (console writes, interrupts).
    Vcpu,
}

// The KVM ioctls a vCPU thread still makes: _IO/_IOR/_IOWR(KVMIO = 0xAE, nr, size).
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_WRITE: u64 = 1;
/// Runs the vCPU until its next exit.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// Registers, segment registers and a page-table walk: only on an emulation failure, to name the
/// RIP and the instruction bytes in the error.
pub const KVM_GET_REGS: u64 = ioc(
    IOC_READ,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>(),
);
pub const KVM_GET_SREGS: u64 = ioc(
    IOC_READ,
    0x83,
    std::mem::size_of::<kvm_bindings::kvm_sregs>(),
);
pub const KVM_TRANSLATE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x85,
    std::mem::size_of::<kvm_bindings::kvm_translation>(),
);

/// System calls every thread makes after setup: memory for the allocator, locks, signal return
/// (SIGINT/SIGTERM handlers), the clock when the vDSO cannot serve it, and exiting.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_write,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The event loop's own: waiting on eventfds, reading them, and the disks' I/O.
const VMM_ONLY: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_getrandom,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
];

/// The syscall numbers and rules of a thread kind's filter (an empty rule list allows the call
/// whatever its arguments).
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|&n| (n, vec![])).collect();
    // fcntl(fd, F_GETFD) only: the standard library checks a descriptor is still open when it
    // closes one (debug builds).
    map.insert(
        libc::SYS_fcntl,
        second_arg_one_of(kind, &[libc::F_GETFD as u64])?,
    );
    match kind {
        ThreadKind::Vmm => map.extend(VMM_ONLY.iter().map(|&n| (n, vec![]))),
        ThreadKind::Vcpu => {
            let requests = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_TRANSLATE];
            map.insert(libc::SYS_ioctl, second_arg_one_of(kind, &requests)?);
        }
    }
    Ok(map)
}

/// Rules allowing a call only when its second argument (an fcntl command, an ioctl request) is
/// one of `values`.
fn second_arg_one_of(kind: ThreadKind, values: &[u64]) -> Result<Vec<SeccompRule>, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Filter(kind, e.to_string());
    values
        .iter()
        .map(|&value| {
            let condition =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                    .map_err(err)?;
            SeccompRule::new(vec![condition]).map_err(err)
        })
        .collect()
}

/// The compiled filter: anything not on the list kills the whole process (SIGSYS), which the
/// runner reports as a VMM fault.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    let filter = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SandboxError::Filter(kind, e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Filter(kind, e.to_string()))
}

/// Installs `program` on the calling thread (threads it creates later inherit it).
pub fn install(kind: ThreadKind, program: &BpfProgram) -> Result<(), SandboxError> {
    seccompiler::apply_filter(program).map_err(|e| SandboxError::Install(kind, e.to_string()))
}

/// The compiled seccomp programs, one per thread kind.
pub struct Filters {
    pub vmm: BpfProgram,
    pub vcpu: std::sync::Arc<BpfProgram>,
}

/// Confines the calling thread and the threads it starts afterwards: resource limits, then
/// landlock (warning once where the kernel enforces it only in part or not at all). Returns the
/// seccomp programs for each thread to install itself.
pub fn confine_process(files: &[AllowedFile], limits: &Limits) -> Result<Filters, SandboxError> {
    apply_limits(limits)?;
    match restrict_files(files)? {
        LandlockOutcome::Enforced => {}
        LandlockOutcome::Partial => tracing::warn!(
            "landlock: this kernel enforces only part of the file-access rules (older landlock ABI)"
        ),
        LandlockOutcome::Unsupported => tracing::warn!(
            "landlock: this kernel has no landlock; the VMM's file access is limited by seccomp only (no open() after setup)"
        ),
    }
    Ok(Filters {
        vmm: program(ThreadKind::Vmm)?,
        vcpu: std::sync::Arc::new(program(ThreadKind::Vcpu)?),
    })
}

/// What a landlock ruleset did on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Every file-system access outside the listed files is denied.
    Enforced,
    /// The kernel enforced only part of the rights we asked for (an older landlock ABI).
    Partial,
    /// The kernel has no landlock: nothing was restricted (the caller warns once).
    Unsupported,
}

/// A file the VMM may still open after setup, and how.
#[derive(Debug, Clone)]
pub struct AllowedFile {
    pub path: PathBuf,
    pub write: bool,
}

/// Restricts the calling thread and the threads it creates afterwards (so: call it before the
/// vCPU threads start) to `files`: every other path, for reading, writing, creating, removing
/// or executing, is denied. The VMM's files are open by then; the rules keep a reopen of its
/// own files possible and nothing else.
pub fn restrict_files(files: &[AllowedFile]) -> Result<LandlockOutcome, SandboxError> {
    use landlock::{
        ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus,
    };
    let abi = ABI::V2;
    let err = |e: &dyn std::fmt::Display| SandboxError::Landlock(e.to_string());
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    for file in files {
        let access = if file.write {
            AccessFs::ReadFile | AccessFs::WriteFile
        } else {
            AccessFs::ReadFile.into()
        };
        let fd = PathFd::new(&file.path).map_err(|e| err(&e))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&e))?;
    }
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Enforced,
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Partial,
        RulesetStatus::NotEnforced => LandlockOutcome::Unsupported,
    })
}

/// Resource limits of the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open file descriptors.
    pub open_files: u64,
    /// Largest file the process may write (the root overlay grows up to the root disk's size).
    pub file_size: u64,
    /// Address space: guest memory, plus the VMM's own.
    pub address_space: u64,
}

/// Open descriptors: a VM uses ~25 (stdio, /dev/kvm, VM and vCPU fds, disks, console, eventfds,
/// epoll); none are opened once the guest runs.
pub const OPEN_FILES: u64 = 64;

/// The VMM's own address space beyond guest memory: binary, heap, thread stacks, and glibc's
/// per-thread malloc arenas (64 MiB of reservations each).
pub const ADDRESS_SPACE_MARGIN: u64 = 1 << 30;

impl Limits {
    /// The limits for a VM: `largest_disk` is the larger of the root disk (its overlay grows up to
    /// that size) and the job disk, which is the job file's size and at most `--max-job-size`
    /// (checked when it is opened, `crate::job`), so a job cannot raise the limit past that cap.
    pub fn for_vm(guest_memory: u64, largest_disk: u64, console_cap: u64) -> Self {
        Limits {
            open_files: OPEN_FILES,
            file_size: largest_disk.max(console_cap) + (1 << 20),
            address_space: guest_memory + ADDRESS_SPACE_MARGIN,
        }
    }
}

/// No core dumps (guest memory would land on the host's disk), and the limits above.
pub fn apply_limits(limits: &Limits) -> Result<(), SandboxError> {
    let set = |what: &'static str, resource, value: u64| {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads a valid rlimit struct we own.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(SandboxError::Limit {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    set("core dump", libc::RLIMIT_CORE, 0)?;
    set("open files", libc::RLIMIT_NOFILE, limits.open_files)?;
    set("file size", libc::RLIMIT_FSIZE, limits.file_size)?;
    set("address space", libc::RLIMIT_AS, limits.address_space)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> as strace shows them.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
    }

    #[test]
    fn filters_compile_and_differ_by_thread() {
        let vmm = rules(ThreadKind::Vmm).unwrap();
        let vcpu = rules(ThreadKind::Vcpu).unwrap();
        // Disk I/O only in the event loop; KVM only in vCPUs; no thread can make a socket,
        // open a file, start a process or change its privileges.
        assert!(vmm.contains_key(&libc::SYS_pread64) && !vcpu.contains_key(&libc::SYS_pread64));
        assert!(vcpu.contains_key(&libc::SYS_ioctl) && !vmm.contains_key(&libc::SYS_ioctl));
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_setuid,
            libc::SYS_kill,
            libc::SYS_mount,
        ] {
            assert!(
                !vmm.contains_key(&forbidden) && !vcpu.contains_key(&forbidden),
                "{forbidden}"
            );
        }
        assert!(!program(ThreadKind::Vmm).unwrap().is_empty());
        assert!(!program(ThreadKind::Vcpu).unwrap().is_empty());
    }

    /// Runs `body` in a forked child under `kind`'s filter (so a kill does not take the test
    /// harness with it); returns the child's wait status. The child exits with `body`'s code,
    /// or 3 when the filter cannot be installed.
    fn in_filtered_child(kind: ThreadKind, body: fn() -> i32) -> i32 {
        let prog = program(kind).unwrap();
        // SAFETY: fork in a test; the child only installs the filter, makes raw system calls
        // and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = if install(kind, &prog).is_ok() {
                body()
            } else {
                3
            };
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    #[test]
    fn a_forbidden_call_kills_the_process() {
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // SAFETY: a raw socket() call; the filter kills the process before it returns.
            unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn allowed_calls_go_through() {
        let status = in_filtered_child(ThreadKind::Vcpu, || {
            // An ioctl the filter allows, on a bad descriptor: EBADF, not death.
            // SAFETY: raw ioctl on fd -1.
            let r = unsafe { libc::syscall(libc::SYS_ioctl, -1, KVM_RUN, 0) };
            if r == -1 { 0 } else { 4 }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }

    #[test]
    fn limits_leave_room_for_the_vm() {
        let l = Limits::for_vm(512 << 20, 4 << 30, 16 << 20);
        assert_eq!(l.open_files, OPEN_FILES);
        assert!(l.file_size > 4 << 30);
        assert_eq!(l.address_space, (512 << 20) + ADDRESS_SPACE_MARGIN);
    }
}
