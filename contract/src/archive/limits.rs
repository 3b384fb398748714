//! What reading one archive may cost. A job's output archive is written by the job, so every size
//! in it is the attacker's choice; the host reads it within these limits.
//!
//! The decompressed tar stream is read through a [`Budgeted`] reader that stops at a moving
//! position: while the tar reader looks for the next entry (skipping the previous entry's data,
//! then reading headers, GNU long names and links, PAX extensions and sparse maps, the parts it
//! reads into memory whole), it may read up to `max_metadata` bytes past where the next header
//! starts; while an entry's data is read, up to the end of the stream budget. Hitting either is an
//! error, never a silent truncation.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// How much reading one archive may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of metadata in front of one entry, together: its header blocks, GNU long name and
    /// long link, PAX extensions and GNU sparse map. The tar reader holds long names and PAX data
    /// in memory whole, so this bounds what one entry can make it allocate.
    pub max_metadata: u64,
    /// Entries in the archive (GNU long names and PAX extensions count with their entry).
    pub max_entries: u64,
    /// Bytes of the decompressed tar stream, whatever is done with them: xz reaches ~7000:1 and
    /// zstd ~30000:1, so a small job disk can decompress to terabytes.
    pub max_stream: u64,
    /// Bytes unpacking writes into files (sparse files count at their full size).
    pub max_output: u64,
}

impl Limits {
    /// Sensible for build outputs: long names of a few KiB, a million files, 16 GiB unpacked.
    pub const DEFAULT: Limits = Limits {
        max_metadata: 64 << 10,
        max_entries: 1_000_000,
        max_stream: 32 << 30,
        max_output: 16 << 30,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which budget a read ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exceeded {
    Metadata,
    Stream,
}

/// The position in the decompressed stream and where reading must stop, shared between the
/// reader (which enforces it) and the entry loop (which moves it).
#[derive(Debug)]
pub(super) struct Meter {
    pos: Cell<u64>,
    stop: Cell<u64>,
    stop_is: Cell<Exceeded>,
    exceeded: Cell<Option<Exceeded>>,
}

impl Meter {
    pub(super) fn new() -> Rc<Self> {
        Rc::new(Meter {
            pos: Cell::new(0),
            stop: Cell::new(0),
            stop_is: Cell::new(Exceeded::Stream),
            exceeded: Cell::new(None),
        })
    }

    /// Bytes of the decompressed stream read so far.
    pub(super) fn pos(&self) -> u64 {
        self.pos.get()
    }

    /// Lets reading go on up to `end`, or the stream budget if that comes first.
    pub(super) fn stop_at(&self, end: u64, limits: &Limits, what: Exceeded) {
        if end < limits.max_stream {
            self.stop.set(end);
            self.stop_is.set(what);
        } else {
            self.stop.set(limits.max_stream);
            self.stop_is.set(Exceeded::Stream);
        }
    }

    /// The budget a read ran out of, if one did (the tar reader may wrap or reword our error).
    pub(super) fn exceeded(&self) -> Option<Exceeded> {
        self.exceeded.get()
    }
}

/// A reader that fails, rather than ends, where its [`Meter`] says to stop.
pub(super) struct Budgeted<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Budgeted<R> {
    pub(super) fn new(inner: R, meter: Rc<Meter>) -> Self {
        Self { inner, meter }
    }
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = &self.meter;
        if let Some(what) = m.exceeded.get() {
            return Err(exceeded_error(what));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let pos = m.pos.get();
        let room = m.stop.get().saturating_sub(pos);
        if room == 0 {
            // At the limit the stream may still end here; only more data is too much.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            let what = m.stop_is.get();
            m.exceeded.set(Some(what));
            return Err(exceeded_error(what));
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let got = self.inner.read(&mut buf[..want])?;
        m.pos.set(pos + got as u64);
        Ok(got)
    }
}

fn exceeded_error(what: Exceeded) -> io::Error {
    io::Error::other(match what {
        Exceeded::Metadata => "an entry's metadata is larger than allowed",
        Exceeded::Stream => "the decompressed archive is larger than allowed",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budgeted_reader_fails_past_its_stop_but_may_end_on_it() {
        let limits = Limits {
            max_stream: 10,
            ..Limits::DEFAULT
        };
        let meter = Meter::new();
        meter.stop_at(u64::MAX, &limits, Exceeded::Metadata);
        let mut exact = Budgeted::new(&[1u8; 10][..], meter.clone());
        let mut out = Vec::new();
        exact.read_to_end(&mut out).unwrap();
        assert_eq!((out.len(), meter.exceeded()), (10, None));

        let meter = Meter::new();
        meter.stop_at(4, &limits, Exceeded::Metadata);
        let mut over = Budgeted::new(&[1u8; 11][..], meter.clone());
        let mut out = Vec::new();
        assert!(over.read_to_end(&mut out).is_err());
        assert_eq!((out.len(), meter.exceeded()), (4, Some(Exceeded::Metadata)));
        // Once exceeded, it stays so even if the stop moves.
        meter.stop_at(8, &limits, Exceeded::Stream);
        assert!(over.read(&mut [0u8; 4]).is_err());

        let meter = Meter::new();
        meter.stop_at(u64::MAX, &limits, Exceeded::Metadata);
        let mut bomb = Budgeted::new(io::repeat(0), meter.clone());
        assert!(io::copy(&mut bomb, &mut io::sink()).is_err());
        assert_eq!(meter.pos(), 10);
        assert_eq!(meter.exceeded(), Some(Exceeded::Stream));
    }
}
