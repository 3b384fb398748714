//! The job archive format: a tar, compressed with xz (the seed format), gzip or zstd, or plain,
//! at the start of the job disk. Whatever follows the archive (padding, or the rest of an older,
//! longer archive the job wrote over) does not matter: one compressed stream is decoded and the
//! tar ends at its end-of-archive blocks.
//!
//! Used by the guest init to unpack a job, and by the host to read what a job wrote back.

use std::io::{self, Chain, Cursor, Read};
use std::path::{Path, PathBuf};

/// The script every job carries, relative to the guest's root.
pub const JOB_SCRIPT: &str = "opt/job/construir";
/// The directory the script runs in.
pub const JOB_DIR: &str = "opt/job";

/// How a job archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Gzip,
    Zstd,
    /// A plain (ustar or GNU) tar.
    None,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "tar",
        }
    }
}

/// Why a job archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The data starts with no known compression magic and is no tar.
    #[error("not a job archive: the data starts with neither xz, gzip, zstd nor tar magic")]
    NotAnArchive,
    /// The archive is damaged or truncated.
    #[error("the {compression} job archive is damaged or truncated")]
    Corrupt {
        compression: &'static str,
        #[source]
        source: io::Error,
    },
    /// Writing an unpacked file failed (the archive itself was readable so far).
    #[error("cannot unpack {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is larger than the caller allowed.
    #[error("{path} is larger than the {limit} bytes allowed")]
    TooLarge { path: String, limit: u64 },
    /// Reading the archive's source failed.
    #[error("cannot read the job archive")]
    Read(#[source] io::Error),
}

/// Recognises the compression from the first bytes (at least 512 for a plain tar).
pub fn detect(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Compression::Xz)
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.len() >= 263 && &head[257..262] == b"ustar" {
        Some(Compression::None)
    } else {
        None
    }
}

type Peeked<R> = Chain<Cursor<Vec<u8>>, R>;

/// The decompressed tar stream of a job archive, with the compression it had.
pub struct TarStream<'a> {
    pub compression: Compression,
    reader: Box<dyn Read + 'a>,
}

impl Read for TarStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// Opens the archive at the start of `source`: detects its compression and decodes one stream.
pub fn open<'a, R: Read + 'a>(mut source: R) -> Result<TarStream<'a>, ArchiveError> {
    let mut head = Vec::with_capacity(512);
    (&mut source)
        .take(512)
        .read_to_end(&mut head)
        .map_err(ArchiveError::Read)?;
    let compression = detect(&head).ok_or(ArchiveError::NotAnArchive)?;
    let stream: Peeked<R> = Cursor::new(head).chain(source);
    let reader: Box<dyn Read + 'a> = match compression {
        // One stream only: what follows it is padding or stale data.
        Compression::Xz => Box::new(xz2::read::XzDecoder::new(stream)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(stream)),
        Compression::Zstd => Box::new(ruzstd::decoding::StreamingDecoder::new(stream).map_err(
            |e| ArchiveError::Corrupt {
                compression: "zstd",
                source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            },
        )?),
        Compression::None => Box::new(stream),
    };
    Ok(TarStream {
        compression,
        reader,
    })
}

fn corrupt(compression: Compression, source: io::Error) -> ArchiveError {
    ArchiveError::Corrupt {
        compression: compression.as_str(),
        source,
    }
}

/// One entry of an archive, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The path inside the archive, without a leading `./`.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub kind: char,
}

/// What unpacking did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackSummary {
    pub compression: Option<&'static str>,
    pub entries: u64,
    pub bytes: u64,
}

/// Normalises an archive path: no leading `./` or `/`.
pub fn normalize(path: &str) -> &str {
    let mut p = path;
    loop {
        if let Some(rest) = p.strip_prefix("./") {
            p = rest;
        } else if let Some(rest) = p.strip_prefix('/') {
            p = rest;
        } else {
            return p;
        }
    }
}

fn entry_path(entry: &tar::Entry<'_, impl Read>) -> io::Result<String> {
    Ok(normalize(&String::from_utf8_lossy(&entry.path_bytes())).to_string())
}

/// Unpacks the archive at the start of `source` into `dest`, keeping modes and mtimes.
/// Paths cannot leave `dest` (`..` components are refused by the tar reader).
pub fn unpack(source: impl Read, dest: &Path) -> Result<UnpackSummary, ArchiveError> {
    let stream = open(source)?;
    let compression = stream.compression;
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut summary = UnpackSummary {
        compression: Some(compression.as_str()),
        ..Default::default()
    };
    let entries = archive.entries().map_err(|e| corrupt(compression, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(compression, e))?;
        let path = entry_path(&entry).map_err(|e| corrupt(compression, e))?;
        summary.entries += 1;
        summary.bytes += entry.size();
        entry.unpack_in(dest).map_err(|e| {
            // The tar crate reports a damaged stream and a failed write alike; a failed read of
            // the data is the archive's fault.
            if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(compression, e)
            } else {
                ArchiveError::Unpack {
                    path: dest.join(&path),
                    source: e,
                }
            }
        })?;
    }
    Ok(summary)
}

