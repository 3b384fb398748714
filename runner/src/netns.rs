//! No network for the VMs, whatever the runner itself may reach: every backend child is put, before
//! it executes the launcher, in a network namespace of its own, empty but for a loopback that is
//! down. The VMs have no network device anyway; this is for the case where a guest escapes into
//! the VMM process (QEMU's TCG, above all, is a large attack surface): there is still nothing to
//! connect to, not even the runner's own host.
//!
//! `unshare(CLONE_NEWNET)` needs CAP_SYS_ADMIN; an unprivileged runner uses
//! `unshare(CLONE_NEWUSER | CLONE_NEWNET)` instead: the new user namespace owns the new network
//! namespace. The process keeps its kernel credentials (its uid and groups outside, where the
//! files are), so `/dev/kvm` by group, the images and the job file open as before; inside it shows
//! as the overflow user, and its capabilities in the new namespace are dropped at exec (it is not
//! uid 0 there).
//!
//! Which of the two works is probed once per process ([`mode`]), in a forked child.

use std::io;
use std::sync::OnceLock;

/// How backend children are kept off the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A new network namespace (the runner has CAP_SYS_ADMIN: root, or a unit that grants it).
    NetNs,
    /// A new user namespace owning a new network namespace (an unprivileged runner).
    UserNetNs,
    /// Neither could be made (a sandbox that forbids namespaces, such as the local systemd unit,
    /// whose own network namespace is empty already).
    None,
}

impl Isolation {
    /// The `unshare` flags.
    fn flags(self) -> Option<libc::c_int> {
        match self {
            Isolation::NetNs => Some(libc::CLONE_NEWNET),
            Isolation::UserNetNs => Some(libc::CLONE_NEWUSER | libc::CLONE_NEWNET),
            Isolation::None => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Isolation::NetNs => "a network namespace of their own",
            Isolation::UserNetNs => {
                "a network namespace of their own (in a user namespace: the runner is unprivileged)"
            }
            Isolation::None => "no network namespace of their own (none could be made)",
        }
    }
}

/// What the probe found: the mode, and why the better modes failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub isolation: Isolation,
    /// The errors of the modes tried before the one that worked (all of them, for `None`).
    pub failures: Vec<String>,
}

static PROBED: OnceLock<Probe> = OnceLock::new();

/// The isolation every backend child gets in this process, probed at the first call. Where
/// none is possible this warns once (the local queue mode goes on: its systemd unit has
/// `PrivateNetwork=yes`; the pull mode refuses to start, see main.rs).
pub fn mode() -> &'static Probe {
    PROBED.get_or_init(|| {
        let probe = probe();
        if probe.isolation == Isolation::None {
            tracing::warn!(
                "the backends cannot get a network namespace of their own ({}); they share the \
                 runner's network (harmless under the local unit's PrivateNetwork=yes)",
                probe.failures.join("; ")
            );
        }
        probe
    })
}

/// Tries each mode in a forked child, best first.
pub fn probe() -> Probe {
    let mut failures = Vec::new();
    for isolation in [Isolation::NetNs, Isolation::UserNetNs] {
        match try_in_child(isolation) {
            Ok(()) => {
                return Probe {
                    isolation,
                    failures,
                };
            }
            Err(e) => failures.push(format!(
                "unshare({}): {e}",
                match isolation {
                    Isolation::NetNs => "CLONE_NEWNET",
                    _ => "CLONE_NEWUSER | CLONE_NEWNET",
                }
            )),
        }
    }
    Probe {
        isolation: Isolation::None,
        failures,
    }
}

/// Whether `isolation` can be set up: a forked child tries it and reports by its exit status
/// (the errno), so the runner's own namespaces never change.
fn try_in_child(isolation: Isolation) -> io::Result<()> {
    let flags = isolation.flags().unwrap_or(0);
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe, so forking a
    // process that may have other threads is sound.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the forked child: unshare, then _exit without running any destructor.
        unsafe {
            let code = if libc::unshare(flags) == 0 {
                0
            } else {
                (*libc::__errno_location()).clamp(1, 255)
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for the child just forked, into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, errno) => Err(io::Error::from_raw_os_error(errno)),
        _ => Err(io::Error::other("the probe child died")),
    }
}

/// Puts the calling process in its own network namespace as `isolation` says. For the child
/// between fork and exec (`CommandExt::pre_exec`): it only calls `unshare`.
pub fn enter(isolation: Isolation) -> io::Result<()> {
    let Some(flags) = isolation.flags() else {
        return Ok(());
    };
    // SAFETY: unshare takes plain flags; it is async-signal-safe.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The interfaces in `/proc/PID/net/dev` (that file shows the network namespace of PID).
pub fn interfaces_of(pid: u32) -> io::Result<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
    Ok(parse_net_dev(&text))
}

/// The interface names of a `/proc/net/dev` table (two header lines, then `NAME: counters`).
pub fn parse_net_dev(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    #[test]
    fn net_dev_tables_are_parsed() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets|bytes\n    lo: 0 0 0\n  eth0: 1 2 3\n";
        assert_eq!(parse_net_dev(text), ["lo", "eth0"]);
        assert!(parse_net_dev("").is_empty());
    }

    /// A child spawned the way backends are sees no interface but a loopback that is down:
    /// from outside through /proc/PID/net/dev, from inside through `ip -o link`. Both modes are
    /// checked where this host allows them (as root, both).
    #[test]
    fn a_backend_child_has_only_a_down_loopback() {
        let modes: Vec<Isolation> = [Isolation::NetNs, Isolation::UserNetNs]
            .into_iter()
            .filter(|m| try_in_child(*m).is_ok())
            .collect();
        if modes.is_empty() {
            // Not a failure of the runner: this sandbox forbids namespaces (the pull mode
            // refuses to start in one). Said loudly, as the KVM tests do.
            eprintln!(
                "\n!!!!!!!!!! NOT RUN: no network namespace can be made here ({}) !!!!!!!!!!\n",
                probe().failures.join("; ")
            );
            return;
        }
        for isolation in modes {
            check_child(isolation);
        }
    }

    fn check_child(isolation: Isolation) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ip -o link 2>&1 || echo 'no ip'; echo; read line"]);
        // SAFETY: enter only calls unshare, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || enter(isolation));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // While the child waits on its stdin, look at its namespace from outside.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let seen = interfaces_of(child.id()).unwrap();
        let ours = interfaces_of(std::process::id()).unwrap();
        let ns_of = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let (theirs, mine) = (ns_of(child.id()), ns_of(std::process::id()));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert_ne!(theirs, mine, "{isolation:?}: another namespace");
        assert_eq!(
            seen,
            ["lo"],
            "{isolation:?}: the child's interfaces (ours: {ours:?})"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let links: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).collect();
        if links == ["no ip"] {
            eprintln!("no `ip` here: only /proc/PID/net/dev was checked");
            return;
        }
        assert_eq!(links.len(), 1, "{isolation:?}: {text}");
        assert!(links[0].contains(": lo:"), "{text}");
        assert!(
            links[0].contains("state DOWN") && !links[0].contains(",UP"),
            "{isolation:?}: {text}"
        );
    }

    #[test]
    fn the_probe_is_stable_and_enter_of_none_does_nothing() {
        assert_eq!(probe().isolation, mode().isolation);
        enter(Isolation::None).unwrap();
    }
}
