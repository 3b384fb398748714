//! virtio-blk: request parsing (a pure function of the descriptor chain and guest memory, so it is
//! tested and fuzzed without KVM), request execution against a [`DiskBackend`], and the device
//! model the MMIO transport drives.
//!
//! Everything in a request is the guest's to choose, so it is checked: chain shape (header first,
//! readable, 16 bytes; status last, writable; data direction by request type), lengths (whole
//! sectors), the sector range (with overflow checks) and that every buffer lies in guest RAM.
//! A bad request gets an error status when its status byte can be written, and is otherwise
//! returned with nothing written; it never stops the VMM.

use super::{ActivateError, Interrupt, Queue, QueueT, VirtioDevice};
use crate::disk::{DiskBackend, SECTOR_SIZE};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes copied through the VMM at a time (a guest buffer can be up to 4 GiB).
const CHUNK: usize = 128 * 1024;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

/// A request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The guest buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the chain has {0} descriptors; a request needs a header and a status")]
    TooShort(usize),
    #[error("the header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    #[error("the status descriptor is read-only or empty")]
    BadStatus,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a data descriptor has the wrong direction for this request")]
    WrongDirection,
    #[error("the data length {0} is not a whole number of sectors")]
    Unaligned(u64),
    #[error("sectors {sector}+{len} lie past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("a buffer lies outside guest memory")]
    BadBuffer,
    #[error("the descriptor chain is malformed")]
    BadChain,
}

impl RequestError {
    /// The status byte to answer with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// The outcome of parsing: a request, or an error with the status address if there is a usable one.
pub type Parsed = Result<Request, (RequestError, Option<GuestAddress>)>;

/// Parses a request from its descriptors (`descs` as the chain yields them; `chain_ok` false if the
/// chain iterator stopped on a malformed chain) for a disk of `capacity` sectors.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    chain_ok: bool,
    capacity: u64,
) -> Parsed {
    let status_desc = descs
        .last()
        .filter(|d| d.is_write_only() && d.len() >= 1 && mem.check_range(d.addr(), 1));
    let status = status_desc.map(|d| d.addr());
    let fail = |e| Err((e, status));
    if !chain_ok {
        return fail(RequestError::BadChain);
    }
    if descs.len() < 2 {
        return fail(RequestError::TooShort(descs.len()));
    }
    let Some(status) = status else {
        return Err((RequestError::BadStatus, None));
    };
    let header = descs[0];
    if header.is_write_only() || header.len() < 16 {
        return fail(RequestError::BadHeader);
    }
    let kind_raw: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| (RequestError::BadHeader, Some(status)))?;
    let sector: u64 = mem
        .read_obj(
            header
                .addr()
                .checked_add(8)
                .ok_or((RequestError::BadHeader, Some(status)))?,
        )
        .map_err(|_| (RequestError::BadHeader, Some(status)))?;
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        other => return fail(RequestError::Unsupported(other)),
    };
    let data_descs = &descs[1..descs.len() - 1];
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len: u64 = 0;
    for d in data_descs {
        let wants_write = matches!(kind, RequestKind::Read | RequestKind::GetId);
        if matches!(
            kind,
            RequestKind::Read | RequestKind::Write | RequestKind::GetId
        ) && d.is_write_only() != wants_write
        {
            return fail(RequestError::WrongDirection);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return fail(RequestError::BadBuffer);
        }
        data.push((d.addr(), d.len()));
        data_len += u64::from(d.len());
    }
    let mut offset = 0;
    match kind {
        RequestKind::Read | RequestKind::Write => {
            if data_len % SECTOR_SIZE != 0 {
                return fail(RequestError::Unaligned(data_len));
            }
            let len = data_len / SECTOR_SIZE;
            if sector.checked_add(len).is_none_or(|end| end > capacity) {
                return fail(RequestError::OutOfRange {
                    sector,
                    len,
                    capacity,
                });
            }
            offset = sector * SECTOR_SIZE;
        }
        RequestKind::GetId if data_len == 0 => return fail(RequestError::TooShort(descs.len())),
        _ => {}
    }
    Ok(Request {
        kind,
        offset,
        data,
        data_len,
        status,
    })
}

/// Bytes moved per disk, for the run summary.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
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
    pub stats: Arc<DiskStats>,
}

