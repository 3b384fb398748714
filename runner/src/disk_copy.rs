//! The job file a VM writes is a copy of the submitted one: a VM writes its output over its disk,
//! so a start that is interrupted (the runner killed, the host down, a shutdown past its grace)
//! would otherwise leave the next start a half-overwritten job. The copy is made before every
//! start from the submitted file, which the runner keeps until the run ends, and it is the
//! runner's own file (mode 0600), whoever owned the submitted one.
//!
//! Job files are mostly padding (`truncate -s 64M`), so the copy keeps holes: only the extents
//! that hold data (`SEEK_DATA`/`SEEK_HOLE`) are copied, with `copy_file_range` (in the kernel, a
//! reflink where the file system can).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Copies `from` to a new file `to` (which must not exist), holes kept; returns the bytes of data
/// copied. The new file is made with mode 0600 and synced.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(to)?;
    dst.set_len(len)?;
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(&src, pos, libc::SEEK_DATA)? else {
            break; // only a hole is left
        };
        let end = seek(&src, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(&src, &dst, start, end - start)?;
        copied += end - start;
        pos = end;
    }
    dst.sync_all()?;
    Ok(copied)
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` when there is no more data (ENXIO).
fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    // SAFETY: lseek on a descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`.
fn copy_range(src: &File, dst: &File, offset: u64, mut len: u64) -> io::Result<()> {
    let mut off_in = offset as libc::loff_t;
    let mut off_out = offset as libc::loff_t;
    while len > 0 {
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: copy_file_range between two descriptors we own, with offsets we own.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the submitted job file shrank while it was copied",
            ));
        }
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_padded_job_is_copied_byte_for_byte_with_its_holes() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("job");
        let mut f = File::create(&from).unwrap();
        f.write_all(b"archive at the start").unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"and some data far in").unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let to = d.path().join("copy");
        let copied = copy_sparse(&from, &to).unwrap();
        assert!(copied < 1 << 20, "only the data is copied ({copied} bytes)");
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 4 << 20, "the copy stays sparse");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Never over an existing file, never through a link.
        assert!(copy_sparse(&from, &to).is_err());
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&from, &link).unwrap();
        assert!(copy_sparse(&link, &d.path().join("c2")).is_err());
        // An empty job copies to an empty file.
        let empty = d.path().join("empty");
        File::create(&empty).unwrap();
        assert_eq!(copy_sparse(&empty, &d.path().join("c3")).unwrap(), 0);
    }
}