/// Lists the archive at the start of `source`.
pub fn list(source: impl Read) -> Result<(Compression, Vec<EntryInfo>), ArchiveError> {
    let stream = open(source)?;
    let compression = stream.compression;
    let mut archive = tar::Archive::new(stream);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| corrupt(compression, e))? {
        let entry = entry.map_err(|e| corrupt(compression, e))?;
        let header = entry.header();
        out.push(EntryInfo {
            path: entry_path(&entry).map_err(|e| corrupt(compression, e))?,
            size: entry.size(),
            mode: header.mode().unwrap_or(0),
            kind: header.entry_type().as_byte() as char,
        });
    }
    Ok((compression, out))
}

/// Reads one regular file out of the archive at the start of `source`, at most `limit` bytes.
/// Returns `None` when the archive has no such file.
pub fn read_file(
    source: impl Read,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, ArchiveError> {
    let want = normalize(path);
    let stream = open(source)?;
    let compression = stream.compression;
    let mut archive = tar::Archive::new(stream);
    for entry in archive.entries().map_err(|e| corrupt(compression, e))? {
        let mut entry = entry.map_err(|e| corrupt(compression, e))?;
        if entry_path(&entry).map_err(|e| corrupt(compression, e))? != want
            || !entry.header().entry_type().is_file()
        {
            continue;
        }
        if entry.size() > limit {
            return Err(ArchiveError::TooLarge {
                path: want.to_string(),
                limit,
            });
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| corrupt(compression, e))?;
        return Ok(Some(data));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_of(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data, mode) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(*mode);
            header.set_cksum();
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn compress(tar: &[u8], how: Compression) -> Vec<u8> {
        match how {
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => {
                let mut out = Vec::new();
                ruzstd::encoding::compress(
                    tar,
                    &mut out,
                    ruzstd::encoding::CompressionLevel::Fastest,
                );
                out
            }
            Compression::None => tar.to_vec(),
        }
    }

    const SCRIPT: &[u8] = b"#!/bin/sh\necho hi\n";

    #[test]
    fn every_compression_unpacks_with_trailing_padding_and_stale_data() {
        let tar = tar_of(&[
            ("./opt/job/construir", SCRIPT, 0o755),
            ("opt/job/data", b"12345", 0o644),
        ]);
        for how in [
            Compression::Xz,
            Compression::Gzip,
            Compression::Zstd,
            Compression::None,
        ] {
            let mut disk = compress(&tar, how);
            disk.extend(std::iter::repeat_n(0u8, 4096));
            disk.extend(compress(&tar_of(&[("stale", b"old", 0o644)]), how));
            disk.extend(std::iter::repeat_n(0xa5u8, 1000));
            let dir = tempfile::tempdir().unwrap();
            let summary = unpack(&disk[..], dir.path()).unwrap();
            assert_eq!(summary.entries, 2, "{how:?}");
            assert_eq!(summary.compression, Some(how.as_str()));
            let script = dir.path().join(JOB_SCRIPT);
            assert_eq!(std::fs::read(&script).unwrap(), SCRIPT);
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
                0o755
            );
            assert!(
                !dir.path().join("stale").exists(),
                "{how:?} read past the first archive"
            );
            assert_eq!(
                read_file(&disk[..], "opt/job/data", 100).unwrap().unwrap(),
                b"12345"
            );
            assert_eq!(read_file(&disk[..], "missing", 100).unwrap(), None);
            let (c, entries) = list(&disk[..]).unwrap();
            assert_eq!(c, how);
            assert_eq!(entries[0].path, JOB_SCRIPT);
            assert_eq!(entries[0].mode, 0o755);
        }
    }

    #[test]
    fn garbage_and_zeros_are_not_archives() {
        let dir = tempfile::tempdir().unwrap();
        for junk in [
            vec![0u8; 4096],
            vec![],
            b"hello world, this is not a tar".to_vec(),
        ] {
            assert!(matches!(
                unpack(&junk[..], dir.path()),
                Err(ArchiveError::NotAnArchive)
            ));
        }
    }

    #[test]
    fn truncated_and_damaged_archives_are_corrupt() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let tar = tar_of(&[("opt/job/construir", SCRIPT, 0o755), ("big", &data, 0o644)]);
        for how in [Compression::Xz, Compression::Gzip, Compression::Zstd] {
            let full = compress(&tar, how);
            let dir = tempfile::tempdir().unwrap();
            let cut = &full[..full.len() / 2];
            assert!(
                matches!(unpack(cut, dir.path()), Err(ArchiveError::Corrupt { .. })),
                "{how:?} cut"
            );
            let mut damaged = full.clone();
            let mid = damaged.len() / 2;
            for b in &mut damaged[mid..mid + 64] {
                *b ^= 0x5a;
            }
            assert!(unpack(&damaged[..], dir.path()).is_err(), "{how:?} damaged");
        }
    }

    #[test]
    fn read_file_enforces_its_limit() {
        let tar = tar_of(&[("out.bin", &[7u8; 1000], 0o644)]);
        assert!(matches!(
            read_file(&tar[..], "./out.bin", 999),
            Err(ArchiveError::TooLarge { .. })
        ));
        assert_eq!(
            read_file(&tar[..], "/out.bin", 1000)
                .unwrap()
                .unwrap()
                .len(),
            1000
        );
    }

    #[test]
    fn paths_cannot_escape_the_destination() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o644);
        // Bypass the builder's own path checks to forge a hostile name.
        header.as_old_mut().name[..13].copy_from_slice(b"../escaped.tx");
        header.set_cksum();
        builder.append(&header, &b"bad"[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        let _ = unpack(&tar[..], &dest);
        assert!(!outer.path().join("escaped.tx").exists());
    }
}