impl Block {
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool) -> Self {
        Self {
            disk,
            read_only,
            acked: 0,
            active: None,
            stats: Arc::default(),
        }
    }

    fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Serves every request the driver made available, then interrupts the guest if it wants.
    pub fn process_queue(&mut self) {
        let capacity = self.capacity();
        let Some((mem, queue, interrupt)) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        loop {
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                let mut descs = Vec::new();
                let mut chain_ok = true;
                let mut chain = chain;
                for d in chain.by_ref() {
                    descs.push(d);
                }
                // The iterator stops early (ttl, bad index, bad indirect table) on a malformed chain;
                // a well-formed one ends on a descriptor without NEXT.
                if descs.last().is_none_or(|d| d.has_next()) {
                    chain_ok = false;
                }
                let used = match parse_request(mem, &descs, chain_ok, capacity) {
                    Ok(req) => {
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        let (status, len) =
                            execute(mem, self.disk.as_mut(), self.read_only, &req, &self.stats);
                        if mem.write_obj(status, req.status).is_ok() {
                            len + 1
                        } else {
                            len
                        }
                    }
                    Err((e, status)) => {
                        self.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("virtio-blk: bad request: {e}");
                        match status {
                            Some(addr) if mem.write_obj(e.status(), addr).is_ok() => 1,
                            _ => 0,
                        }
                    }
                };
                if let Err(e) = queue.add_used(&*mem, head, used) {
                    tracing::warn!("virtio-blk: cannot return a used buffer: {e}");
                }
                used_any = true;
            }
            match queue.enable_notification(&*mem) {
                // More requests arrived while notifications were off: serve them.
                Ok(true) if popped => continue,
                // "More available" but nothing could be popped: the driver's available index is
                // beyond what the ring can hold. Looping would never end (found by fuzzing);
                // stop until the next notification.
                Ok(true) => {
                    tracing::warn!("virtio-blk: the driver's available ring index is invalid");
                    break;
                }
                _ => break,
            }
        }
        if used_any && queue.needs_notification(&*mem).unwrap_or(true) {
            let _ = interrupt.signal_used();
        }
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
        if !queue.is_valid(&mem) {
            return Err(ActivateError::BadQueue(0));
        }
        queue.set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some((mem, queue, interrupt));
        Ok(())
    }

    fn queue_notify(&mut self, queue: u32) {
        if queue == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::raw::RawDisk;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_NEXT as VIRTQ_DESC_F_NEXT, VRING_DESC_F_WRITE as VIRTQ_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut flags = 0;
        if write {
            flags |= VIRTQ_DESC_F_WRITE as u16;
        }
        if next {
            flags |= VIRTQ_DESC_F_NEXT as u16;
        }
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn read_chain(len: u32) -> Vec<Descriptor> {
        vec![
            desc(HDR, 16, false, true),
            desc(DATA, len, true, true),
            desc(STATUS, 1, true, false),
        ]
    }

    #[test]
    fn a_read_request_parses() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 3);
        let req = parse_request(&m, &read_chain(1024), true, 10).unwrap();
        assert_eq!(req.kind, RequestKind::Read);
        assert_eq!(req.offset, 3 * 512);
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status, GuestAddress(STATUS));
    }

    #[test]
    fn bad_requests_are_refused_with_the_right_status() {
        let m = mem();
        let check = |descs: &[Descriptor], want: RequestError, has_status: bool| {
            let (e, status) = parse_request(&m, descs, true, 8).unwrap_err();
            assert_eq!(e, want);
            assert_eq!(status.is_some(), has_status, "{want:?}");
        };
        header(&m, VIRTIO_BLK_T_IN, 7);
        check(
            &read_chain(1024),
            RequestError::OutOfRange {
                sector: 7,
                len: 2,
                capacity: 8,
            },
            true,
        );
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        check(
            &read_chain(512),
            RequestError::OutOfRange {
                sector: u64::MAX,
                len: 1,
                capacity: 8,
            },
            true,
        );
        header(&m, VIRTIO_BLK_T_IN, 0);
        check(&read_chain(100), RequestError::Unaligned(100), true);
        check(
            &[
                desc(HDR, 16, false, true),
                desc(DATA, 512, false, true),
                desc(STATUS, 1, true, false),
            ],
            RequestError::WrongDirection,
            true,
        );
        check(
            &[desc(HDR, 8, false, true), desc(STATUS, 1, true, false)],
            RequestError::BadHeader,
            true,
        );
        check(
            &[desc(HDR, 16, true, true), desc(STATUS, 1, true, false)],
            RequestError::BadHeader,
            true,
        );
        check(
            &[
                desc(HDR, 16, false, true),
                desc(DATA, 512, true, true),
                desc(STATUS, 1, false, false),
            ],
            RequestError::BadStatus,
            false,
        );
        check(
            &[desc(STATUS, 1, true, false)],
            RequestError::TooShort(1),
            true,
        );
        check(
            &[
                desc(HDR, 16, false, true),
                desc(0xff_0000, 512, true, true),
                desc(STATUS, 1, true, false),
            ],
            RequestError::BadBuffer,
            true,
        );
        check(
            &[
                desc(HDR, 16, false, true),
                desc(DATA, 512, true, true),
                desc(0xff_0000, 1, true, false),
            ],
            RequestError::BadStatus,
            false,
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        check(&read_chain(512), RequestError::WrongDirection, true);
        header(&m, 99, 0);
        let (e, _) = parse_request(&m, &read_chain(512), true, 8).unwrap_err();
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let (e, _) = parse_request(&m, &read_chain(512), false, 8).unwrap_err();
        assert_eq!(e, RequestError::BadChain);
    }

    fn disk_with(data: &[u8]) -> RawDisk {
        let f = tempfile::tempfile().unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(data, 0).unwrap();
        RawDisk::new(f, "construir-job").unwrap()
    }

    #[test]
    fn read_write_flush_and_get_id_execute() {
        let m = mem();
        let stats = DiskStats::default();
        let mut disk = disk_with(&(0..4096u32).map(|i| i as u8).collect::<Vec<_>>());
        header(&m, VIRTIO_BLK_T_IN, 1);
        let req = parse_request(&m, &read_chain(1024), true, 8).unwrap();
        assert_eq!(execute(&m, &mut disk, false, &req, &stats), (0, 1024));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, (512..1536u32).map(|i| i as u8).collect::<Vec<_>>());

        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 7);
        let chain = [
            desc(HDR, 16, false, true),
            desc(DATA, 512, false, true),
            desc(STATUS, 1, true, false),
        ];
        let req = parse_request(&m, &chain, true, 8).unwrap();
        assert_eq!(
            execute(&m, &mut disk, true, &req, &stats).0,
            VIRTIO_BLK_S_IOERR as u8,
            "read-only disk"
        );
        assert_eq!(execute(&m, &mut disk, false, &req, &stats), (0, 0));
        let mut back = vec![0u8; 512];
        disk.read_at(&mut back, 7 * 512).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse_request(
            &m,
            &[desc(HDR, 16, false, true), desc(STATUS, 1, true, false)],
            true,
            8,
        )
        .unwrap();
        assert_eq!(execute(&m, &mut disk, false, &req, &stats), (0, 0));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_request(&m, &read_chain(64), true, 8).unwrap();
        assert_eq!(execute(&m, &mut disk, false, &req, &stats), (0, 20));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..13], b"construir-job");
        assert_eq!(stats.read_bytes.load(Ordering::Relaxed), 1024);
        assert_eq!(stats.written_bytes.load(Ordering::Relaxed), 512);
    }

    #[test]
    fn the_device_serves_a_queue_laid_out_in_guest_memory() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, VIRTIO_BLK_T_IN, 0);
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, VIRTQ_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(Descriptor::new(
                DATA,
                512,
                (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) as u16,
                2,
            )),
            RawDescriptor::from(Descriptor::new(STATUS, 1, VIRTQ_DESC_F_WRITE as u16, 0)),
            // A second request whose data points outside guest memory.
            RawDescriptor::from(Descriptor::new(HDR, 16, VIRTQ_DESC_F_NEXT as u16, 4)),
            RawDescriptor::from(Descriptor::new(
                0xf0_0000,
                512,
                (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) as u16,
                5,
            )),
            RawDescriptor::from(Descriptor::new(STATUS + 8, 1, VIRTQ_DESC_F_WRITE as u16, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        let mut block = Block::new(Box::new(disk_with(&[0x5a; 1024])), false);
        let interrupt = Interrupt::new().unwrap();
        block
            .activate(m.clone(), vec![queue], interrupt.clone())
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        block.process_queue();
        let status: u8 = m.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let bad_status: u8 = m.read_obj(GuestAddress(STATUS + 8)).unwrap();
        assert_eq!(bad_status, VIRTIO_BLK_S_IOERR as u8);
        let mut data = [0u8; 512];
        m.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(data.iter().all(|&b| b == 0x5a));
        assert_eq!(vq.used().idx().load(), 2, "both chains returned");
        assert_eq!(interrupt.status.load(Ordering::SeqCst), 1);
        assert_eq!(interrupt.irq.read().unwrap(), 1);
        assert_eq!(block.stats.bad_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn config_space_is_the_capacity() {
        let block = Block::new(Box::new(disk_with(&[0; 4096])), true);
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut past = [9u8; 4];
        block.read_config(6, &mut past);
        assert_eq!(past, [0, 0, 0, 0]);
        block.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
