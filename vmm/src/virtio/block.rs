//! virtio-blk: request parsing ([`request`], a pure function of the descriptor chain and guest
//! memory, so it is tested and fuzzed without KVM), request execution against a [`DiskBackend`],
//! and the device model the MMIO transport drives.
//!
//! A bad request gets an error status when its status byte can be written, and is otherwise
//! returned with nothing written; it never stops the VMM. The guest also chooses how much work it
//! gives: one [`Block::process_queue`] call serves at most [`CHAIN_BUDGET`] chains or runs for
//! about [`TIME_BUDGET`], and says when work is left, so a driver that keeps its available ring
//! full cannot keep the event loop from its deadline, signals and stop events.

mod request;

pub use request::{HEADER_LEN, Parsed, Request, RequestError, RequestKind, parse_request};

use super::{ActivateError, Interrupt, Queue, QueueT, VirtioDevice, queue_is_usable};
use crate::disk::{DiskBackend, SECTOR_SIZE};
use crate::faults::{Fault, FaultLog};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes copied through the VMM at a time (a guest buffer can be up to 4 GiB).
const CHUNK: usize = 128 * 1024;
/// Chains served by one [`Block::process_queue`] call at most (one full queue).
pub const CHAIN_BUDGET: u32 = QUEUE_SIZE as u32;
/// Time after which a [`Block::process_queue`] call serves no further chain (it always serves
/// one, however long that takes: a chain is at most 4 GiB).
pub const TIME_BUDGET: Duration = Duration::from_millis(20);

/// Bytes moved per disk, for the run summary, and the faults its driver made.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
    pub faults: FaultLog,
}

/// What one [`Block::process_queue`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains taken from the available ring.
    pub served: u32,
    /// The budget ran out with chains perhaps left: call again (after the event loop has looked
    /// at everything else).
    pub more: bool,
}

/// Executes a parsed request; returns the status byte and the bytes written into guest memory.
pub fn execute(
    mem: &GuestMemoryMmap,
    disk: &mut dyn DiskBackend,
    read_only: bool,
    req: &Request,
    stats: &DiskStats,
) -> (u8, u32) {
    let ok = VIRTIO_BLK_S_OK as u8;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    // Sized to the request: a 4 KiB read should not allocate and zero the whole chunk.
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(req.data_len).unwrap_or(CHUNK))];
    match req.kind {
        RequestKind::Read => {
            let mut offset = req.offset;
            for &(addr, len) in &req.data {
                let mut done = 0usize;
                while done < len as usize {
                    let n = buf.len().min(len as usize - done);
                    if disk.read_at(&mut buf[..n], offset).is_err()
                        || mem
                            .write_slice(&buf[..n], GuestAddress(addr.0 + done as u64))
                            .is_err()
                    {
                        return (ioerr, 0);
                    }
                    done += n;
                    offset += n as u64;
                }
            }
            stats.read_bytes.fetch_add(req.data_len, Ordering::Relaxed);
            (ok, req.data_len as u32)
        }
        RequestKind::Write => {
            if read_only {
                return (ioerr, 0);
            }
            let mut offset = req.offset;
            for &(addr, len) in &req.data {
                let mut done = 0usize;
                while done < len as usize {
                    let n = buf.len().min(len as usize - done);
                    if mem
                        .read_slice(&mut buf[..n], GuestAddress(addr.0 + done as u64))
                        .is_err()
                        || disk.write_at(&buf[..n], offset).is_err()
                    {
                        return (ioerr, 0);
                    }
                    done += n;
                    offset += n as u64;
                }
            }
            stats
                .written_bytes
                .fetch_add(req.data_len, Ordering::Relaxed);
            (ok, 0)
        }
        RequestKind::Flush => match disk.flush() {
            Ok(()) => (ok, 0),
            Err(_) => (ioerr, 0),
        },
        RequestKind::GetId => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let src = disk.id().as_bytes();
            let n = src.len().min(id.len());
            id[..n].copy_from_slice(&src[..n]);
            let mut written = 0u32;
            for &(addr, len) in &req.data {
                let take = (len as usize).min(id.len() - written as usize);
                if take == 0 {
                    break;
                }
                if mem
                    .write_slice(&id[written as usize..written as usize + take], addr)
                    .is_err()
                {
                    return (ioerr, 0);
                }
                written += take as u32;
            }
            (ok, written)
        }
    }
}

/// The block device model.
pub struct Block {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    acked: u64,
    active: Option<(GuestMemoryMmap, Queue, Interrupt)>,
    /// The event loop's eventfd for this queue: a notification that reaches the device any other
    /// way than through it is passed on there (disk I/O belongs to the event-loop thread).
    notify: Option<EventFd>,
    pub stats: Arc<DiskStats>,
}

