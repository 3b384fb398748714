//! An output's index: every entry of the archive a job wrote, with its kind, mode, size and, for
//! a regular file, the SHA-256 of its contents; and one digest of the whole tree. A server
//! computes it once, when the output arrives, so that listing an output, serving one file of it
//! and comparing two runners' outputs need no decompression later.
//!
//! The **tree digest** is what replicas of a job must agree on: paths, kinds, permission bits,
//! sizes, contents and link targets, never times, owners or the compression (an output
//! recompressed with another level has the same tree). It is the SHA-256 of one line per entry,
//! the entries sorted by path (stably: a path listed twice keeps its order),
//! `KIND NUL PATH NUL MODE NUL SIZE NUL CONTENT LF`, with KIND one of `file dir symlink hardlink
//! other`, MODE the permission bits in octal (`0o7777` of the header's), and CONTENT the file's
//! SHA-256 in hex, a link's target, or nothing.

use super::{ArchiveError, Limits, Walk, entry_path_bytes};
use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    /// A device, a FIFO, anything else: listed, never unpacked by construir's readers.
    Other,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Hardlink => "hardlink",
            EntryKind::Other => "other",
        }
    }

    fn of(kind: tar::EntryType) -> EntryKind {
        if kind.is_file() || kind.is_gnu_sparse() || kind.is_contiguous() {
            EntryKind::File
        } else if kind.is_dir() {
            EntryKind::Dir
        } else if kind.is_symlink() {
            EntryKind::Symlink
        } else if kind.is_hard_link() {
            EntryKind::Hardlink
        } else {
            EntryKind::Other
        }
    }
}

/// One entry of an output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    /// The path inside the archive without a leading `./`, as [`escape_path`] writes it (lossless:
    /// a name that is not UTF-8 keeps its bytes).
    pub path: String,
    pub kind: EntryKind,
    /// The permission bits (`0o7777` of the header's mode).
    pub mode: u32,
    /// The file's size; 0 for anything else.
    pub size: u64,
    /// A regular file's contents' SHA-256, in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A link's target ([`escape_path`] too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// An output's index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputIndex {
    /// `xz`, `gzip`, `zstd` or `tar` (none).
    pub compression: String,
    /// In the archive's order.
    pub entries: Vec<IndexEntry>,
    /// [`tree_digest`] of the entries.
    pub tree_sha256: String,
}

/// Indexes the archive at the start of `source`, within `limits`, hashing every regular file.
pub fn index(source: impl Read, limits: &Limits) -> Result<OutputIndex, ArchiveError> {
    let mut walk = Walk::open(source, limits)?;
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    walk.each(|entry, ctx| {
        let header = entry.header();
        let kind = EntryKind::of(header.entry_type());
        let mode = header.mode().unwrap_or(0) & 0o7777;
        let link = match kind {
            EntryKind::Symlink | EntryKind::Hardlink => entry
                .link_name_bytes()
                .map(|target| escape_path(super::normalize_bytes(&target))),
            _ => None,
        };
        let path = escape_path(super::normalize_bytes(&entry_path_bytes(entry)));
        let (size, sha256) = if kind == EntryKind::File {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            loop {
                let n = match entry.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ctx.fail(e)),
                };
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            (size, Some(hex(&hasher.finalize())))
        } else {
            (0, None)
        };
        entries.push(IndexEntry {
            path,
            kind,
            mode,
            size,
            sha256,
            link,
        });
        Ok(true)
    })?;
    let tree_sha256 = tree_digest(&entries);
    Ok(OutputIndex {
        compression: walk.compression.as_str().to_string(),
        entries,
        tree_sha256,
    })
}

