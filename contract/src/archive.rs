//! The job archive format: a tar, compressed with xz (the seed format), gzip or zstd, or plain,
//! at the start of the job disk. Whatever follows the archive (padding, or the rest of an older,
//! longer archive the job wrote over) does not matter: one compressed stream is decoded and the
//! tar ends at its end-of-archive blocks.
//!
//! Used by the guest init to unpack a job ([`unpack`]), and by the host to read what a job wrote
//! back ([`list_each`], [`copy_file`], [`extract`]). Every reader stays within [`Limits`]: what a
//! job wrote back is the job's choice, sizes and names included. A pull runner uploads only the
//! archive, cut where it ends ([`archive_end`]).

use std::io::{self, Chain, Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

mod cut;
#[cfg(feature = "manifest")]
mod index;
mod limits;
#[cfg(test)]
mod tests;

pub use cut::{ArchiveEnd, CutError, archive_end};
#[cfg(feature = "manifest")]
pub use index::{
    EntryKind, IndexEntry, MAX_INDEX_NAME_BYTES, OutputIndex, TREE_DIGEST_TAG, escape_path, index,
    index_limits, tree_digest,
};
pub use limits::Limits;
use limits::{Budgeted, Exceeded, Meter};

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
    /// Writing a file's contents out failed.
    #[error("cannot write out the file's contents")]
    Write(#[source] io::Error),
    /// One entry's headers, GNU long name or link, PAX extensions and sparse map together exceed
    /// [`Limits::max_metadata`].
    #[error(
        "an entry's metadata (headers, GNU long name or link, PAX extensions) exceeds the {limit} bytes allowed"
    )]
    MetadataTooLarge { limit: u64 },
    /// The archive has more entries than [`Limits::max_entries`].
    #[error("the archive has more than the {limit} entries allowed")]
    TooManyEntries { limit: u64 },
    /// The decompressed tar stream is longer than [`Limits::max_stream`].
    #[error("the decompressed archive exceeds the {limit} bytes allowed")]
    StreamTooLarge { limit: u64 },
    /// Unpacking would write more than [`Limits::max_output`] bytes into files.
    #[error("unpacking {path} would write more than the {limit} bytes allowed in all")]
    OutputTooLarge { path: String, limit: u64 },
    /// An index would hold more than `limit` bytes of (escaped) paths and link targets
    /// (`archive::MAX_INDEX_NAME_BYTES`).
    #[error("the archive's paths and link targets exceed the {limit} bytes an index may hold")]
    IndexTooLarge { limit: u64 },
    /// The archive names one path twice (after normalising it): which entry wins, and what a
    /// hard link to it links to, depends on their order, so it has no tree to index.
    #[error("the archive names {path} twice")]
    DuplicatePath { path: String },
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

/// What one unpacked entry counts against `max_output` at least: a file system block.
pub const ENTRY_COST: u64 = 4096;

/// Most memory the xz decoder may use (its dictionary above all); past it, the archive is refused.
pub const XZ_MEMORY_LIMIT: u64 = 256 << 20;

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
        // And within a memory limit: an xz header may declare a dictionary of up to 4 GiB,
        // which liblzma would allocate (and touch) as told. `xz -9e` needs 64 MiB.
        Compression::Xz => {
            let decoder =
                xz2::stream::Stream::new_stream_decoder(XZ_MEMORY_LIMIT, 0).map_err(|e| {
                    ArchiveError::Corrupt {
                        compression: "xz",
                        source: io::Error::other(e),
                    }
                })?;
            Box::new(xz2::read::XzDecoder::new_stream(stream, decoder))
        }
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

type Tar<'a> = Budgeted<TarStream<'a>>;
/// One entry as the tar reader hands it out.
type Entry<'e, 'a> = tar::Entry<'e, Tar<'a>>;

/// What the entry loop shares with the code handling an entry: how to name a failed read.
struct Ctx<'m> {
    meter: &'m Meter,
    limits: Limits,
    compression: Compression,
}

impl Ctx<'_> {
    /// The error for a failed read: the limit it hit if it hit one, else a damaged archive.
    fn fail(&self, e: io::Error) -> ArchiveError {
        match self.meter.exceeded() {
            Some(Exceeded::Metadata) => ArchiveError::MetadataTooLarge {
                limit: self.limits.max_metadata,
            },
            Some(Exceeded::Stream) => ArchiveError::StreamTooLarge {
                limit: self.limits.max_stream,
            },
            None => corrupt(self.compression, e),
        }
    }
}

/// An archive being read within limits.
struct Walk<'a> {
    archive: tar::Archive<Tar<'a>>,
    meter: Rc<Meter>,
    compression: Compression,
    limits: Limits,
}

