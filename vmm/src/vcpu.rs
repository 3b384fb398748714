//! vCPU threads: the KVM_RUN loop and what each exit means. `handle_exit` is a free function over
//! an exit value, so tests feed it exits without KVM.

use crate::devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stops, as a vCPU or device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset itself (i8042 reset, triple fault) or asked to power off.
    GuestEnded(String),
    /// KVM could not run the guest: emulation failure and the like.
    InternalError {
        suberror: u32,
        rip: u64,
        bytes: Vec<u8>,
    },
    /// KVM could not enter the guest.
    FailEntry(u64),
    /// KVM_RUN failed or gave an exit we cannot handle.
    Error(String),
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    Stop(StopReason),
    /// An internal error: the loop adds RIP and the instruction bytes.
    InternalError,
}

/// Handles one exit: port and MMIO accesses go to the buses; ends and errors stop the VM.
pub fn handle_exit(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            pio.read(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            mmio.read(addr, data);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            ExitAction::Continue
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => ExitAction::Continue,
        VcpuExit::Shutdown => ExitAction::Stop(StopReason::GuestEnded(
            "the guest shut down (triple fault or reset)".into(),
        )),
        VcpuExit::SystemEvent(kind, _) => ExitAction::Stop(StopReason::GuestEnded(format!(
            "the guest asked for system event {kind} (reset or power-off)"
        ))),
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, _) => ExitAction::Stop(StopReason::FailEntry(reason)),
        other => ExitAction::Stop(StopReason::Error(format!("unexpected vCPU exit {other:?}"))),
    }
}

/// Shared between vCPU threads and the VMM loop: the first stop reason wins.
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    /// Set with the reason; read after every vCPU exit without taking the lock.
    stopped: AtomicBool,
    pub event: EventFd,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            stopped: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().expect("stop lock");
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
    }

    /// Whether the VM is stopping (cheap: no lock).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().expect("stop lock").clone()
    }
}

/// The instruction bytes at the guest's RIP, for an emulation-failure report.
fn instruction_bytes(vcpu: &VcpuFd, mem: &GuestMemoryMmap, rip: u64) -> Vec<u8> {
    let Ok(t) = vcpu.translate_gva(rip) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let mut bytes = vec![0u8; 16];
    match mem.read_slice(&mut bytes, GuestAddress(t.physical_address)) {
        Ok(()) => bytes,
        Err(_) => Vec::new(),
    }
}

/// Runs a vCPU until the VM stops. `first_run` records when vCPU 0 first entered the guest.
pub fn run_vcpu(
    mut vcpu: VcpuFd,
    pio: Bus,
    mmio: Bus,
    mem: GuestMemoryMmap,
    stop: Arc<StopSignal>,
    first_run: Option<Arc<Mutex<Option<Instant>>>>,
) {
    if let Some(first) = first_run {
        *first.lock().expect("timing lock") = Some(Instant::now());
    }
    loop {
        if stop.is_stopped() {
            return;
        }
        let action = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &pio, &mmio),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(e) => ExitAction::Stop(StopReason::Error(format!("KVM_RUN failed: {e}"))),
        };
        match action {
            ExitAction::Continue => {}
            ExitAction::Stop(reason) => {
                stop.stop(reason);
                return;
            }
            ExitAction::InternalError => {
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                let bytes = instruction_bytes(&vcpu, &mem, rip);
                stop.stop(StopReason::InternalError {
                    suberror,
                    rip,
                    bytes,
                });
                return;
            }
        }
    }
}

/// A one-line description of an internal error.
pub fn describe_internal_error(suberror: u32, rip: u64, bytes: &[u8]) -> String {
    let what = match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        _ => "internal error",
    };
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "KVM could not run the guest: {what} (suberror {suberror}) at RIP {rip:#x}, instruction bytes [{}]",
        if hex.is_empty() {
            "unreadable".to_string()
        } else {
            hex.join(" ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;

    struct Port(Vec<u8>);
    impl BusDevice for Port {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(0x42);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0.extend_from_slice(d);
        }
    }

    #[test]
    fn exits_dispatch_and_stop() {
        let port = Arc::new(Mutex::new(Port(vec![])));
        let mut pio = Bus::new();
        pio.insert(port.clone(), 0x3f8, 8).unwrap();
        let mmio = Bus::new();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"h"), &pio, &mmio),
            ExitAction::Continue
        );
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3f9, &mut data), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0x42]);
        let mut unclaimed = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut unclaimed), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(unclaimed, [0xff; 4]);
        assert_eq!(port.lock().unwrap().0, b"h");
        assert!(matches!(
            handle_exit(VcpuExit::Shutdown, &pio, &mmio),
            ExitAction::Stop(StopReason::GuestEnded(_))
        ));
        assert!(matches!(
            handle_exit(VcpuExit::SystemEvent(1, &[]), &pio, &mmio),
            ExitAction::Stop(StopReason::GuestEnded(_))
        ));
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &pio, &mmio),
            ExitAction::InternalError
        );
        assert!(matches!(
            handle_exit(VcpuExit::Unknown, &pio, &mmio),
            ExitAction::Stop(StopReason::Error(_))
        ));
    }

    #[test]
    fn internal_errors_name_rip_and_bytes() {
        let s = describe_internal_error(1, 0xffff_ffff_8100_0000, &[0x0f, 0x01, 0xca]);
        assert!(
            s.contains("emulation failure")
                && s.contains("0xffffffff81000000")
                && s.contains("0f 01 ca"),
            "{s}"
        );
        assert!(describe_internal_error(9, 0, &[]).contains("unreadable"));
    }

    #[test]
    fn the_first_stop_reason_wins() {
        let s = StopSignal::new().unwrap();
        s.stop(StopReason::Error("a".into()));
        s.stop(StopReason::Error("b".into()));
        assert!(s.is_stopped());
        assert_eq!(s.reason(), Some(StopReason::Error("a".into())));
        assert_eq!(s.event.read().unwrap(), 2);
    }
}
