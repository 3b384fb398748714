//! The virtio-mmio transport (virtio 1.x, "version 2" register layout): the register state
//! machine the guest driver talks to, in front of any [`VirtioDevice`]. Every value the guest
//! writes is checked; a misbehaving driver gets a device that ignores it or sets NEEDS_RESET, never
//! a VMM crash, and what the driver gets wrong is logged through a [`FaultLog`] (a few lines per
//! kind, then only counted), since a guest can repeat a bad write as often as it likes.

use super::{Interrupt, Queue, QueueT, VirtioDevice, queue_is_usable};
use crate::devices::bus::BusDevice;
use crate::faults::{Fault, FaultLog};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
pub const VENDOR: u32 = 0x4354_5352; // "RSTC"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A device behind its MMIO registers.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    faults: Arc<FaultLog>,
}

/// The three areas of a split queue, for the address registers.
#[derive(Debug, Clone, Copy)]
enum Ring {
    Desc,
    Avail,
    Used,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
    ) -> Self {
        let queues = device
            .lock()
            .expect("device lock")
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("valid queue size"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            faults: Arc::default(),
        }
    }

    /// The driver's faults on this transport, for the report at the end of the run.
    pub fn faults(&self) -> Arc<FaultLog> {
        self.faults.clone()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && !self.activated
    }

    fn reset(&mut self) {
        self.device.lock().expect("device lock").reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, in the order the spec gives.
        if value & self.status != self.status {
            return;
        }
        let new = value & !self.status;
        let ok = match new {
            STATUS_ACKNOWLEDGE => self.status == 0,
            STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
            STATUS_FEATURES_OK => self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_DRIVER_OK => {
                self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
            }
            STATUS_FAILED => true,
            _ => false,
        };
        if !ok {
            return;
        }
        self.status = value;
        if new == STATUS_FEATURES_OK {
            self.device
                .lock()
                .expect("device lock")
                .ack_features(self.driver_features);
        }
        if new == STATUS_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready = self.queues.iter().all(|q| queue_is_usable(q, &self.mem));
        if !ready {
            if self.faults.note(Fault::QueueNotUsable) {
                tracing::warn!(
                    "virtio-mmio: the driver set DRIVER_OK with queues that are not ready or not valid"
                );
            }
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        // The device takes the queues; the transport keeps fresh ones that report the same sizes
        // and readiness (queue registers are frozen from here until a reset).
        let queues: Vec<Queue> = self
            .queues
            .iter_mut()
            .map(|q| {
                let mut fresh = Queue::new(q.max_size()).expect("valid queue size");
                fresh.set_size(q.size());
                fresh.set_ready(q.ready());
                std::mem::replace(q, fresh)
            })
            .collect();
        match self.device.lock().expect("device lock").activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
        ) {
            Ok(()) => self.activated = true,
            Err(e) => {
                if self.faults.note(Fault::Activate) {
                    tracing::warn!("virtio-mmio: cannot activate the device: {e}");
                }
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    /// QUEUE_NUM: virtio-queue's `set_size` would log a refused size itself.
    fn set_queue_size(&mut self, value: u32) {
        let faults = self.faults.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        let refused = match u16::try_from(value) {
            Ok(size) => q.try_set_size(size).is_err(),
            Err(_) => true,
        };
        if refused && faults.note(Fault::QueueSize) {
            tracing::warn!(
                "virtio-mmio: the driver set queue size {value}, not a power of two up to {}",
                q.max_size()
            );
        }
    }

    /// One half of a ring address register; a misaligned address is refused (and the old one
    /// kept), as virtio-queue's own setters do, but without their log line per write.
    fn set_queue_address(&mut self, ring: Ring, low: Option<u32>, high: Option<u32>) {
        let faults = self.faults.clone();
        let Some(q) = self.selected_queue() else {
            return;
        };
        let old = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Avail => q.avail_ring(),
            Ring::Used => q.used_ring(),
        };
        let low = low.map_or(old & 0xffff_ffff, u64::from);
        let high = high.map_or(old >> 32, u64::from);
        let addr = GuestAddress((high << 32) | low);
        let result = match ring {
            Ring::Desc => q.try_set_desc_table_address(addr),
            Ring::Avail => q.try_set_avail_ring_address(addr),
            Ring::Used => q.try_set_used_ring_address(addr),
        };
        if let Err(e) = result
            && faults.note(Fault::QueueAddress)
        {
            tracing::warn!(
                "virtio-mmio: the driver set a ring address {:#x}: {e}",
                addr.0
            );
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let device = self.device.clone();
        let dev = device.lock().expect("device lock");
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => dev.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => dev.features() as u32,
                1 => (dev.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 =>
            {
                let offered = self.device.lock().expect("device lock").features();
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
                // A driver cannot accept what was not offered.
                self.driver_features &= offered;
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if setup => self.set_queue_size(value),
            reg::QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW if setup => self.set_queue_address(Ring::Desc, Some(value), None),
            reg::QUEUE_DESC_HIGH if setup => self.set_queue_address(Ring::Desc, None, Some(value)),
            reg::QUEUE_AVAIL_LOW if setup => self.set_queue_address(Ring::Avail, Some(value), None),
            reg::QUEUE_AVAIL_HIGH if setup => {
                self.set_queue_address(Ring::Avail, None, Some(value))
            }
            reg::QUEUE_USED_LOW if setup => self.set_queue_address(Ring::Used, Some(value), None),
            reg::QUEUE_USED_HIGH if setup => self.set_queue_address(Ring::Used, None, Some(value)),
            reg::QUEUE_NOTIFY if self.activated => {
                self.device.lock().expect("device lock").queue_notify(value);
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.set_status(value),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device
                .lock()
                .expect("device lock")
                .read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & STATUS_DRIVER != 0 {
                self.device
                    .lock()
                    .expect("device lock")
                    .write_config(offset - reg::CONFIG, data);
            }
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.write_reg(offset, value);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    pub struct DummyDevice {
        pub acked: u64,
        pub activated: bool,
        pub notified: Vec<u32>,
        pub resets: u32,
        pub config: [u8; 8],
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            (1 << 32) | (1 << 9)
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            _i: Interrupt,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues[0].size(), 8);
            self.activated = true;
            Ok(())
        }
        fn queue_notify(&mut self, queue: u32) {
            self.notified.push(queue);
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = false;
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<DummyDevice>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(DummyDevice {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let t = MmioTransport::new(dev.clone(), mem, Interrupt::new().unwrap());
        (t, dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 8);
        w(t, reg::QUEUE_DESC_LOW, 0x1000);
        w(t, reg::QUEUE_AVAIL_LOW, 0x2000);
        w(t, reg::QUEUE_USED_LOW, 0x3000);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = setup();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 16);
        w(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "no such queue");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 9);
        let mut c = [0u8; 4];
        t.read(reg::CONFIG + 2, &mut c);
        assert_eq!(c, [3, 4, 5, 6]);
        // Unaligned or odd-sized register accesses are ignored.
        let mut two = [9u8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
    }

    #[test]
    fn a_well_behaved_driver_activates_the_device() {
        let (mut t, dev) = setup();
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1 | 0x80);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, (1 << 9) | (1 << 3));
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(
            dev.lock().unwrap().acked,
            (1 << 32) | (1 << 9),
            "only offered features are kept"
        );
        setup_queue(&mut t);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(
            dev.lock().unwrap().notified.is_empty(),
            "no notifications before activation"
        );
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_activated() && dev.lock().unwrap().activated);
        // Queue registers are frozen once running.
        w(&mut t, reg::QUEUE_NUM, 2);
        assert_eq!(t.queues[0].size(), 8);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(dev.lock().unwrap().notified, vec![0]);
        t.interrupt.signal_used().unwrap();
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 1);
        w(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn out_of_order_status_and_early_queue_setup_are_ignored() {
        let (mut t, dev) = setup();
        w(&mut t, reg::STATUS, STATUS_DRIVER_OK);
        assert_eq!(t.status(), 0);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK);
        assert_eq!(t.status(), STATUS_ACKNOWLEDGE);
        // Queue setup before FEATURES_OK is ignored.
        setup_queue(&mut t);
        assert!(!t.queues[0].ready());
        w(&mut t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        // DRIVER_OK without a ready queue: NEEDS_RESET, not activated.
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!t.is_activated() && !dev.lock().unwrap().activated);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn queues_outside_guest_memory_are_refused() {
        let (mut t, dev) = setup();
        for s in [
            STATUS_ACKNOWLEDGE,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        ] {
            w(&mut t, reg::STATUS, s);
        }
        w(&mut t, reg::QUEUE_NUM, 8);
        w(&mut t, reg::QUEUE_DESC_LOW, 0xffff_f000);
        w(&mut t, reg::QUEUE_DESC_HIGH, 0xff);
        w(&mut t, reg::QUEUE_READY, 1);
        w(
            &mut t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(!dev.lock().unwrap().activated);
    }

    #[test]
    fn a_driver_repeating_bad_writes_gets_a_bounded_log() {
        let (mut t, _) = setup();
        let (lines, _guard) = crate::virtio::testing::count_log_lines();
        // The capture sees virtio-queue's own lines (its `log` calls through the bridge): what
        // every one of these writes used to log.
        Queue::new(16).unwrap().set_size(3);
        assert_eq!(lines.load(Ordering::Relaxed), 1, "the capture works");
        lines.store(0, Ordering::Relaxed);
        for s in [
            STATUS_ACKNOWLEDGE,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        ] {
            w(&mut t, reg::STATUS, s);
        }
        for i in 0..100_000u32 {
            w(&mut t, reg::QUEUE_NUM, 3 + (i % 2) * 0x1_0000);
            w(&mut t, reg::QUEUE_DESC_LOW, 0x1001);
            w(&mut t, reg::QUEUE_AVAIL_LOW, 0x2001);
            w(&mut t, reg::QUEUE_USED_HIGH, 0);
            w(&mut t, reg::QUEUE_USED_LOW, 0x3002);
        }
        assert_eq!(t.queues[0].size(), 16, "refused sizes change nothing");
        assert_eq!(t.queues[0].desc_table(), 0, "nor do misaligned addresses");
        // DRIVER_OK with unusable queues, then a reset, over and over.
        for _ in 0..10_000 {
            for s in [
                STATUS_ACKNOWLEDGE,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            ] {
                w(&mut t, reg::STATUS, s);
            }
            w(&mut t, reg::STATUS, 0);
        }
        let logged = lines.load(Ordering::Relaxed);
        assert!(logged <= 20, "{logged} lines");
        assert_eq!(t.faults().count(Fault::QueueSize), 100_000);
        assert_eq!(t.faults().count(Fault::QueueAddress), 300_000);
        assert_eq!(t.faults().count(Fault::QueueNotUsable), 10_000);
        // The report at the end: one line per kind.
        lines.store(0, Ordering::Relaxed);
        t.faults().report("vda");
        assert_eq!(lines.load(Ordering::Relaxed), 3);
    }
}
