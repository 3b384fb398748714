//! The COM1 UART (vm-superio's 16550 model): the guest's console. Output goes to a capped sink;
//! there is no input (jobs get /dev/null).

use super::EventTrigger;
use super::bus::BusDevice;
use crate::faults::Fault;
use construir_launcher::console::CappedSink;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_superio::Serial;

/// Where console bytes go, shared so the VMM can read the counters after the run.
pub type ConsoleSink = Arc<Mutex<CappedSink<Box<dyn Write + Send>>>>;

/// A writer into the shared sink (what the UART model writes to).
pub struct SharedSink(pub ConsoleSink);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A failing sink (a full disk) must not stop the guest: count it as written.
        let _ = self.0.lock().expect("console lock").accept(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialDevice(pub Serial<EventTrigger, vm_superio::serial::NoEvents, SharedSink>);

impl SerialDevice {
    pub fn new(irq: EventTrigger, sink: ConsoleSink) -> Self {
        Self(Serial::new(irq, SharedSink(sink)))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.0.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // The only error is a failed interrupt trigger, which the guest would only see as a
            // missed interrupt; log it (the first few: the guest chooses how often it writes).
            if let Err(e) = self.0.write(offset as u8, data[0])
                && super::LEGACY_FAULTS.note(Fault::Trigger)
            {
                tracing::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_the_data_register_reach_the_sink() {
        let sink: ConsoleSink =
            Arc::new(Mutex::new(CappedSink::new(Box::new(Vec::<u8>::new()), 3)));
        let mut uart = SerialDevice::new(EventTrigger::new().unwrap(), sink.clone());
        for b in b"hello" {
            uart.write(0, &[*b]);
        }
        let s = sink.lock().unwrap();
        assert_eq!((s.written(), s.dropped()), (3, 2));
    }
}
