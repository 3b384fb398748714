//! virtio: the device model trait ([`VirtioDevice`]), the MMIO transport that exposes a device's
//! registers to the guest ([`mmio`]), and the block device ([`block`]). A device never sees MMIO
//! registers; the transport sees only this trait.

pub mod block;
pub mod mmio;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueT};

/// Bit in the interrupt status register: the device used buffers.
pub const INT_USED_RING: u32 = 1;

/// How a device tells the guest it used buffers: the interrupt status bit and an irqfd.
#[derive(Clone)]
pub struct Interrupt {
    pub status: Arc<AtomicU32>,
    pub irq: Arc<EventFd>,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: Arc::new(AtomicU32::new(0)),
            irq: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Raises the used-ring interrupt.
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// Whether a queue can be used: ready, and its descriptor table and rings in guest memory.
/// The same checks as virtio-queue's `Queue::is_valid`, which is called too, but only once these
/// pass: it logs every failure itself, and a guest can make it fail as often as it likes.
pub fn queue_is_usable(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(queue.size());
    // Split-ring sizes (virtio 1.x 2.7): 16 bytes per descriptor; flags, index, one u16 per
    // entry and the event index; flags, index, 8 bytes per entry and the event index.
    let fits = |addr: u64, len: u64| mem.check_range(GuestAddress(addr), len as usize);
    queue.ready()
        && fits(queue.desc_table(), 16 * size)
        && fits(queue.avail_ring(), 6 + 2 * size)
        && fits(queue.used_ring(), 6 + 8 * size)
        && queue.is_valid(mem)
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {0} queues, the device has {1}")]
    QueueCount(usize, usize),
    #[error("queue {0} is not valid in guest memory")]
    BadQueue(usize),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device type (2: block).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError>;
    /// Handles a queue notification (when no ioeventfd took it).
    fn queue_notify(&mut self, queue: u32);
    /// Goes back to the initial state (the driver wrote 0 to the status register).
    fn reset(&mut self);
}
