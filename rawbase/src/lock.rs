//! The few file-system calls the cache needs beyond std: `flock(2)` locks and `futimens(2)`.
//!
//! A `flock` lock belongs to the open file description, so a descriptor handed to a child
//! (QEMU gets a duplicate) keeps the lock for as long as any copy is open, and the kernel drops it
//! when the last copy closes, whatever ends the process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Takes a shared lock, waiting for an exclusive holder (a pruner, for a moment) to let go.
pub fn lock_shared(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_SH)
}

/// Takes an exclusive lock, waiting for it.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_EX)
}

/// Takes an exclusive lock if nobody holds any lock: `Ok(false)` when someone does.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Lets go of this description's lock.
pub fn unlock(file: &File) -> io::Result<()> {
    flock(file, libc::LOCK_UN)
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own, no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sets the file's access and modification times to now (the cache's "last used" stamp). Works
/// on a read-only descriptor for the file's owner or anyone who may write it.
pub fn touch(file: &File) -> io::Result<()> {
    // SAFETY: a null `times` means "now" for both; the descriptor is ours.
    if unsafe { libc::futimens(file.as_raw_fd(), std::ptr::null()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_lock_keeps_an_exclusive_one_out_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let user = File::open(&path).unwrap();
        let pruner = File::open(&path).unwrap();
        lock_shared(&user).unwrap();
        assert!(!try_lock_exclusive(&pruner).unwrap());
        // A second user shares it.
        let other = File::open(&path).unwrap();
        lock_shared(&other).unwrap();
        drop(other);
        unlock(&user).unwrap();
        assert!(try_lock_exclusive(&pruner).unwrap());
        // A duplicate (what a child inherits) is the same lock.
        unlock(&pruner).unwrap();
        lock_shared(&user).unwrap();
        let dup = user.try_clone().unwrap();
        drop(user);
        assert!(!try_lock_exclusive(&pruner).unwrap());
        drop(dup);
        assert!(try_lock_exclusive(&pruner).unwrap());
    }
}
