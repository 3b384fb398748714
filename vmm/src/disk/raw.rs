//! A raw disk file. Its size is rounded up to whole sectors: reads past the end of the file return
//! zeros, writes there extend it (a job file need not be sector-aligned).

use super::{DiskBackend, round_to_sectors};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub struct RawDisk {
    file: File,
    size: u64,
    id: String,
}

impl RawDisk {
    pub fn new(file: File, id: &str) -> io::Result<Self> {
        let size = round_to_sectors(file.metadata()?.len());
        Ok(Self {
            file,
            size,
            id: id.chars().take(20).collect(),
        })
    }
}

/// Reads at `offset`, zero-filling whatever lies past the end of the file.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl DiskBackend for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_full_at(&self.file, buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_files_round_up_and_read_zeros_past_the_end() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 1000], 0).unwrap();
        let mut disk = RawDisk::new(f, "job").unwrap();
        assert_eq!(disk.size(), 1024);
        let mut buf = [1u8; 512];
        disk.read_at(&mut buf, 512).unwrap();
        assert!(buf[..488].iter().all(|&b| b == 7) && buf[488..].iter().all(|&b| b == 0));
        disk.write_at(&[9u8; 24], 1000).unwrap();
        disk.read_at(&mut buf, 512).unwrap();
        assert!(buf[488..].iter().all(|&b| b == 9));
        assert_eq!(disk.id(), "job");
    }
}
