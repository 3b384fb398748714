//! virtio-blk request parsing: a pure function of the descriptor chain and guest memory, so it is
//! tested and fuzzed without KVM.
//!
//! A request is a byte stream over its chain, whatever the descriptors' boundaries (VERSION_1
//! implies ANY_LAYOUT): the device-readable bytes come first and begin with the 16-byte header
//! (type, reserved, sector), then the data for a write; the device-writable bytes follow, the data
//! for a read or GET_ID, and end with the status byte, the last byte of the chain. Linux puts
//! header, data and status in descriptors of their own; other drivers may put the header and the
//! data in one descriptor, the data and the status in one, or split the header.
//!
//! Everything in a request is the guest's to choose, so it is checked: the header is 16 readable
//! bytes read once, the status is the chain's last byte and is writable and in guest RAM,
//! device-writable bytes never come before device-readable ones, the data direction is the one
//! its type needs, every descriptor lies in guest RAM, lengths are whole sectors and the sector
//! range is checked for overflow and against the capacity.

use crate::disk::SECTOR_SIZE;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Size of the request header: le32 type, le32 reserved, le64 sector.
pub const HEADER_LEN: u64 = 16;

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
    /// The guest buffers, in order (pieces of descriptors; never empty pieces).
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
    #[error("the chain does not start with 16 readable header bytes")]
    BadHeader,
    #[error("the chain's last byte (the status) is read-only or outside guest memory")]
    BadStatus,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error(
        "the data has the wrong direction for this request, or readable bytes follow writable ones"
    )]
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

