//! Disk backends, knowing nothing of virtio: a raw file ([`raw`]), a copy-on-write overlay over a
//! read-only base ([`overlay`]), and the one-time conversion of an image's qcow2 into a cached raw
//! base ([`qcow2`]).

pub mod overlay;
pub mod qcow2;
pub mod raw;

use std::io;

/// Sector size the guest sees.
pub const SECTOR_SIZE: u64 = 512;

/// A block device's storage.
pub trait DiskBackend: Send {
    /// Size in bytes (a whole number of sectors).
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range is within `size()`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; the range is within `size()`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&mut self) -> io::Result<()>;
    /// A short identifier the guest can ask for (VIRTIO_BLK_T_GET_ID, at most 20 bytes).
    fn id(&self) -> &str;
}

/// `size` rounded up to whole sectors.
pub fn round_to_sectors(size: u64) -> u64 {
    size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE
}
