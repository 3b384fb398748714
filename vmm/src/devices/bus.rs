//! Dispatches guest port I/O and MMIO to devices by address range. A device sees offsets within
//! its own range; an access nobody claims reads as all ones and is otherwise ignored.

use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// Fills `data` from the register at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` to the register at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Two ranges overlap.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct BusOverlap {
    pub base: u64,
    pub len: u64,
}

type Entry = (u64, u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping ranges, each with its device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusOverlap> {
        if len == 0
            || self
                .ranges
                .iter()
                .any(|(b, l, _)| base < b + l && *b < base + len)
        {
            return Err(BusOverlap { base, len });
        }
        self.ranges.push((base, len, device));
        self.ranges.sort_by_key(|(b, _, _)| *b);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let i = self.ranges.partition_point(|(b, _, _)| *b <= addr);
        let (base, len, dev) = self.ranges.get(i.checked_sub(1)?)?;
        (addr < base + len).then_some((addr - base, dev))
    }

    /// A read; returns whether a device claimed it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock").read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A write; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock").write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        let b = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        assert!(bus.insert(b.clone(), 0x3fc, 8).is_err());
        assert!(bus.insert(b.clone(), 0x3f0, 9).is_err());
        assert!(bus.write(0x3fd, &[7]));
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x400, &[1]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3ff, &mut d));
        assert_eq!(d, [7]);
        assert!(!bus.read(0x1000, &mut d));
        assert_eq!(d, [0xff]);
        assert_eq!(a.lock().unwrap().0, vec![(5, vec![7])]);
        assert_eq!(b.lock().unwrap().0, vec![(4, vec![0xfe])]);
    }
}
