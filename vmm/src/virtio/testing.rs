//! Test helpers: a split queue laid out by hand in guest memory (virtio-queue 0.18's
//! `MockSplitQueue` puts a 16-entry queue's used ring over the available ring's upper slots), a
//! disk that plays a guest refilling its available ring while the device works, and a tracing
//! subscriber that counts what is logged.

use super::{Queue, QueueT};
use crate::disk::DiskBackend;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A split queue in guest memory: descriptor table, available ring and used ring apart.
pub struct Ring {
    pub mem: GuestMemoryMmap,
    pub size: u16,
}

impl Ring {
    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;

    pub fn new(mem: &GuestMemoryMmap, size: u16) -> Self {
        assert!(size <= 256, "the rings must not overlap");
        Ring {
            mem: mem.clone(),
            size,
        }
    }

    /// Writes descriptor `index`: readable or device-writable, chained to `next` if given.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, write: bool, next: Option<u16>) {
        let mut flags = 0u16;
        if write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let at = Ring::DESC + 16 * u64::from(index);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem
            .write_obj(next.unwrap_or(0), GuestAddress(at + 14))
            .unwrap();
    }

    /// Puts `head` in every available-ring slot, so that bumping the index offers it again.
    pub fn fill_avail_slots(&self, head: u16) {
        for slot in 0..self.size {
            self.mem
                .write_obj(head, GuestAddress(Ring::AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
        }
    }

    /// Offers the chain at `head` (as a driver does: slot, then index).
    pub fn make_available(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = Ring::AVAIL + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(Ring::AVAIL + 2))
            .unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(Ring::AVAIL + 2)).unwrap()
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(Ring::USED + 2)).unwrap()
    }

    /// The used-ring entry in slot `i`: (head, length written).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = Ring::USED + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// The queue as a driver would have set it up.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(256).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(Ring::DESC))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(Ring::AVAIL))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(Ring::USED))
            .unwrap();
        q.set_ready(true);
        q
    }
}

/// A disk of zeros whose every read plays a concurrent guest vCPU: it makes one more chain
/// available (bumps `avail->idx`), `left` times, so the available ring never runs dry while the
/// device works.
pub struct FloodDisk {
    pub mem: GuestMemoryMmap,
    pub left: Arc<AtomicU64>,
    pub reads: Arc<AtomicU64>,
}

impl DiskBackend for FloodDisk {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&mut self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            let idx: u16 = self.mem.read_obj(GuestAddress(Ring::AVAIL + 2)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(Ring::AVAIL + 2))
                .unwrap();
        }
        Ok(())
    }
    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn id(&self) -> &str {
        "flood"
    }
}

/// Counts every event logged on this thread (tracing's, and the `log` crate's through the
/// tracing-log bridge, as `launcher::init_logging` sets it up) while the guard lives.
pub fn count_log_lines() -> (Arc<AtomicUsize>, tracing::subscriber::DefaultGuard) {
    count_log_lines_through("trace")
}

/// [`count_log_lines`] behind an `EnvFilter` with these directives (as `CONSTRUIR_LOG` gives).
pub fn count_log_lines_through(
    directives: &str,
) -> (Arc<AtomicUsize>, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    struct Count(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(
            &self,
            _event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let count = Arc::new(AtomicUsize::new(0));
    // set_default also installs the log → tracing bridge (once per process).
    let guard = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(directives))
        .with(Count(count.clone()))
        .set_default();
    (count, guard)
}
