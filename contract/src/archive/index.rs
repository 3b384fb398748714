//! An output's index: every entry of the archive a job wrote, with its kind, mode, size and, for
//! an entry that carries data, the SHA-256 of it; and one digest of the whole tree. A server
//! computes it once, when the output arrives, so that listing an output, serving one file of it
//! and comparing two runners' outputs need no decompression later.
//!
//! # Paths
//!
//! An entry's path is normalised as the extractor resolves it: split at `/`, empty and `.`
//! components dropped, joined with `/` (so `./out/`, `/out` and `out` are one path, and so are
//! `a//b` and `a/./b` and `a/b`), then written with [`escape_path`]. A hard link's target is
//! normalised the same way; a symbolic link's target is kept as written (`/etc/x` and `etc/x`
//! are different links), escaped. An archive that names one path twice has no tree (which entry
//! wins, and what a hard link to it links to, depends on their order): [`index`] refuses it with
//! [`ArchiveError::DuplicatePath`]. A non-directory in an old or GNU header whose name ends in `/`
//! is a directory, as the extractor unpacks it.
//!
//! # The tree digest, version 1
//!
//! The **tree digest** is what replicas of a job must agree on: paths, kinds, permission bits,
//! sizes, contents, link targets, the raw type of an `other` entry and a device's numbers, never
//! times, owners or the compression (an output recompressed with another level has the same
//! tree). It is a contract other implementations follow, exactly:
//!
//! ```text
//! SHA-256( "construir-tree-v1\n" ENTRY* )        lowercase hex
//! ENTRY  = F(kind) F(path) F(mode) F(size) O(sha256) O(link) O(typeflag) O(device) "\n"
//! F(x)   = decimal byte length of x, ":", the bytes of x
//! O(x)   = "-" when absent, else F(x)
//! ```
//!
//! The entries come sorted by their (escaped) path's bytes; [`index`] guarantees no path twice
//! ([`tree_digest`] of a list that has one keeps their order: its sort is stable). `kind` is one
//! of `file dir symlink hardlink other`; `path` and `link` as above; `mode` the permission bits
//! (`0o7777` of the header's) in octal without a prefix (`644`); `size` the bytes of data the
//! entry carries, in decimal; `sha256` their SHA-256 in lowercase hex (always present for `file`
//! and `other`, for any other kind only when it carries data); `typeflag` the raw type byte of an
//! `other` entry as two lowercase hex digits (`33` for a character device); `device` a character
//! or block device's `MAJOR:MINOR` in decimal, when the header has them. Every field is
//! length-prefixed, so no name can forge a field or an entry boundary.

use super::{ArchiveError, Limits, Walk, entry_path_bytes};
use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// Most bytes of (escaped) paths and link targets one index may hold: a long name can be 64 KiB
/// of metadata and 4 times that escaped, times a million entries.
pub const MAX_INDEX_NAME_BYTES: u64 = 32 << 20;

/// The tag the tree digest's input starts with: the version of its format.
pub const TREE_DIGEST_TAG: &str = "construir-tree-v1\n";

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
    /// The path inside the archive, normalised (see the module's documentation) and as
    /// [`escape_path`] writes it (lossless: a name that is not UTF-8 keeps its bytes).
    pub path: String,
    pub kind: EntryKind,
    /// The permission bits (`0o7777` of the header's mode).
    pub mode: u32,
    /// The bytes of data the entry carries (a file's size; 0 for most others).
    pub size: u64,
    /// The SHA-256 of the entry's data, in hex: always for a file or an `other` entry (the
    /// extractor writes those as files), for any other kind when it carries data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A link's target ([`escape_path`] too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// An `other` entry's raw type byte (`b'3'` a character device, `b'6'` a FIFO, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typeflag: Option<u8>,
    /// A character or block device's `(major, minor)`, when its header has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<(u32, u32)>,
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

