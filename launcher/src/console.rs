//! The guest console's sink: a file, stdout, or nothing, capped in size so a guest that floods
//! its console cannot fill the host's disk. Past the cap the bytes are counted and dropped, and
//! one line says so. Both launchers (construir-vmm, construir-qemu) use it.

use std::io::Write;

/// Default cap of a console log.
pub const DEFAULT_CONSOLE_CAP: u64 = 16 * 1024 * 1024;

/// Writes console bytes to `inner` until `cap` bytes, then drops (and counts) the rest.
pub struct CappedSink<W: Write> {
    inner: W,
    cap: u64,
    written: u64,
    dropped: u64,
    first_byte: Option<std::time::Instant>,
}

impl<W: Write> CappedSink<W> {
    pub fn new(inner: W, cap: u64) -> Self {
        Self {
            inner,
            cap,
            written: 0,
            dropped: 0,
            first_byte: None,
        }
    }

    /// Takes `data` from the guest; never fails because of the guest (write errors of the sink
    /// itself are returned).
    pub fn accept(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.first_byte.is_none() && !data.is_empty() {
            self.first_byte = Some(std::time::Instant::now());
        }
        let room = self.cap.saturating_sub(self.written);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take > 0 {
            self.inner.write_all(&data[..take])?;
            self.written += take as u64;
        }
        let rest = (data.len() - take) as u64;
        if rest > 0 {
            if self.dropped == 0 {
                writeln!(
                    self.inner,
                    "\n[construir: console log capped at {} bytes; the rest is dropped]",
                    self.cap
                )?;
            }
            self.dropped += rest;
        }
        self.inner.flush()
    }

    /// Bytes kept.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// When the first byte arrived.
    pub fn first_byte(&self) -> Option<std::time::Instant> {
        self.first_byte
    }

    /// Bytes dropped past the cap.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<W: Write> Write for CappedSink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.accept(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_then_counts() {
        let mut sink = CappedSink::new(Vec::new(), 10);
        sink.accept(b"12345").unwrap();
        sink.accept(b"67890abc").unwrap();
        sink.accept(b"more").unwrap();
        assert_eq!(sink.written(), 10);
        assert_eq!(sink.dropped(), 7);
        assert!(sink.first_byte().is_some());
        let out = String::from_utf8(sink.inner).unwrap();
        assert!(out.starts_with("1234567890\n[construir: console log capped at 10 bytes"));
        assert_eq!(out.matches("capped").count(), 1);
    }
}
