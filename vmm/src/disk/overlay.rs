//! A copy-on-write overlay: reads come from a read-only base until a cluster is written; written
//! clusters live in a private, unlinked temporary file that disappears with the process. The base
//! is never written, so one cached base serves every run, and a run's changes are thrown away.

use super::DiskBackend;
use super::raw::read_full_at;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Granularity of copy-up.
pub const CLUSTER: u64 = 4096;

pub struct OverlayDisk {
    base: File,
    overlay: File,
    size: u64,
    /// One bit per cluster: written to the overlay.
    written: Vec<u64>,
    id: String,
}

impl OverlayDisk {
    /// An overlay over `base` (opened read-only by the caller), with its data in a temporary file
    /// under `tmp_dir`.
    pub fn new(base: File, size: u64, tmp_dir: &std::path::Path, id: &str) -> io::Result<Self> {
        let overlay = tempfile::tempfile_in(tmp_dir)?;
        overlay.set_len(size)?;
        let clusters = size.div_ceil(CLUSTER);
        Ok(Self {
            base,
            overlay,
            size,
            written: vec![0; clusters.div_ceil(64) as usize],
            id: id.chars().take(20).collect(),
        })
    }

    fn is_written(&self, cluster: u64) -> bool {
        self.written[(cluster / 64) as usize] & (1 << (cluster % 64)) != 0
    }

    fn mark_written(&mut self, cluster: u64) {
        self.written[(cluster / 64) as usize] |= 1 << (cluster % 64);
    }

    /// Clusters written so far.
    pub fn written_clusters(&self) -> u64 {
        self.written.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Splits `offset..offset+len` at cluster boundaries: (cluster, offset in cluster, length).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let cluster = pos / CLUSTER;
        let within = pos % CLUSTER;
        let n = (CLUSTER - within).min(end - pos);
        pos += n;
        Some((cluster, within, n))
    })
}

impl DiskBackend for OverlayDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // One read per run of clusters that come from the same file, not one per cluster.
        let mut pieces = pieces(offset, buf.len() as u64)
            .map(|(cluster, _, n)| (self.is_written(cluster), n as usize))
            .peekable();
        let mut done = 0usize;
        while let Some((written, n)) = pieces.next() {
            let mut len = n;
            while let Some((_, more)) = pieces.next_if(|&(w, _)| w == written) {
                len += more;
            }
            let file = if written { &self.overlay } else { &self.base };
            read_full_at(file, &mut buf[done..done + len], offset + done as u64)?;
            done += len;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        for (cluster, within, n) in pieces(offset, buf.len() as u64) {
            let start = cluster * CLUSTER;
            if !self.is_written(cluster) && n < CLUSTER {
                // Copy the rest of the cluster up from the base first.
                let mut whole = vec![0u8; CLUSTER as usize];
                read_full_at(&self.base, &mut whole, start)?;
                whole[within as usize..(within + n) as usize]
                    .copy_from_slice(&buf[done..done + n as usize]);
                self.overlay.write_all_at(&whole, start)?;
            } else {
                self.overlay
                    .write_all_at(&buf[done..done + n as usize], start + within)?;
            }
            self.mark_written(cluster);
            done += n as usize;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The overlay is thrown away at exit: nothing to make durable.
        Ok(())
    }

    fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_with(data: &[u8]) -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        let ro = File::open(f.path()).unwrap();
        (f, ro)
    }

    #[test]
    fn writes_stay_in_the_overlay_and_reads_merge() {
        let base_data: Vec<u8> = (0..3 * CLUSTER).map(|i| (i % 251) as u8).collect();
        let (path, base) = base_with(&base_data);
        let dir = tempfile::tempdir().unwrap();
        let mut disk = OverlayDisk::new(base, base_data.len() as u64, dir.path(), "root").unwrap();
        // A write straddling clusters 0 and 1, unaligned.
        disk.write_at(&[0xee; 100], CLUSTER - 50).unwrap();
        assert_eq!(disk.written_clusters(), 2);
        let mut all = vec![0u8; base_data.len()];
        disk.read_at(&mut all, 0).unwrap();
        let mut want = base_data.clone();
        want[(CLUSTER - 50) as usize..(CLUSTER + 50) as usize].fill(0xee);
        assert!(all == want, "merged view differs");
        // The base file is untouched.
        assert!(std::fs::read(path.path()).unwrap() == base_data);
        // A whole-cluster write needs no copy-up.
        disk.write_at(&vec![1u8; CLUSTER as usize], 2 * CLUSTER)
            .unwrap();
        let mut c = vec![0u8; CLUSTER as usize];
        disk.read_at(&mut c, 2 * CLUSTER).unwrap();
        assert!(c.iter().all(|&b| b == 1));
        assert_eq!(disk.written_clusters(), 3);
    }

    #[test]
    fn reads_spanning_base_overlay_base_merge() {
        let base_data: Vec<u8> = (0..4 * CLUSTER).map(|i| (i % 249) as u8).collect();
        let (_path, base) = base_with(&base_data);
        let dir = tempfile::tempdir().unwrap();
        let mut disk = OverlayDisk::new(base, base_data.len() as u64, dir.path(), "root").unwrap();
        disk.write_at(&[0x11; 10], CLUSTER + 5).unwrap();
        let mut got = vec![0u8; (3 * CLUSTER) as usize];
        disk.read_at(&mut got, 100).unwrap();
        let mut want = base_data.clone();
        want[(CLUSTER + 5) as usize..(CLUSTER + 15) as usize].fill(0x11);
        assert!(got[..] == want[100..100 + (3 * CLUSTER) as usize]);
    }

    #[test]
    fn pieces_split_at_clusters() {
        let p: Vec<_> = pieces(CLUSTER - 1, CLUSTER + 2).collect();
        assert_eq!(p, vec![(0, CLUSTER - 1, 1), (1, 0, CLUSTER), (2, 0, 1)]);
        assert_eq!(pieces(5, 0).count(), 0);
    }
}