/// What indexing an output whose job allows `output_size` bytes may cost: its decompressed tar
/// at most 32 times that (between 64 MiB and 8 GiB: build outputs compress a few times, a bomb
/// by thousands), at most 200,000 entries. The server indexes with these, and a runner computes
/// the tree digest it signs with the same, so both read the same archives.
pub fn index_limits(output_size: u64) -> Limits {
    Limits {
        max_stream: output_size.saturating_mul(32).clamp(64 << 20, 8 << 30),
        max_entries: 200_000,
        ..Limits::DEFAULT
    }
}

/// Indexes the archive at the start of `source`, within `limits` and
/// [`MAX_INDEX_NAME_BYTES`], hashing every entry's data.
pub fn index(source: impl Read, limits: &Limits) -> Result<OutputIndex, ArchiveError> {
    index_within(source, limits, MAX_INDEX_NAME_BYTES)
}

/// [`index`], holding at most `name_budget` bytes of escaped paths and link targets.
fn index_within(
    source: impl Read,
    limits: &Limits,
    name_budget: u64,
) -> Result<OutputIndex, ArchiveError> {
    let mut walk = Walk::open(source, limits)?;
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut names = 0u64;
    walk.each(|entry, ctx| {
        let header = entry.header();
        let raw_kind = header.entry_type();
        let raw_path = entry_path_bytes(entry);
        let path = escape_path(&normalize_components(&raw_path));
        let bad = |e: io::Error, what: &str| {
            ctx.fail(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{what} of {path}: {e}"),
            ))
        };
        let mut kind = EntryKind::of(raw_kind);
        // As the tar crate unpacks it: in an old or GNU header, a name ending in `/` that is no
        // directory, link or extension header is a directory.
        if matches!(kind, EntryKind::File | EntryKind::Other)
            && !raw_kind.is_pax_global_extensions()
            && header.as_ustar().is_none()
            && raw_path.ends_with(b"/")
        {
            kind = EntryKind::Dir;
        }
        let mode = header.mode().map_err(|e| bad(e, "the mode"))? & 0o7777;
        let typeflag = (kind == EntryKind::Other).then(|| raw_kind.as_byte());
        let device = if kind == EntryKind::Other
            && (raw_kind.is_character_special() || raw_kind.is_block_special())
        {
            let major = header
                .device_major()
                .map_err(|e| bad(e, "the device major"))?;
            let minor = header
                .device_minor()
                .map_err(|e| bad(e, "the device minor"))?;
            major.zip(minor)
        } else {
            None
        };
        let link = match kind {
            EntryKind::Symlink => entry.link_name_bytes().map(|target| escape_path(&target)),
            EntryKind::Hardlink => entry
                .link_name_bytes()
                .map(|target| escape_path(&normalize_components(&target))),
            _ => None,
        };
        names = names
            .saturating_add(path.len() as u64)
            .saturating_add(link.as_ref().map_or(0, |l| l.len() as u64));
        if names > name_budget {
            return Err(ArchiveError::IndexTooLarge { limit: name_budget });
        }
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
        let sha256 = (matches!(kind, EntryKind::File | EntryKind::Other) || size > 0)
            .then(|| hex(&hasher.finalize()));
        entries.push(IndexEntry {
            path,
            kind,
            mode,
            size,
            sha256,
            link,
            typeflag,
            device,
        });
        Ok(true)
    })?;
    let sorted = sorted(&entries);
    // Extension headers the extractor skips may share a name (a pax global header's is often
    // fixed); anything else named twice has no tree.
    let unpacked = sorted
        .iter()
        .filter(|e| e.typeflag != Some(b'g'))
        .collect::<Vec<_>>();
    if let Some(pair) = unpacked.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(ArchiveError::DuplicatePath {
            path: pair[0].path.clone(),
        });
    }
    let tree_sha256 = digest_sorted(&sorted);
    Ok(OutputIndex {
        compression: walk.compression.as_str().to_string(),
        entries,
        tree_sha256,
    })
}

/// A path as the extractor resolves it: empty and `.` components dropped (`..` is kept: the
/// extractor skips such an entry, and it still counts in the tree).
fn normalize_components(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for part in path.split(|&b| b == b'/') {
        if part.is_empty() || part == b"." {
            continue;
        }
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(part);
    }
    out
}

