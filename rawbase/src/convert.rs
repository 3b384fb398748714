//! An image's qcow2 → a raw file, with imago (no QEMU). Images are data, not trusted code: a
//! qcow2 that refers to a backing file or an external data file is refused (imago's
//! `DenyImplicitOpenGate`: nothing but the image itself is opened), and the virtual size is
//! capped, since the conversion reads every byte of it.

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub use construir_contract::manifest::MAX_VIRTUAL_SIZE;

/// Why the root disk could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has sha256 {actual}, but its manifest says {expected}: the image changed or is damaged"
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{0:?} is not a sha256 (64 lower-case hex digits)")]
    BadHash(String),
    #[error("{path} is not a usable qcow2 image")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} claims a disk of {size} bytes, more than the {limit} bytes a construir image may have"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot write the converted disk {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, ConvertError> {
    let file = std::fs::File::open(path).map_err(|source| ConvertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    sha256_reader(file).map_err(|source| ConvertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The SHA-256 of everything `reader` yields, in hex (for a file opened before the sandbox).
pub fn sha256_reader(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Converts `qcow2` to a raw file at `out` (sparse: all-zero chunks are not written).
pub fn convert(qcow2: &Path, out: &Path) -> Result<u64, ConvertError> {
    convert_limited(qcow2, out, MAX_VIRTUAL_SIZE)
}

/// [`convert`] with a smaller size limit (the fuzz target's).
pub fn convert_limited(qcow2: &Path, out: &Path, limit: u64) -> Result<u64, ConvertError> {
    let image = std::fs::File::open(qcow2).map_err(|source| ConvertError::Read {
        path: qcow2.to_path_buf(),
        source,
    })?;
    let mut file = std::fs::File::create(out).map_err(|source| ConvertError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    convert_file(image, qcow2, &mut file, out, limit)
}

/// Converts the qcow2 open as `image` (named `image_name` in messages) into `out` (named
/// `out_name`), at most `limit` bytes of virtual disk. Working on the open file means what was
/// hashed is what is converted. `out` ends synced, `size` bytes long.
pub fn convert_file(
    image: std::fs::File,
    image_name: &Path,
    out: &mut std::fs::File,
    out_name: &Path,
    limit: u64,
) -> Result<u64, ConvertError> {
    let bad = |source| ConvertError::Qcow2 {
        path: image_name.to_path_buf(),
        source,
    };
    // Opened from a descriptor, imago does not know the image's name, so it could not even
    // resolve a relative backing-file name; the gate refuses any implicit open anyway.
    let storage = ImagoFile::try_from(image).map_err(bad)?;
    let image = Qcow2::<ImagoFile>::builder(storage)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(bad)?;
    let access = FormatAccess::new(image);
    let size = access.size();
    if size > limit {
        return Err(ConvertError::TooLarge {
            path: image_name.to_path_buf(),
            size,
            limit,
        });
    }
    let werr = |source| ConvertError::Write {
        path: out_name.to_path_buf(),
        source,
    };
    out.set_len(0).map_err(werr)?;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let n = CHUNK.min(size - offset) as usize;
        access.read(&mut buf[..n], offset).map_err(bad)?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.seek(std::io::SeekFrom::Start(offset)).map_err(werr)?;
            out.write_all(&buf[..n]).map_err(werr)?;
        }
        offset += n as u64;
    }
    out.set_len(size).map_err(werr)?;
    out.sync_all().map_err(werr)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn qemu_img(args: &[&std::ffi::OsStr]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is needed (Debian package qemu-utils; tools/test installs it)");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_qcow2_with_a_data_file_is_refused_and_the_data_file_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("secret.data");
        let q = dir.path().join("external.qcow2");
        let opt = format!("data_file={},data_file_raw=on", data.display());
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            opt.as_ref(),
            q.as_os_str(),
            "1M".as_ref(),
        ]);
        std::fs::write(&data, vec![0x66u8; 1 << 20]).unwrap();
        let out = dir.path().join("out.raw");
        let err = convert(&q, &out).unwrap_err();
        let ConvertError::Qcow2 { source, .. } = &err else {
            panic!("{err}")
        };
        assert!(source.to_string().contains("denied"), "{source}");
    }

    #[test]
    fn a_virtual_size_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("big.qcow2");
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            q.as_os_str(),
            "64M".as_ref(),
        ]);
        let err = convert_limited(&q, &dir.path().join("o"), 1 << 20).unwrap_err();
        assert!(matches!(err, ConvertError::TooLarge { .. }), "{err}");
    }
}