/// The tree digest of `entries` (see the module's documentation).
pub fn tree_digest(entries: &[IndexEntry]) -> String {
    let mut sorted: Vec<&IndexEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = Sha256::new();
    for e in sorted {
        let content = e.sha256.as_deref().or(e.link.as_deref()).unwrap_or("");
        hasher.update(e.kind.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(e.path.as_bytes());
        hasher.update([0]);
        hasher.update(format!("{:o}", e.mode).as_bytes());
        hasher.update([0]);
        hasher.update(e.size.to_string().as_bytes());
        hasher.update([0]);
        hasher.update(content.as_bytes());
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}

/// A name's bytes as text, losslessly: UTF-8 as it is, but a backslash as `\\` and every byte
/// that is not part of valid UTF-8 as `\xNN`.
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8], mtime: u64) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn xz(data: &[u8], level: u32) -> Vec<u8> {
        use std::io::Write;
        let mut e = xz2::write::XzEncoder::new(Vec::new(), level);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[test]
    fn every_entry_is_listed_with_its_contents_digest_and_the_tree_ignores_times_and_compression() {
        let build = |mtime| {
            tar_of(|b| {
                let mut d = tar::Header::new_gnu();
                d.set_entry_type(tar::EntryType::Directory);
                d.set_mode(0o755);
                d.set_size(0);
                b.append_data(&mut d, "./out/", &[][..]).unwrap();
                file(b, "./out/hello", 0o4755, b"\x7fELF...", mtime);
                let mut l = tar::Header::new_gnu();
                l.set_entry_type(tar::EntryType::Symlink);
                l.set_size(0);
                l.set_mode(0o777);
                b.append_link(&mut l, "out/latest", "hello").unwrap();
            })
        };
        let a = index(&xz(&build(1), 6)[..], &Limits::DEFAULT).unwrap();
        assert_eq!(a.compression, "xz");
        assert_eq!(
            a.entries,
            vec![
                IndexEntry {
                    path: "out/".into(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    size: 0,
                    sha256: None,
                    link: None
                },
                IndexEntry {
                    path: "out/hello".into(),
                    kind: EntryKind::File,
                    mode: 0o4755,
                    size: 7,
                    sha256: Some(sha(b"\x7fELF...")),
                    link: None
                },
                IndexEntry {
                    path: "out/latest".into(),
                    kind: EntryKind::Symlink,
                    mode: 0o777,
                    size: 0,
                    sha256: None,
                    link: Some("hello".into())
                },
            ]
        );
        // Other times, another compression: the same tree.
        let b = index(&build(999_999)[..], &Limits::DEFAULT).unwrap();
        assert_eq!(b.compression, "tar", "plain");
        assert_eq!(a.tree_sha256, b.tree_sha256);
        let c = index(&xz(&build(5), 1)[..], &Limits::DEFAULT).unwrap();
        assert_eq!(a.tree_sha256, c.tree_sha256);
        assert_eq!(a.tree_sha256, tree_digest(&a.entries), "recomputable");
    }

    #[test]
    fn a_changed_byte_mode_or_name_changes_the_tree_and_the_order_of_entries_does_not() {
        let tree = |entries: &[(&str, u32, &[u8])]| {
            let t = tar_of(|b| {
                for (path, mode, data) in entries {
                    file(b, path, *mode, data, 0);
                }
            });
            index(&t[..], &Limits::DEFAULT).unwrap().tree_sha256
        };
        let base = tree(&[("a", 0o644, b"one"), ("b", 0o755, b"two")]);
        assert_eq!(
            base,
            tree(&[("b", 0o755, b"two"), ("a", 0o644, b"one")]),
            "sorted by path"
        );
        for changed in [
            tree(&[("a", 0o644, b"onE"), ("b", 0o755, b"two")]),
            tree(&[("a", 0o600, b"one"), ("b", 0o755, b"two")]),
            tree(&[("A", 0o644, b"one"), ("b", 0o755, b"two")]),
            tree(&[("a", 0o644, b"one")]),
        ] {
            assert_ne!(base, changed);
        }
    }

    #[test]
    fn names_that_are_not_utf8_are_kept_losslessly() {
        assert_eq!(escape_path(b"plain/name"), "plain/name");
        assert_eq!(escape_path(b"back\\slash"), "back\\\\slash");
        assert_eq!(escape_path(b"bad\xffbyte"), "bad\\xffbyte");
        assert_ne!(escape_path(b"bad\xffbyte"), escape_path(b"bad\\xffbyte"));
        assert_eq!(escape_path("é".as_bytes()), "é");
    }

    #[test]
    fn a_bomb_or_garbage_is_refused_within_the_limits() {
        let big = tar_of(|b| file(b, "zeros", 0o644, &vec![0u8; 1 << 20], 0));
        let limits = Limits {
            max_stream: 64 << 10,
            ..Limits::DEFAULT
        };
        assert!(matches!(
            index(&xz(&big, 6)[..], &limits),
            Err(ArchiveError::StreamTooLarge { .. })
        ));
        assert!(index(&b"not an archive at all"[..], &Limits::DEFAULT).is_err());
    }
}
