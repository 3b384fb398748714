//! Legacy devices on the I/O-port bus: the serial console, the i8042 (its reset ends the VM), and
//! the status port the guest init reports on. `bus` dispatches port and MMIO accesses by range.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod status;

use crate::faults::FaultLog;

/// The legacy devices' guest-caused failures (one serial port and one i8042 per process), reported
/// when the VM ends.
pub static LEGACY_FAULTS: FaultLog = FaultLog::new();

/// An interrupt line or event the devices pull: an eventfd (registered with KVM as an irqfd, or
/// watched by the VMM for the exit).
#[derive(Debug)]
pub struct EventTrigger(pub vmm_sys_util::eventfd::EventFd);

impl EventTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self(vmm_sys_util::eventfd::EventFd::new(
            libc::EFD_NONBLOCK,
        )?))
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