/// The status byte: the chain's last byte, if it is device-writable and in guest RAM. Empty
/// descriptors hold no byte and are skipped.
fn status_byte(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<GuestAddress> {
    let last = descs.iter().rev().find(|d| d.len() > 0)?;
    if !last.is_write_only() {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.check_range(addr, 1).then_some(addr)
}

/// The bytes `skip..skip + take` of the stream the descriptors form, as (address, length) pieces.
/// `None` if an address overflows (the caller has checked every descriptor lies in RAM, so it
/// cannot).
fn pieces(descs: &[Descriptor], skip: u64, take: u64) -> Option<Vec<(GuestAddress, u32)>> {
    let mut out = Vec::new();
    let (mut skip, mut take) = (skip, take);
    for d in descs {
        if take == 0 {
            break;
        }
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        // n ≤ d.len(), a u32.
        out.push((d.addr().checked_add(skip)?, n as u32));
        take -= n;
        skip = 0;
    }
    Some(out)
}

fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// The 16 header bytes from the start of the readable descriptors, read once (the guest may change
/// guest memory at any time; what was checked is what is used).
fn read_header(
    mem: &GuestMemoryMmap,
    readable: &[Descriptor],
) -> Option<[u8; HEADER_LEN as usize]> {
    let mut header = [0u8; HEADER_LEN as usize];
    let mut got = 0usize;
    for (addr, len) in pieces(readable, 0, HEADER_LEN)? {
        mem.read_slice(&mut header[got..got + len as usize], addr)
            .ok()?;
        got += len as usize;
    }
    (got == header.len()).then_some(header)
}

/// Parses a request from its descriptors (`descs` as the chain yields them; `chain_ok` false if the
/// chain iterator stopped on a malformed chain) for a disk of `capacity` sectors.
pub fn parse_request(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    chain_ok: bool,
    capacity: u64,
) -> Parsed {
    let status = status_byte(mem, descs);
    let fail = |e| Err((e, status));
    if !chain_ok {
        return fail(RequestError::BadChain);
    }
    // A descriptor is either readable or writable, so the header and the status need two.
    if descs.len() < 2 {
        return fail(RequestError::TooShort(descs.len()));
    }
    let Some(status) = status else {
        return Err((RequestError::BadStatus, None));
    };
    let fail = |e| Err((e, Some(status)));
    let first_writable = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    let Some(header) = read_header(mem, readable) else {
        return fail(RequestError::BadHeader);
    };
    let kind_raw = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let kind = match kind_raw {
        VIRTIO_BLK_T_IN => RequestKind::Read,
        VIRTIO_BLK_T_OUT => RequestKind::Write,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        other => return fail(RequestError::Unsupported(other)),
    };
    // The spec has the driver put every device-writable descriptor after the readable ones.
    if writable.iter().any(|d| !d.is_write_only()) {
        return fail(RequestError::WrongDirection);
    }
    // The readable bytes past the header, and the writable bytes before the status.
    let readable_data = total_len(readable) - HEADER_LEN;
    let writable_data = total_len(writable) - 1;
    let (data_descs, skip, len) = match kind {
        RequestKind::Read | RequestKind::GetId if readable_data != 0 => {
            return fail(RequestError::WrongDirection);
        }
        RequestKind::Write if writable_data != 0 => return fail(RequestError::WrongDirection),
        RequestKind::Read | RequestKind::GetId => (writable, 0, writable_data),
        RequestKind::Write => (readable, HEADER_LEN, readable_data),
        // A flush moves no data; whatever buffers come with it are ignored.
        RequestKind::Flush => (readable, 0, 0),
    };
    if descs
        .iter()
        .any(|d| !mem.check_range(d.addr(), d.len() as usize))
    {
        return fail(RequestError::BadBuffer);
    }
    let Some(data) = pieces(data_descs, skip, len) else {
        return fail(RequestError::BadBuffer);
    };
    let mut offset = 0;
    match kind {
        RequestKind::Read | RequestKind::Write => {
            if len % SECTOR_SIZE != 0 {
                return fail(RequestError::Unaligned(len));
            }
            let sectors = len / SECTOR_SIZE;
            if sector.checked_add(sectors).is_none_or(|end| end > capacity) {
                return fail(RequestError::OutOfRange {
                    sector,
                    len: sectors,
                    capacity,
                });
            }
            // sector + sectors ≤ capacity = disk size / 512, so this cannot overflow.
            offset = sector * SECTOR_SIZE;
        }
        RequestKind::GetId if len == 0 => return fail(RequestError::TooShort(descs.len())),
        _ => {}
    }
    Ok(Request {
        kind,
        offset,
        data,
        data_len: len,
        status,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_NEXT as VIRTQ_DESC_F_NEXT, VRING_DESC_F_WRITE as VIRTQ_DESC_F_WRITE,
    };

    pub const HDR: u64 = 0x1_0000;
    pub const DATA: u64 = 0x2_0000;
    pub const STATUS: u64 = 0x3_0000;

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut flags = 0;
        if write {
            flags |= VIRTQ_DESC_F_WRITE as u16;
        }
        if next {
            flags |= VIRTQ_DESC_F_NEXT as u16;
        }
        Descriptor::new(addr, len, flags, 0)
    }

    pub fn header_at(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    pub fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        header_at(mem, HDR, kind, sector);
    }

    pub fn read_chain(len: u32) -> Vec<Descriptor> {
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

    #[test]
    fn a_write_with_header_and_data_in_one_descriptor_carries_its_data() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 2);
        let req = parse_request(
            &m,
            &[
                desc(HDR, 16 + 1024, false, true),
                desc(STATUS, 1, true, false),
            ],
            true,
            8,
        )
        .unwrap();
        assert_eq!(req.kind, RequestKind::Write);
        assert_eq!(req.offset, 2 * 512);
        assert_eq!(req.data, vec![(GuestAddress(HDR + 16), 1024)]);
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status, GuestAddress(STATUS));
    }

    #[test]
    fn a_read_with_data_and_status_in_one_descriptor_puts_the_status_last() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 1);
        let req = parse_request(
            &m,
            &[desc(HDR, 16, false, true), desc(DATA, 512 + 1, true, false)],
            true,
            8,
        )
        .unwrap();
        assert_eq!(req.data, vec![(GuestAddress(DATA), 512)]);
        assert_eq!(req.data_len, 512);
        assert_eq!(req.status, GuestAddress(DATA + 512));
        // GET_ID the same way: 20 bytes of id, then the status.
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_request(
            &m,
            &[desc(HDR, 16, false, true), desc(DATA, 21, true, false)],
            true,
            8,
        )
        .unwrap();
        assert_eq!(
            (req.kind, req.data_len, req.status),
            (RequestKind::GetId, 20, GuestAddress(DATA + 20))
        );
    }

    #[test]
    fn a_header_split_over_descriptors_is_read_whole() {
        let m = mem();
        // type and reserved in one place, the sector in another; then a write's data starts in
        // the second header descriptor and goes on in a third.
        m.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
        m.write_obj(5u64, GuestAddress(HDR + 0x100)).unwrap();
        let req = parse_request(
            &m,
            &[
                desc(HDR, 8, false, true),
                desc(HDR + 0x100, 8 + 512, false, true),
                desc(DATA, 512, false, true),
                desc(STATUS, 1, true, false),
            ],
            true,
            8,
        )
        .unwrap();
        assert_eq!((req.kind, req.offset), (RequestKind::Write, 5 * 512));
        assert_eq!(
            req.data,
            vec![(GuestAddress(HDR + 0x108), 512), (GuestAddress(DATA), 512)]
        );
        // A header split 3 + 13 over two descriptors, a read of one sector.
        header(&m, VIRTIO_BLK_T_IN, 6);
        let req = parse_request(
            &m,
            &[
                desc(HDR, 3, false, true),
                desc(HDR + 3, 13, false, true),
                desc(DATA, 0, true, true),
                desc(DATA, 512, true, true),
                desc(STATUS, 1, true, true),
                desc(STATUS + 8, 0, true, false),
            ],
            true,
            8,
        )
        .unwrap();
        assert_eq!((req.kind, req.offset), (RequestKind::Read, 6 * 512));
        assert_eq!(req.data, vec![(GuestAddress(DATA), 512)], "no empty pieces");
        assert_eq!(
            req.status,
            GuestAddress(STATUS),
            "empty descriptors hold no status"
        );
    }

    #[test]
    fn other_layouts_keep_every_check() {
        let m = mem();
        let refused = |descs: &[Descriptor]| parse_request(&m, descs, true, 8).unwrap_err();
        // 15 readable bytes are not a header, however they are split.
        assert_eq!(
            refused(&[
                desc(HDR, 7, false, true),
                desc(HDR + 7, 8, false, true),
                desc(STATUS, 1, true, false)
            ])
            .0,
            RequestError::BadHeader
        );
        // A read whose header descriptor carries readable data.
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            refused(&[
                desc(HDR, 16 + 512, false, true),
                desc(DATA, 513, true, false)
            ])
            .0,
            RequestError::WrongDirection
        );
        // A write whose status descriptor carries writable data.
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            refused(&[
                desc(HDR, 16 + 512, false, true),
                desc(DATA, 513, true, false)
            ])
            .0,
            RequestError::WrongDirection
        );
        // Readable bytes after writable ones.
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            refused(&[
                desc(HDR, 16, false, true),
                desc(DATA, 512, true, true),
                desc(DATA + 512, 512, false, true),
                desc(STATUS, 1, true, false)
            ])
            .0,
            RequestError::WrongDirection
        );
        // Data and status in one descriptor that leaves guest memory: no status to write.
        assert_eq!(
            refused(&[desc(HDR, 16, false, true), desc(0xf_ff00, 513, true, false)]),
            (RequestError::BadStatus, None)
        );
        // Data and status in one descriptor, data past the capacity, not whole sectors.
        header(&m, VIRTIO_BLK_T_IN, 7);
        assert!(matches!(
            refused(&[desc(HDR, 16, false, true), desc(DATA, 1025, true, false)]),
            (RequestError::OutOfRange { .. }, Some(GuestAddress(a))) if a == DATA + 1024
        ));
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            refused(&[
                desc(HDR, 16 + 100, false, true),
                desc(STATUS, 1, true, false)
            ])
            .0,
            RequestError::Unaligned(100)
        );
        // Header and data in one descriptor that runs out of guest memory.
        header_at(&m, 0xf_fff0, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            refused(&[
                desc(0xf_fff0, 16 + 512, false, true),
                desc(STATUS, 1, true, false)
            ]),
            (RequestError::BadBuffer, Some(GuestAddress(STATUS)))
        );
        // A zero-length GET_ID: only the status is writable.
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(
            refused(&[desc(HDR, 16, false, true), desc(STATUS, 1, true, false)]).0,
            RequestError::TooShort(2)
        );
    }
}
