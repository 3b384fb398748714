//! Where the archive a job wrote back ends: a job's disk is its padded job file, and only the
//! archive at its start is its output. A pull runner uploads that archive and nothing after it
//! (padding, or the rest of an older, longer archive the job wrote over), so what it sends is
//! what the guest's unpack and the host's readers would read, and no more.
//!
//! Compressed streams (xz, gzip, zstd) are decoded to their end through decoders that take from
//! a buffered reader only what they use; the stream's length is what was read from the source
//! minus what is still buffered. A plain tar ends after its end-of-archive blocks. Decoding is
//! bounded like every other read of a job's archive: by [`Limits::max_stream`] for the decoded
//! bytes, and by the caller's `max_len` for the compressed ones, so a bomb or an endless stream
//! costs at most that much work.

use super::{ArchiveError, Compression, Limits, Walk, XZ_MEMORY_LIMIT, corrupt, detect};
use std::io::{self, BufRead, BufReader, Cursor, Read};

/// Where an archive ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveEnd {
    pub compression: Compression,
    /// The archive's length in bytes from the start of the source: the compressed stream's
    /// length, or a plain tar's up to and including its end-of-archive blocks.
    pub len: u64,
}

/// Why the end of an archive was not found.
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    /// There is no readable archive at the start (not an archive, damaged, over a limit).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The archive goes on past `max_len` bytes (or is damaged past that point).
    #[error("the archive is longer than the {limit} bytes allowed")]
    TooLong { limit: u64 },
}

/// Counts what is read through it.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Block size of a tar archive.
const BLOCK: usize = 512;

/// Finds where the archive at the start of `source` ends, reading at most `max_len + 1` bytes of
/// it and decoding within `limits`. The source is left wherever reading stopped.
pub fn archive_end(
    source: impl Read,
    limits: &Limits,
    max_len: u64,
) -> Result<ArchiveEnd, CutError> {
    let mut counted = Counted {
        inner: source.take(max_len.saturating_add(1)),
        n: 0,
    };
    let result = end_of(&mut counted, limits);
    // Reading stopped at the cap: whatever the decoder then said, the archive did not end
    // within max_len (a damaged stream that goes on that long is just as unusable).
    let hit_cap = counted.n > max_len;
    match result {
        Ok(end) if end.len <= max_len => Ok(end),
        Ok(_) => Err(CutError::TooLong { limit: max_len }),
        Err(_) if hit_cap => Err(CutError::TooLong { limit: max_len }),
        Err(e) => Err(e.into()),
    }
}

fn end_of<R: Read>(source: &mut R, limits: &Limits) -> Result<ArchiveEnd, ArchiveError> {
    let mut head = Vec::with_capacity(BLOCK);
    (&mut *source)
        .take(BLOCK as u64)
        .read_to_end(&mut head)
        .map_err(ArchiveError::Read)?;
    let compression = detect(&head).ok_or(ArchiveError::NotAnArchive)?;
    if compression == Compression::None {
        return tar_end(Cursor::new(head).chain(source), limits)
            .map(|len| ArchiveEnd { compression, len });
    }
    let mut input = BufReader::with_capacity(
        64 << 10,
        Cursor::new(head).chain(Counted {
            inner: source,
            n: 0,
        }),
    );
    let decoded = match compression {
        // One stream, as the guest's unpack reads it (no concatenated streams), within the
        // same memory limit.
        Compression::Xz => {
            let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMORY_LIMIT, 0)
                .map_err(|e| corrupt(compression, io::Error::other(e)))?;
            xz_drain(stream, &mut input, limits)
        }
        // One member, as the guest's unpack reads it.
        Compression::Gzip => drain(flate2::bufread::GzDecoder::new(&mut input), limits),
        // ruzstd reads exactly what each frame part needs (header, blocks, checksum), through
        // the buffer like the others.
        Compression::Zstd => {
            let decoder = ruzstd::decoding::StreamingDecoder::new(&mut input).map_err(|e| {
                corrupt(
                    compression,
                    io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
                )
            })?;
            drain(decoder, limits)
        }
        Compression::None => unreachable!("handled above"),
    };
    match decoded {
        Ok(()) => {}
        Err(Drained::TooLarge) => {
            return Err(ArchiveError::StreamTooLarge {
                limit: limits.max_stream,
            });
        }
        Err(Drained::Failed(e)) => return Err(corrupt(compression, e)),
    }
    let buffered = input.buffer().len() as u64;
    let (head, rest) = input.get_ref().get_ref();
    Ok(ArchiveEnd {
        compression,
        len: head.position() + rest.n - buffered,
    })
}

