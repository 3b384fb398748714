//! What the host accepts as a job file, and how it opens one: a regular file with one link, not a
//! symbolic link (opened with `O_NOFOLLOW`, so a link swapped in after a check is refused too), no
//! larger than a maximum size. The runner, construir-vmm and construir-qemu all open jobs here, so a
//! job that one refuses the others refuse the same way.
//!
//! Why each rule: a symbolic link in a queue would hand the guest its target read-write (a
//! runner-owned file, another submitter's job); a hard link is the same inode under a second name;
//! a job file's apparent size is the disk the guest gets and the VMM's file-size limit, so a sparse
//! multi-terabyte file must not pass.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The largest job file taken by default: 8 GiB (the job's disk is the file itself).
pub const DEFAULT_MAX_JOB_SIZE: u64 = 8 << 30;

/// Why a file is not a job the host will run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobFileRefusal {
    #[error("it is a symbolic link; jobs must be regular files (its target is not touched)")]
    Symlink,
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it has {0} hard links; a job must be a file of its own (one link)")]
    HardLinks(u64),
    #[error("it is {size} bytes, more than the largest job taken here ({max} bytes)")]
    TooBig { size: u64, max: u64 },
}

/// A job file that could not be opened or is refused.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("{}: {refusal}", path.display())]
    Refused {
        path: PathBuf,
        refusal: JobFileRefusal,
    },
    #[error("cannot open the job file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl JobFileError {
    /// The refusal, when the file was opened (or found) and is not acceptable as a job.
    pub fn refusal(&self) -> Option<&JobFileRefusal> {
        match self {
            JobFileError::Refused { refusal, .. } => Some(refusal),
            JobFileError::Open { .. } => None,
        }
    }
}

/// What kind of file this is, for messages.
fn kind_name(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "regular file"
    }
}

/// Checks a job file's metadata (from `lstat` or `fstat`): the pure part of the rules.
pub fn check_job_metadata(meta: &Metadata, max_size: u64) -> Result<(), JobFileRefusal> {
    if meta.file_type().is_symlink() {
        return Err(JobFileRefusal::Symlink);
    }
    if !meta.file_type().is_file() {
        return Err(JobFileRefusal::NotRegular(kind_name(meta)));
    }
    if meta.nlink() != 1 {
        return Err(JobFileRefusal::HardLinks(meta.nlink()));
    }
    if meta.len() > max_size {
        return Err(JobFileRefusal::TooBig {
            size: meta.len(),
            max: max_size,
        });
    }
    Ok(())
}

/// Opens a job file read-write without following a symbolic link and checks it on the open
/// handle (so what is checked is what is run). `O_NONBLOCK` keeps a FIFO from blocking the open;
/// it has no effect on the regular file that passes.
pub fn open_job_file(path: &Path, max_size: u64) -> Result<File, JobFileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                JobFileError::Refused {
                    path: path.to_path_buf(),
                    refusal: JobFileRefusal::Symlink,
                }
            } else {
                JobFileError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let meta = file.metadata().map_err(|source| JobFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    check_job_metadata(&meta, max_size).map_err(|refusal| JobFileError::Refused {
        path: path.to_path_buf(),
        refusal,
    })?;
    Ok(file)
}

pub use crate::size::parse_size;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_with_one_link_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j_t0.tar.xz");
        std::fs::write(&p, b"job").unwrap();
        let f = open_job_file(&p, 1 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3);
    }

    #[test]
    fn links_directories_fifos_and_big_files_are_refused_untouched() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target.json");
        std::fs::write(&target, b"{\"not\": \"a job\"}").unwrap();
        let link = d.path().join("l_i0.tar.xz");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_job_file(&link, 1 << 20).unwrap_err();
        assert_eq!(e.refusal(), Some(&JobFileRefusal::Symlink), "{e}");
        assert_eq!(
            check_job_metadata(&std::fs::symlink_metadata(&link).unwrap(), 1 << 20),
            Err(JobFileRefusal::Symlink)
        );

        let hard = d.path().join("h_i0.tar.xz");
        std::fs::hard_link(&target, &hard).unwrap();
        let e = open_job_file(&hard, 1 << 20).unwrap_err();
        assert_eq!(e.refusal(), Some(&JobFileRefusal::HardLinks(2)), "{e}");

        let dir = d.path().join("d_i0.tar.xz");
        std::fs::create_dir(&dir).unwrap();
        // Opening a directory read-write fails (EISDIR) before any check.
        assert!(open_job_file(&dir, 1 << 20).is_err());
        assert_eq!(
            check_job_metadata(&std::fs::metadata(&dir).unwrap(), 1 << 20),
            Err(JobFileRefusal::NotRegular("directory"))
        );

        let fifo = d.path().join("f_i0.tar.xz");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_job_file(&fifo, 1 << 20).unwrap_err();
        assert_eq!(
            e.refusal(),
            Some(&JobFileRefusal::NotRegular("FIFO")),
            "{e}"
        );

        let sparse = d.path().join("s_i0.tar.xz");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let e = open_job_file(&sparse, DEFAULT_MAX_JOB_SIZE).unwrap_err();
        assert!(
            matches!(e.refusal(), Some(JobFileRefusal::TooBig { .. })),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"{\"not\": \"a job\"}",
            "the target is untouched"
        );
    }
}