impl<'a> Walk<'a> {
    fn open<R: Read + 'a>(source: R, limits: &Limits) -> Result<Self, ArchiveError> {
        let stream = open(source)?;
        let compression = stream.compression;
        let meter = Meter::new();
        Ok(Walk {
            archive: tar::Archive::new(Budgeted::new(stream, meter.clone())),
            meter,
            compression,
            limits: *limits,
        })
    }

    /// Hands every entry to `each` until it returns `false`, with each limit enforced.
    fn each(
        &mut self,
        mut each: impl FnMut(&mut Entry<'_, 'a>, &Ctx<'_>) -> Result<bool, ArchiveError>,
    ) -> Result<(), ArchiveError> {
        let ctx = Ctx {
            meter: &self.meter,
            limits: self.limits,
            compression: self.compression,
        };
        let limits = &self.limits;
        let mut entries = self.archive.entries().map_err(|e| ctx.fail(e))?;
        let mut next_header = 0u64;
        let mut count = 0u64;
        loop {
            // Finding the next entry skips what is left of this one's data, then reads the
            // metadata in front of the next: only the metadata is held in memory, so only it
            // is limited beyond the stream budget.
            let end = next_header.saturating_add(limits.max_metadata);
            ctx.meter.stop_at(end, limits, Exceeded::Metadata);
            let Some(entry) = entries.next() else {
                return Ok(());
            };
            let mut entry = entry.map_err(|e| ctx.fail(e))?;
            ctx.meter.stop_at(u64::MAX, limits, Exceeded::Stream);
            count += 1;
            if count > limits.max_entries {
                return Err(ArchiveError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            // The tar reader has read exactly up to this entry's data.
            let stored = stored_size(&mut entry).map_err(|e| ctx.fail(e))?;
            next_header = ctx
                .meter
                .pos()
                .saturating_add(stored.checked_next_multiple_of(512).unwrap_or(u64::MAX));
            if !each(&mut entry, &ctx)? {
                return Ok(());
            }
        }
    }
}

/// How many bytes of data follow this entry's header in the archive, as tar 0.4 steps over them
/// to the next header: the entry's size, but for a GNU sparse file (whose size is the unpacked
/// one) the header's. There a PAX `size` record would win; rather than mirror that rule, such
/// an entry is refused (no tool writes one: GNU tar's PAX sparse files are type `0`).
fn stored_size(entry: &mut Entry<'_, '_>) -> io::Result<u64> {
    if !entry.header().entry_type().is_gnu_sparse() {
        return Ok(entry.size());
    }
    // A sparse entry's PAX extensions are already in memory: this reads nothing.
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            if ext?.key() == Ok("size") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a GNU sparse entry whose size a PAX record overrides",
                ));
            }
        }
    }
    entry.header().entry_size()
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

/// What listing saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListSummary {
    pub compression: Compression,
    pub entries: u64,
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

fn entry_path(entry: &Entry<'_, '_>) -> String {
    normalize(&String::from_utf8_lossy(&entry.path_bytes())).to_string()
}

#[cfg(feature = "manifest")]
fn entry_path_bytes(entry: &Entry<'_, '_>) -> Vec<u8> {
    entry.path_bytes().into_owned()
}

/// How unpacked files get their modes.
#[derive(Debug, Clone, Copy)]
enum Modes {
    /// As in the archive, set-user-ID and all: the guest unpacking its own job.
    Keep,
    /// `mode & 0o777 & !mask`: the host unpacking what a job wrote.
    Mask(u32),
}

/// Unpacks the archive at the start of `source` into `dest`, keeping modes (set-user-ID bits
/// included) and mtimes: the guest's unpack of its job, within [`Limits::DEFAULT`].
/// Paths cannot leave `dest` (`..` components are refused by the tar reader).
pub fn unpack(source: impl Read, dest: &Path) -> Result<UnpackSummary, ArchiveError> {
    unpack_with(source, dest, &Limits::DEFAULT, Modes::Keep)
}

/// Unpacks what a job wrote back into `dest` on the host: within `limits`, with modes masked to
/// `0o777 & !umask` (no set-user-ID, set-group-ID or sticky bits, nothing more open than the
/// user's umask allows) and owned by whoever runs this.
pub fn extract(
    source: impl Read,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackSummary, ArchiveError> {
    unpack_with(source, dest, limits, Modes::Mask(umask()))
}

/// The process's umask, from /proc: umask(2) can only read it by changing it, which races with
/// any other thread creating files. Without /proc, the strictest usual mask.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let value = line.strip_prefix("Umask:")?;
                u32::from_str_radix(value.trim(), 8).ok()
            })
        })
        .unwrap_or(0o077)
}