impl Block {
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool) -> Self {
        Self {
            disk,
            read_only,
            acked: 0,
            active: None,
            notify: None,
            stats: Arc::default(),
        }
    }

    /// Passes [`VirtioDevice::queue_notify`] calls on to `event`, the eventfd the event loop
    /// serves this queue on, instead of serving the queue on the calling (vCPU) thread.
    pub fn set_notify_event(&mut self, event: EventFd) {
        self.notify = Some(event);
    }

    fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Serves the requests the driver made available, up to the budget ([`CHAIN_BUDGET`] chains,
    /// [`TIME_BUDGET`]), then interrupts the guest if it wants. When the budget runs out the call
    /// returns with `more` set and notifications left as they are: the caller calls again later.
    pub fn process_queue(&mut self) -> QueueRun {
        let capacity = self.capacity();
        let stats = &*self.stats;
        let Some((mem, queue, interrupt)) = self.active.as_mut() else {
            return QueueRun {
                served: 0,
                more: false,
            };
        };
        let start = Instant::now();
        let mut served = 0u32;
        let more = loop {
            let mut popped = false;
            let mut ring_failed = false;
            while served < CHAIN_BUDGET && (served == 0 || start.elapsed() < TIME_BUDGET) {
                // Not pop_descriptor_chain, which logs every failure itself (a guest-chosen
                // stream of lines).
                let chain = match queue.iter(&*mem) {
                    Ok(mut avail) => avail.next(),
                    Err(e) => {
                        if stats.faults.note(Fault::AvailRing) {
                            tracing::warn!("virtio-blk: the available ring is unusable: {e}");
                        }
                        ring_failed = true;
                        None
                    }
                };
                let Some(chain) = chain else { break };
                popped = true;
                served += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    // Nothing to parse and nothing to return (add_used refuses it).
                    stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                    if stats.faults.note(Fault::BadHead) {
                        tracing::warn!(
                            "virtio-blk: the driver made descriptor {head} available, past the queue's {} entries",
                            queue.size()
                        );
                    }
                    continue;
                }
                let mut chain = chain;
                let descs: Vec<_> = chain.by_ref().collect();
                // The iterator stops early (ttl, bad index, bad indirect table) on a malformed
                // chain; a well-formed one ends on a descriptor without NEXT.
                let chain_ok = descs.last().is_some_and(|d| !d.has_next());
                let used = match parse_request(mem, &descs, chain_ok, capacity) {
                    Ok(req) => {
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        let (status, len) =
                            execute(mem, self.disk.as_mut(), self.read_only, &req, stats);
                        if mem.write_obj(status, req.status).is_ok() {
                            len + 1
                        } else {
                            len
                        }
                    }
                    Err((e, status)) => {
                        stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        if stats.faults.note(Fault::BadRequest) {
                            tracing::debug!("virtio-blk: bad request: {e}");
                        }
                        match status {
                            Some(addr) if mem.write_obj(e.status(), addr).is_ok() => 1,
                            _ => 0,
                        }
                    }
                };
                if let Err(e) = queue.add_used(&*mem, head, used)
                    && stats.faults.note(Fault::UsedRing)
                {
                    tracing::warn!("virtio-blk: cannot return a used buffer: {e}");
                }
            }
            if ring_failed {
                break false;
            }
            if served >= CHAIN_BUDGET || (served > 0 && start.elapsed() >= TIME_BUDGET) {
                break true;
            }
            match queue.enable_notification(&*mem) {
                // More requests arrived while notifications were off: serve them.
                Ok(true) if popped => continue,
                // "More available" but nothing could be popped: the driver's available index is
                // beyond what the ring can hold. Looping would never end (found by fuzzing);
                // stop until the next notification.
                Ok(true) => {
                    if stats.faults.note(Fault::AvailRing) {
                        tracing::warn!("virtio-blk: the driver's available ring index is invalid");
                    }
                    break false;
                }
                _ => break false,
            }
        };
        if served > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            let _ = interrupt.signal_used();
        }
        QueueRun { served, more }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_RING_F_EVENT_IDX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Only the capacity (le64 at offset 0) is offered.
        let config = self.capacity().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount(queues.len(), 1));
        }
        let mut queue = queues.remove(0);
        if !queue_is_usable(&queue, &mem) {
            return Err(ActivateError::BadQueue(0));
        }
        queue.set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some((mem, queue, interrupt));
        Ok(())
    }

    fn queue_notify(&mut self, queue: u32) {
        if queue != 0 {
            return;
        }
        // The VMM registers an ioeventfd on QueueNotify, so KVM takes these writes and this is
        // not reached there; if it were (on a vCPU thread, whose seccomp filter has no disk
        // I/O), the event loop is told instead. Without an event loop (tests, fuzzing), serve
        // here, one budget at a time.
        match &self.notify {
            Some(event) => {
                let _ = event.write(1);
            }
            None => {
                self.process_queue();
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests;
