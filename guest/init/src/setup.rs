//! The guest's file systems, device names and clock, before the job runs.

use crate::say;
use anyhow::{Context, bail};
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    // The kernel mounts devtmpfs on /dev itself (DEVTMPFS_MOUNT); EBUSY then is fine.
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
];

fn mount(m: &Mount) -> anyhow::Result<()> {
    std::fs::create_dir_all(m.target).with_context(|| format!("mkdir {}", m.target))?;
    let c = |s: &str| CString::new(s).expect("no NUL in constants");
    let (source, target, fstype, data) = (c(m.source), c(m.target), c(m.fstype), c(m.data));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            bail!("mount {} on {}: {err}", m.fstype, m.target);
        }
    }
    Ok(())
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm and /run, and makes /tmp world-writable.
pub fn mount_filesystems() -> anyhow::Result<()> {
    for m in MOUNTS {
        mount(m)?;
    }
    std::fs::create_dir_all("/tmp").context("mkdir /tmp")?;
    std::fs::set_permissions("/tmp", std::fs::Permissions::from_mode(0o1777))
        .context("chmod /tmp")?;
    Ok(())
}

/// Symbolic links the init makes in /dev for shells.
pub const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// The root and job disks under both names: construir's VMs give them as virtio-blk (vda, vdb),
/// seed jobs write their output to /dev/sdb, and a machine with IDE/SCSI disks (QEMU's default
/// machine, used as a benchmark baseline) has sda and sdb. Whichever pair exists gets the other
/// pair's names as links; `None` when neither pair does.
pub fn disk_links(
    virtio_present: bool,
    scsi_present: bool,
) -> Option<[(&'static str, &'static str); 2]> {
    if virtio_present {
        Some([("/dev/sda", "vda"), ("/dev/sdb", "vdb")])
    } else if scsi_present {
        Some([("/dev/vda", "sda"), ("/dev/vdb", "sdb")])
    } else {
        None
    }
}

pub fn alias_disks() -> anyhow::Result<()> {
    let present = |a: &str, b: &str| Path::new(a).exists() && Path::new(b).exists();
    let Some(disks) = disk_links(
        present("/dev/vda", "/dev/vdb"),
        present("/dev/sda", "/dev/sdb"),
    ) else {
        bail!(
            "/dev/vda and /dev/vdb are missing: the VM must give the root disk and the job disk as virtio-blk"
        );
    };
    for (link, target) in disks.iter().chain(DEV_LINKS) {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("ln -s {target} {link}")),
        }
    }
    Ok(())
}

/// The wall-clock time to set, if any: the guest's clock is behind the host's time at VM start
/// (no RTC, no kvmclock under TCG), so it becomes that time plus the time since boot.
pub fn clock_correction(
    guest_now: i64,
    host_time_at_start: Option<u64>,
    uptime: i64,
) -> Option<i64> {
    let host = i64::try_from(host_time_at_start?).ok()?;
    (guest_now < host).then_some(host.saturating_add(uptime.max(0)))
}

fn clock_seconds(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec
}

/// Sets the wall clock: to the job's fixed time when it has one (unconditionally: its replicas
/// on other runners start at the same time, whatever their hosts' clocks say), else from the
/// host's time when the guest's is behind it.
pub fn set_clock(host_time: Option<u64>, job_clock: Option<u64>) {
    let now = clock_seconds(libc::CLOCK_REALTIME);
    let uptime = clock_seconds(libc::CLOCK_BOOTTIME);
    let fixed = job_clock.and_then(|t| i64::try_from(t).ok());
    let Some(target) = fixed.or_else(|| clock_correction(now, host_time, uptime)) else {
        return;
    };
    let ts = libc::timespec {
        tv_sec: target,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_REALTIME may be set by root.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == 0 {
        let whose = if fixed.is_some() {
            "the job's fixed"
        } else {
            "the host's"
        };
        say!("clock was at {now}, set to {whose} time {target} (Unix seconds)");
    } else {
        say!("cannot set the clock: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_only() {
        // TCG: the guest thinks it is 1970, 3 s after boot.
        assert_eq!(
            clock_correction(3, Some(1_795_000_000), 3),
            Some(1_795_000_003)
        );
        // kvmclock already right: leave it.
        assert_eq!(
            clock_correction(1_795_000_100, Some(1_795_000_000), 100),
            None
        );
        assert_eq!(clock_correction(3, None, 3), None);
    }

    #[test]
    fn the_seed_device_names_are_aliased() {
        let virtio = disk_links(true, false).unwrap();
        assert!(virtio.contains(&("/dev/sdb", "vdb")) && virtio.contains(&("/dev/sda", "vda")));
        // Both pairs present (never in practice): virtio wins, nothing links to itself.
        assert_eq!(disk_links(true, true), Some(virtio));
        let ide = disk_links(false, true).unwrap();
        assert!(ide.contains(&("/dev/vdb", "sdb")) && ide.contains(&("/dev/vda", "sda")));
        assert_eq!(disk_links(false, false), None);
    }
}