/// Whether unpacking this kind of entry writes its data into a file (the tar crate writes any
/// type it does not know as a regular file).
fn writes_data(kind: tar::EntryType) -> bool {
    !(kind.is_dir()
        || kind.is_symlink()
        || kind.is_hard_link()
        || kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink())
}

fn unpack_with(
    source: impl Read,
    dest: &Path,
    limits: &Limits,
    modes: Modes,
) -> Result<UnpackSummary, ArchiveError> {
    let mut walk = Walk::open(source, limits)?;
    let archive = &mut walk.archive;
    match modes {
        Modes::Keep => archive.set_preserve_permissions(true),
        Modes::Mask(mask) => {
            // Without preserve, tar 0.4 chmods to `mode & 0o777 & !mask`; a file is created
            // 0o666 & !umask before that, so it is never more open than the final mode.
            archive.set_preserve_permissions(false);
            archive.set_mask(mask);
        }
    }
    archive.set_preserve_ownerships(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut summary = UnpackSummary {
        compression: Some(walk.compression.as_str()),
        ..Default::default()
    };
    let mut committed = 0u64;
    walk.each(|entry, ctx| {
        let path = entry_path(entry);
        summary.entries += 1;
        summary.bytes += entry.size();
        {
            // Checked before writing, so what is on disk never passes the limit. Every entry
            // costs at least a block and an inode, whatever its size: a million empty files or
            // directories are not free.
            let data = if writes_data(entry.header().entry_type()) {
                entry.size()
            } else {
                0
            };
            committed = committed.saturating_add(data.max(ENTRY_COST));
            if committed > ctx.limits.max_output {
                return Err(ArchiveError::OutputTooLarge {
                    path,
                    limit: ctx.limits.max_output,
                });
            }
        }
        entry.unpack_in(dest).map_err(|e| {
            // The tar crate reports a damaged stream and a failed write alike; a failed read of
            // the data is the archive's fault.
            if ctx.meter.exceeded().is_some()
                || e.kind() == io::ErrorKind::InvalidData
                || e.kind() == io::ErrorKind::UnexpectedEof
            {
                ctx.fail(e)
            } else {
                ArchiveError::Unpack {
                    path: dest.join(&path),
                    source: e,
                }
            }
        })?;
        Ok(true)
    })?;
    Ok(summary)
}

/// Lists the archive at the start of `source`, within [`Limits::DEFAULT`]. The list is held in
/// memory: for what a job wrote, prefer [`list_each`].
pub fn list(source: impl Read) -> Result<(Compression, Vec<EntryInfo>), ArchiveError> {
    let mut out = Vec::new();
    let summary = list_each(source, &Limits::DEFAULT, |e| out.push(e))?;
    Ok((summary.compression, out))
}

/// Hands each entry of the archive at the start of `source` to `each`, within `limits`.
pub fn list_each(
    source: impl Read,
    limits: &Limits,
    mut each: impl FnMut(EntryInfo),
) -> Result<ListSummary, ArchiveError> {
    let mut walk = Walk::open(source, limits)?;
    let mut entries = 0;
    walk.each(|entry, _| {
        entries += 1;
        let header = entry.header();
        each(EntryInfo {
            path: entry_path(entry),
            size: entry.size(),
            mode: header.mode().unwrap_or(0),
            kind: header.entry_type().as_byte() as char,
        });
        Ok(true)
    })?;
    Ok(ListSummary {
        compression: walk.compression,
        entries,
    })
}

/// Reads one regular file out of the archive at the start of `source`, at most `limit` bytes,
/// within [`Limits::DEFAULT`]. Returns `None` when the archive has no such file.
pub fn read_file(
    source: impl Read,
    path: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>, ArchiveError> {
    let mut data = Vec::new();
    Ok(copy_file(source, path, limit, &Limits::DEFAULT, &mut data)?.map(|_| data))
}

/// Copies one regular file out of the archive at the start of `source` to `out`, within `limits`.
/// A file larger than `max_size` is refused before any of it is written. Returns the bytes
/// copied, or `None` when the archive has no such file.
pub fn copy_file(
    source: impl Read,
    path: &str,
    max_size: u64,
    limits: &Limits,
    out: &mut impl Write,
) -> Result<Option<u64>, ArchiveError> {
    let want = normalize(path);
    let mut walk = Walk::open(source, limits)?;
    let mut copied = None;
    walk.each(|entry, ctx| {
        if !entry.header().entry_type().is_file() || entry_path(entry) != want {
            return Ok(true);
        }
        if entry.size() > max_size {
            return Err(ArchiveError::TooLarge {
                path: want.to_string(),
                limit: max_size,
            });
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ctx.fail(e)),
            };
            out.write_all(&buf[..n]).map_err(ArchiveError::Write)?;
            total += n as u64;
        }
        copied = Some(total);
        Ok(false)
    })?;
    Ok(copied)
}