fn sorted(entries: &[IndexEntry]) -> Vec<&IndexEntry> {
    let mut sorted: Vec<&IndexEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    sorted
}

/// The tree digest of `entries` (see the module's documentation for its exact format).
pub fn tree_digest(entries: &[IndexEntry]) -> String {
    digest_sorted(&sorted(entries))
}

fn digest_sorted(sorted: &[&IndexEntry]) -> String {
    fn field(hasher: &mut Sha256, bytes: &[u8]) {
        hasher.update(bytes.len().to_string().as_bytes());
        hasher.update(b":");
        hasher.update(bytes);
    }
    fn optional(hasher: &mut Sha256, bytes: Option<&[u8]>) {
        match bytes {
            Some(bytes) => field(hasher, bytes),
            None => hasher.update(b"-"),
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(TREE_DIGEST_TAG.as_bytes());
    for e in sorted {
        field(&mut hasher, e.kind.as_str().as_bytes());
        field(&mut hasher, e.path.as_bytes());
        field(&mut hasher, format!("{:o}", e.mode).as_bytes());
        field(&mut hasher, e.size.to_string().as_bytes());
        optional(&mut hasher, e.sha256.as_deref().map(str::as_bytes));
        optional(&mut hasher, e.link.as_deref().map(str::as_bytes));
        let typeflag = e.typeflag.map(|t| format!("{t:02x}"));
        optional(&mut hasher, typeflag.as_deref().map(str::as_bytes));
        let device = e.device.map(|(major, minor)| format!("{major}:{minor}"));
        optional(&mut hasher, device.as_deref().map(str::as_bytes));
        hasher.update(b"\n");
    }
    hex(&hasher.finalize())
}

/// A name's bytes as printable text, losslessly: UTF-8 as it is, but a backslash as `\\`, and
/// every control character (below 0x20, and 0x7f) and every byte that is not part of valid
/// UTF-8 as `\xNN` (lowercase hex).
pub fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if c < ' ' || c == '\x7f' {
                out.push_str(&format!("\\x{:02x}", c as u32));
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
                    path: "out".into(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    size: 0,
                    sha256: None,
                    link: None,
                    typeflag: None,
                    device: None,
                },
                IndexEntry {
                    path: "out/hello".into(),
                    kind: EntryKind::File,
                    mode: 0o4755,
                    size: 7,
                    sha256: Some(sha(b"\x7fELF...")),
                    link: None,
                    typeflag: None,
                    device: None,
                },
                IndexEntry {
                    path: "out/latest".into(),
                    kind: EntryKind::Symlink,
                    mode: 0o777,
                    size: 0,
                    sha256: None,
                    link: Some("hello".into()),
                    typeflag: None,
                    device: None,
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
        assert_eq!(
            escape_path(b"nul\0lf\ntab\tdel\x7f"),
            "nul\\x00lf\\x0atab\\x09del\\x7f"
        );
        assert_ne!(escape_path(b"a\0"), escape_path(b"a\\x00"));
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

    /// Appends an entry named `name` (any bytes) through a GNU long name.
    fn raw_named(
        b: &mut tar::Builder<Vec<u8>>,
        name: &[u8],
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
    ) {
        let mut l = tar::Header::new_gnu();
        l.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        l.set_mode(0o644);
        l.set_entry_type(tar::EntryType::GNULongName);
        let mut n = name.to_vec();
        n.push(0);
        l.set_size(n.len() as u64);
        l.set_cksum();
        b.append(&l, &n[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_path("placeholder").unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(kind);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn typed(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: u8, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        b.append_data(&mut h, path, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(kind);
        l.set_size(0);
        l.set_mode(0o777);
        b.append_link(&mut l, path, target).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut d = tar::Header::new_gnu();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_mode(0o755);
        d.set_size(0);
        b.append_data(&mut d, path, &[][..]).unwrap();
    }

    fn tree(t: &[u8]) -> String {
        index(t, &Limits::DEFAULT).unwrap().tree_sha256
    }

    #[test]
    fn the_digest_follows_its_documented_format() {
        let t = tar_of(|b| file(b, "a", 0o644, b"one", 0));
        let spec = format!(
            "construir-tree-v1\n4:file1:a3:6441:364:{}---\n",
            sha(b"one")
        );
        assert_eq!(tree(&t), sha(spec.as_bytes()));
    }

    #[test]
    fn no_name_forges_a_separator_or_another_entry() {
        let honest = tar_of(|b| {
            file(b, "a", 0o644, b"one", 0);
            file(b, "b", 0o755, b"two", 0);
        });
        let mut name = b"a\x00644\x003\x00".to_vec();
        name.extend_from_slice(sha(b"one").as_bytes());
        name.extend_from_slice(b"\nfile\x00b");
        let forged = tar_of(|b| raw_named(b, &name, tar::EntryType::Regular, 0o755, b"two"));
        let listed = index(&forged[..], &Limits::DEFAULT).unwrap();
        assert!(
            !listed.entries[0].path.contains(['\0', '\n']),
            "{:?}",
            listed.entries[0].path
        );
        assert_ne!(tree(&honest), listed.tree_sha256);
        // And by construction, whatever the strings hold.
        let entry = |path: &str, mode, data: &[u8]| IndexEntry {
            path: path.into(),
            kind: EntryKind::File,
            mode,
            size: data.len() as u64,
            sha256: Some(sha(data)),
            link: None,
            typeflag: None,
            device: None,
        };
        let raw = String::from_utf8(name).unwrap();
        assert_ne!(
            tree_digest(&[entry("a", 0o644, b"one"), entry("b", 0o755, b"two")]),
            tree_digest(&[entry(&raw, 0o755, b"two")])
        );
    }

    #[test]
    fn other_entries_keep_their_data_type_and_device_in_the_tree() {
        for kind in [b'Z', b'3', b'6'] {
            let good = tar_of(|b| typed(b, "x", kind, b"good"));
            let evil = tar_of(|b| typed(b, "x", kind, b"EVIL"));
            let listed = index(&good[..], &Limits::DEFAULT).unwrap();
            let e = &listed.entries[0];
            assert_eq!(
                (e.kind, e.typeflag, e.size, e.sha256.clone()),
                (EntryKind::Other, Some(kind), 4, Some(sha(b"good")))
            );
            assert_eq!(e.device, (kind == b'3').then_some((1, 3)));
            assert_ne!(listed.tree_sha256, tree(&evil), "{}", kind as char);
        }
        assert_ne!(
            tree(&tar_of(|b| typed(b, "x", b'3', b""))),
            tree(&tar_of(|b| typed(b, "x", b'6', b""))),
            "the type counts"
        );
        let other_device = tar_of(|b| {
            let mut h = tar::Header::new_ustar();
            h.set_size(0);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Char);
            h.set_device_major(1).unwrap();
            h.set_device_minor(5).unwrap();
            b.append_data(&mut h, "x", &[][..]).unwrap();
        });
        assert_ne!(
            tree(&tar_of(|b| typed(b, "x", b'3', b""))),
            tree(&other_device)
        );
        // A directory or link that carries data has it hashed too.
        let with_data = |data: &'static [u8]| {
            tar_of(move |b| {
                let mut d = tar::Header::new_ustar();
                d.set_entry_type(tar::EntryType::Directory);
                d.set_mode(0o755);
                d.set_size(data.len() as u64);
                b.append_data(&mut d, "d", data).unwrap();
            })
        };
        assert_ne!(tree(&with_data(b"good")), tree(&with_data(b"EVIL")));
    }

    #[test]
    fn a_path_named_twice_has_no_tree() {
        let refused = |t: Vec<u8>, path: &str| match index(&t[..], &Limits::DEFAULT) {
            Err(ArchiveError::DuplicatePath { path: p }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        };
        refused(
            tar_of(|b| {
                file(b, "a", 0o644, b"X", 0);
                file(b, "a", 0o644, b"Y", 0);
            }),
            "a",
        );
        // Which `a` the hard link links to depends on the order.
        refused(
            tar_of(|b| {
                file(b, "a", 0o644, b"X", 0);
                link(b, tar::EntryType::Link, "b", "a");
                file(b, "./a", 0o644, b"Y", 0);
            }),
            "a",
        );
        refused(
            tar_of(|b| {
                dir(b, "out/");
                file(b, "./out", 0o644, b"X", 0);
            }),
            "out",
        );
        refused(
            tar_of(|b| {
                file(b, "a/b", 0o644, b"X", 0);
                raw_named(b, b"a//./b", tar::EntryType::Regular, 0o644, b"Y");
            }),
            "a/b",
        );
    }

    #[test]
    fn a_path_is_the_same_however_its_slashes_and_dots_are_written() {
        assert_eq!(
            tree(&tar_of(|b| dir(b, "out/"))),
            tree(&tar_of(|b| dir(b, "out")))
        );
        assert_eq!(
            tree(&tar_of(|b| file(b, "x/y", 0o644, b"1", 0))),
            tree(&tar_of(|b| raw_named(
                b,
                b"/./x//y",
                tar::EntryType::Regular,
                0o644,
                b"1"
            )))
        );
        // An old-style directory: a GNU file header whose name ends in `/`, as the tar crate
        // unpacks it.
        let old = tar_of(|b| raw_named(b, b"d/", tar::EntryType::Regular, 0o755, b""));
        let listed = index(&old[..], &Limits::DEFAULT).unwrap();
        assert_eq!(
            (listed.entries[0].path.as_str(), listed.entries[0].kind),
            ("d", EntryKind::Dir)
        );
        assert_eq!(listed.tree_sha256, tree(&tar_of(|b| dir(b, "d"))));
    }

    #[test]
    fn a_symlinks_target_is_kept_as_written_and_a_hard_links_resolved() {
        let sym = |target: &str| tree(&tar_of(|b| link(b, tar::EntryType::Symlink, "l", target)));
        assert_ne!(sym("/etc/passwd"), sym("etc/passwd"));
        assert_ne!(sym("./x"), sym("x"));
        let hard = |target: &str| {
            tree(&tar_of(|b| {
                file(b, "x", 0o644, b"1", 0);
                link(b, tar::EntryType::Link, "l", target);
            }))
        };
        assert_eq!(hard("./x"), hard("x"));
    }

    #[test]
    fn the_names_an_index_holds_are_bounded() {
        let t = tar_of(|b| {
            file(b, "abcdef", 0o644, b"", 0);
            link(b, tar::EntryType::Symlink, "ghi", "jkl");
        });
        assert!(index_within(&t[..], &Limits::DEFAULT, 12).is_ok());
        assert!(matches!(
            index_within(&t[..], &Limits::DEFAULT, 11),
            Err(ArchiveError::IndexTooLarge { limit: 11 })
        ));
        // Escaped names count at their escaped length.
        let t = tar_of(|b| raw_named(b, &[0xff; 4], tar::EntryType::Regular, 0o644, b""));
        assert!(index_within(&t[..], &Limits::DEFAULT, 16).is_ok());
        assert!(matches!(
            index_within(&t[..], &Limits::DEFAULT, 15),
            Err(ArchiveError::IndexTooLarge { limit: 15 })
        ));
        assert_eq!(MAX_INDEX_NAME_BYTES, 32 << 20);
    }

    #[test]
    fn an_unparsable_mode_is_a_damaged_archive() {
        let t = tar_of(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_entry_type(tar::EntryType::Regular);
            h.as_old_mut().mode = *b"zzzzzzz\0";
            b.append_data(&mut h, "a", &b"1"[..]).unwrap();
        });
        assert!(matches!(
            index(&t[..], &Limits::DEFAULT),
            Err(ArchiveError::Corrupt { .. })
        ));
    }
}
