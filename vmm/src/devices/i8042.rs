//! The i8042 keyboard controller at 0x60/0x64 (vm-superio's model): the guest's `reboot=k`
//! writes 0xFE (pulse reset) to port 0x64, which fires the reset event that ends the VM.

use super::EventTrigger;
use super::bus::BusDevice;
use crate::faults::Fault;
use vm_superio::I8042Device;

pub struct I8042(pub I8042Device<EventTrigger>);

impl I8042 {
    pub fn new(reset: EventTrigger) -> Self {
        Self(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && let Err(e) = self.0.write(offset as u8, data[0])
            && super::LEGACY_FAULTS.note(Fault::Trigger)
        {
            tracing::warn!("i8042: cannot signal the reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_fires_the_event() {
        let reset = EventTrigger::new().unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        assert!(
            reset.0.read().is_err(),
            "nothing yet (non-blocking read fails)"
        );
        dev.write(4, &[0xfe]);
        assert_eq!(reset.0.read().unwrap(), 1);
    }
}