enum Drained {
    TooLarge,
    Failed(io::Error),
}

/// Reads a decoder to its end, within the stream budget.
fn drain(mut decoder: impl Read, limits: &Limits) -> Result<(), Drained> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match decoder.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                total += n as u64;
                if total > limits.max_stream {
                    return Err(Drained::TooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Drained::Failed(e)),
        }
    }
}

/// Decodes one xz stream to its end. By hand rather than through `xz2::bufread::XzDecoder`,
/// which takes input left after the stream's end for damage: here it is the padding.
fn xz_drain(
    mut stream: xz2::stream::Stream,
    input: &mut impl BufRead,
    limits: &Limits,
) -> Result<(), Drained> {
    use xz2::stream::{Action, Status};
    let mut out = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let data = input.fill_buf().map_err(Drained::Failed)?;
        let eof = data.is_empty();
        let (before_in, before_out) = (stream.total_in(), stream.total_out());
        let status = stream.process(
            data,
            &mut out,
            if eof { Action::Finish } else { Action::Run },
        );
        let consumed = (stream.total_in() - before_in) as usize;
        let produced = stream.total_out() - before_out;
        input.consume(consumed);
        total += produced;
        if total > limits.max_stream {
            return Err(Drained::TooLarge);
        }
        match status {
            Ok(Status::StreamEnd) => return Ok(()),
            Ok(_) if eof && consumed == 0 && produced == 0 => {
                return Err(Drained::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the xz stream is truncated",
                )));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Drained::Failed(io::Error::new(
                    io::ErrorKind::InvalidData,
                    e,
                )));
            }
        }
    }
}

