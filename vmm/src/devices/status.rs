//! The status port: the guest init's bytes (`construir_contract::status`) decoded as they arrive, with
//! the time of the first write (the boot-time marker "init reached"). Constant memory whatever the
//! guest writes.

use super::bus::BusDevice;
use construir_contract::status::{GuestReport, StatusDecoder, StatusEvent};
use std::time::Instant;

#[derive(Default)]
pub struct StatusPort {
    decoder: StatusDecoder,
    first_write: Option<Instant>,
    /// Set when an outcome arrives (the VMM then expects the reset soon).
    outcome_at: Option<Instant>,
}

impl StatusPort {
    pub fn outcome(&self) -> Option<GuestReport> {
        self.decoder.outcome()
    }

    pub fn first_write(&self) -> Option<Instant> {
        self.first_write
    }

    pub fn outcome_at(&self) -> Option<Instant> {
        self.outcome_at
    }
}

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if self.first_write.is_none() {
            self.first_write = Some(Instant::now());
        }
        for &b in data {
            if let Some(StatusEvent::Outcome(_)) = self.decoder.push(b) {
                self.outcome_at = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_as_bytes_arrive() {
        let mut port = StatusPort::default();
        assert!(port.first_write().is_none());
        port.write(0, &[1]);
        assert!(port.first_write().is_some() && port.outcome().is_none());
        port.write(0, &[4]);
        port.write(0, &[3]);
        assert_eq!(port.outcome(), Some(GuestReport::Exited(3)));
        assert!(port.outcome_at().is_some());
        let mut d = [9u8];
        port.read(0, &mut d);
        assert_eq!(d, [0]);
    }
}
