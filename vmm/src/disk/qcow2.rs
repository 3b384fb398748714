//! Turns an image's qcow2 into the raw base every run shares: converted once (imago, no QEMU),
//! cached by the qcow2's sha256, written to a temporary name and renamed, so a crash never leaves
//! a half-converted base in the cache. Images are data, not trusted code: a qcow2 that refers to a
//! backing file is refused (imago's `DenyImplicitOpenGate`), and the hash must match the manifest.

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, Storage, StorageOpenOptions};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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

/// Largest virtual disk an image may declare: a qcow2 header can claim exabytes, and the
/// conversion reads every byte of the virtual disk.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 40;

/// Converts `qcow2` to a raw file at `out` (sparse: all-zero chunks are not written).
pub fn convert(qcow2: &Path, out: &Path) -> Result<u64, ConvertError> {
    convert_limited(qcow2, out, MAX_VIRTUAL_SIZE)
}

/// [`convert`] with a smaller size limit (the fuzz target's).
pub fn convert_limited(qcow2: &Path, out: &Path, limit: u64) -> Result<u64, ConvertError> {
    let bad = |source| ConvertError::Qcow2 {
        path: qcow2.to_path_buf(),
        source,
    };
    let storage =
        ImagoFile::open(StorageOpenOptions::new().filename(qcow2).write(false)).map_err(bad)?;
    let image = Qcow2::<ImagoFile>::builder(storage)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(bad)?;
    let access = FormatAccess::new(image);
    let size = access.size();
    if size > limit {
        return Err(ConvertError::TooLarge {
            path: qcow2.to_path_buf(),
            size,
            limit,
        });
    }
    let werr = |source| ConvertError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create(out).map_err(werr)?;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let n = CHUNK.min(size - offset) as usize;
        access.read(&mut buf[..n], offset).map_err(bad)?;
        if buf[..n].iter().any(|&b| b != 0) {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(offset)).map_err(werr)?;
            file.write_all(&buf[..n]).map_err(werr)?;
        }
        offset += n as u64;
    }
    file.set_len(size).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    Ok(size)
}

/// The cached raw base for `qcow2` (whose manifest hash is `expected_sha256`), converting it the
/// first time. Returns the raw file's path.
pub fn cached_raw_base(
    qcow2: &Path,
    expected_sha256: &str,
    cache_dir: &Path,
) -> Result<PathBuf, ConvertError> {
    let raw = cache_dir.join(format!("{expected_sha256}.raw"));
    if raw.exists() {
        return Ok(raw);
    }
    let actual = sha256_file(qcow2)?;
    if actual != expected_sha256 {
        return Err(ConvertError::HashMismatch {
            path: qcow2.to_path_buf(),
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    std::fs::create_dir_all(cache_dir).map_err(|source| ConvertError::Write {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    let tmp = cache_dir.join(format!(
        "{expected_sha256}.raw.{}.partial",
        std::process::id()
    ));
    tracing::info!(
        "converting {} to a raw base (once per image)",
        qcow2.display()
    );
    let started = std::time::Instant::now();
    let result = convert(qcow2, &tmp);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &raw).map_err(|source| ConvertError::Write {
        path: raw.clone(),
        source,
    })?;
    tracing::info!(
        "converted in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        raw.display()
    );
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img_available() -> bool {
        std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok()
    }

    #[test]
    fn converts_a_qcow2_made_by_qemu_img_byte_for_byte() {
        assert!(
            qemu_img_available(),
            "qemu-img is needed (Debian package qemu-utils; tools/test installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let raw_in = dir.path().join("in.raw");
        let mut data = vec![0u8; 3 << 20];
        for (i, b) in data.iter_mut().enumerate().skip(1 << 20).take(70_000) {
            *b = (i * 31 % 253) as u8;
        }
        data[(3 << 20) - 1] = 0x42;
        std::fs::write(&raw_in, &data).unwrap();
        let q = dir.path().join("img.qcow2");
        for compressed in [false, true] {
            let mut cmd = std::process::Command::new("qemu-img");
            cmd.args(["convert", "-O", "qcow2"]);
            if compressed {
                cmd.arg("-c");
            }
            assert!(cmd.arg(&raw_in).arg(&q).status().unwrap().success());
            let sha = sha256_file(&q).unwrap();
            let cache = dir.path().join(format!("cache-{compressed}"));
            let raw = cached_raw_base(&q, &sha, &cache).unwrap();
            assert!(
                std::fs::read(&raw).unwrap() == data,
                "converted bytes differ (compressed: {compressed})"
            );
            // Cached: the second call does not convert again.
            let before = std::fs::metadata(&raw).unwrap().modified().unwrap();
            assert_eq!(cached_raw_base(&q, &sha, &cache).unwrap(), raw);
            assert_eq!(std::fs::metadata(&raw).unwrap().modified().unwrap(), before);
        }
    }

    #[test]
    fn wrong_hashes_garbage_and_backing_files_are_refused() {
        assert!(qemu_img_available(), "qemu-img is needed");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.qcow2");
        std::fs::write(&junk, vec![0x51u8; 10_000]).unwrap();
        let sha = sha256_file(&junk).unwrap();
        assert!(matches!(
            cached_raw_base(&junk, &sha, dir.path()),
            Err(ConvertError::Qcow2 { .. })
        ));
        assert!(matches!(
            cached_raw_base(&junk, "00", dir.path()),
            Err(ConvertError::HashMismatch { .. })
        ));
        // A qcow2 pointing at a backing file on the host must not open it.
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, vec![0x77u8; 1 << 20]).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        assert!(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&secret)
                .arg(&overlay)
                .status()
                .unwrap()
                .success()
        );
        let sha = sha256_file(&overlay).unwrap();
        let err = cached_raw_base(&overlay, &sha, &dir.path().join("c")).unwrap_err();
        assert!(matches!(err, ConvertError::Qcow2 { .. }), "{err}");
        // No partial file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("c"))
            .map(|d| d.count())
            .into_iter()
            .collect();
        assert!(leftovers.iter().all(|&n| n == 0));
    }
}