/// A plain tar's length: its entries walked within `limits` (the same reader the guest and the
/// host use, so the same archive ends at the same place), then its end-of-archive blocks. The
/// tar reader stops after the first zero block; the second is counted when it is there.
fn tar_end<R: Read>(source: R, limits: &Limits) -> Result<u64, ArchiveError> {
    let mut walk = Walk::open(source, limits)?;
    walk.each(|_, _| Ok(true))?;
    let after_first = walk.meter.pos();
    let mut rest = walk.archive.into_inner();
    let mut next = Vec::with_capacity(BLOCK);
    // The meter allows reading on past the last header: a block is far below max_metadata.
    let second = (&mut rest)
        .take(BLOCK as u64)
        .read_to_end(&mut next)
        .is_ok_and(|n| n == BLOCK && next.iter().all(|b| *b == 0));
    Ok(after_first + if second { BLOCK as u64 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
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

    const ALL: [Compression; 4] = [
        Compression::Xz,
        Compression::Gzip,
        Compression::Zstd,
        Compression::None,
    ];

    /// Incompressible enough that the streams are longer than one read of the buffer.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn the_cut_is_the_archive_whatever_follows_it() {
        let big = noise(300 << 10);
        let tar = tar_of(&[("out/hello", b"hello\n"), ("out/big.bin", &big)]);
        let stale = tar_of(&[("stale", &noise(100 << 10))]);
        for how in ALL {
            let archive = compress(&tar, how);
            // Nothing after it, padding after it, and an older, longer archive's rest after it.
            let tails: [Vec<u8>; 3] = [
                Vec::new(),
                vec![0u8; 1 << 20],
                [compress(&stale, how), vec![0xa5; 5000]].concat(),
            ];
            for tail in tails {
                let disk = [archive.clone(), tail].concat();
                let end = archive_end(&disk[..], &Limits::DEFAULT, u64::MAX).unwrap();
                assert_eq!(end.compression, how);
                assert_eq!(end.len, archive.len() as u64, "{how:?}");
                // What is cut reads as the whole archive.
                let cut = &disk[..end.len as usize];
                let (_, entries) = super::super::list(cut).unwrap();
                assert_eq!(entries.len(), 2, "{how:?}");
            }
        }
    }

    #[test]
    fn a_plain_tar_ends_after_its_end_of_archive_blocks() {
        let tar = tar_of(&[("a", b"1")]);
        // tar::Builder writes two zero blocks; GNU tar pads to its record size with more.
        let blocks = tar.len() - 2 * BLOCK;
        let padded = [tar.clone(), vec![0u8; 10240]].concat();
        assert_eq!(
            archive_end(&padded[..], &Limits::DEFAULT, u64::MAX)
                .unwrap()
                .len,
            tar.len() as u64
        );
        // One zero block, then stale data: the archive ends after that block.
        let mut one = tar[..blocks + BLOCK].to_vec();
        one.extend(vec![0x5a; 3000]);
        assert_eq!(
            archive_end(&one[..], &Limits::DEFAULT, u64::MAX)
                .unwrap()
                .len,
            (blocks + BLOCK) as u64
        );
    }

    #[test]
    fn an_archive_longer_than_allowed_is_refused_without_reading_on() {
        let tar = tar_of(&[("big", &noise(200 << 10))]);
        for how in ALL {
            let archive = compress(&tar, how);
            let len = archive.len() as u64;
            let exact = archive_end(&archive[..], &Limits::DEFAULT, len).unwrap();
            assert_eq!(exact.len, len, "{how:?}: exactly the limit is taken");
            let padded = [archive.clone(), vec![0u8; 1 << 20]].concat();
            let mut reader = &padded[..];
            let e = archive_end(&mut reader, &Limits::DEFAULT, len - 1).unwrap_err();
            assert!(matches!(e, CutError::TooLong { .. }), "{how:?}: {e}");
            assert!(
                padded.len() - reader.len() <= len as usize,
                "{how:?}: read no further than the limit"
            );
        }
    }

    #[test]
    fn a_bomb_stops_at_the_stream_budget() {
        // 64 MiB of zeros inside a tar, compressed to almost nothing.
        let tar = tar_of(&[("zeros", &vec![0u8; 64 << 20])]);
        let limits = Limits {
            max_stream: 1 << 20,
            ..Limits::DEFAULT
        };
        for how in [Compression::Xz, Compression::Gzip, Compression::Zstd] {
            let bomb = compress(&tar, how);
            assert!(bomb.len() < 4 << 20, "{how:?}: {} bytes", bomb.len());
            let e = archive_end(&bomb[..], &limits, u64::MAX).unwrap_err();
            assert!(
                matches!(e, CutError::Archive(ArchiveError::StreamTooLarge { .. })),
                "{how:?}: {e}"
            );
        }
    }

    #[test]
    fn no_archive_and_damaged_ones_are_errors() {
        let e = archive_end(&[0u8; 4096][..], &Limits::DEFAULT, u64::MAX).unwrap_err();
        assert!(matches!(e, CutError::Archive(ArchiveError::NotAnArchive)));
        let e = archive_end(&[][..], &Limits::DEFAULT, u64::MAX).unwrap_err();
        assert!(matches!(e, CutError::Archive(ArchiveError::NotAnArchive)));
        let tar = tar_of(&[("a", &noise(100 << 10))]);
        for how in [Compression::Xz, Compression::Gzip, Compression::Zstd] {
            let archive = compress(&tar, how);
            let truncated = &archive[..archive.len() / 2];
            let e = archive_end(truncated, &Limits::DEFAULT, u64::MAX).unwrap_err();
            assert!(
                matches!(e, CutError::Archive(ArchiveError::Corrupt { .. })),
                "{how:?}: {e}"
            );
        }
    }
}
