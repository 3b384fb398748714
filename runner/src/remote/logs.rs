//! The console, live: a thread tails the attempt's console.log and sends what the server does not
//! have yet, in pieces at byte offsets (docs/api.md, "Log pieces"). The runner always goes on from
//! the offset the server last gave (a 416 gives it too), so a lost answer or a lost piece only
//! means sending some bytes again; the server stores each byte once.

use super::api::{AttemptApi, LogAnswer};
use super::client::ApiFailure;
use super::heartbeat::{Live, StopWhy};
use super::retry::Backoff;
use crate::runcore::Children;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The largest piece sent (the API takes up to 1 MiB).
pub const PIECE: usize = 256 << 10;

/// How often the console is looked at while the VM runs.
const TAIL_EVERY: Duration = Duration::from_secs(1);

/// Where the sending stands: every byte before `next` is on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTail {
    pub next: u64,
    pub piece: usize,
}

impl Default for LogTail {
    fn default() -> Self {
        LogTail {
            next: 0,
            piece: PIECE,
        }
    }
}

impl LogTail {
    /// The next piece to send of a console of `len` bytes: its offset and length.
    pub fn next_piece(&self, len: u64) -> Option<(u64, usize)> {
        let left = len.checked_sub(self.next).filter(|n| *n > 0)?;
        Some((
            self.next,
            usize::try_from(left).unwrap_or(usize::MAX).min(self.piece),
        ))
    }

    /// Takes an answer: the server's offset, whether it moved on or (a gap, a server that lost
    /// what it had) back.
    pub fn answered(&mut self, answer: LogAnswer) {
        self.next = match answer {
            LogAnswer::Taken(n) | LogAnswer::Gap(n) => n,
        };
    }
}

/// Something that takes log pieces: the server, or a test's stand-in.
pub trait LogSink {
    fn append(&mut self, offset: u64, piece: &[u8]) -> Result<LogAnswer, ApiFailure>;
}

impl LogSink for AttemptApi {
    fn append(&mut self, offset: u64, piece: &[u8]) -> Result<LogAnswer, ApiFailure> {
        self.append_log(offset, piece)
    }
}

/// Sends what `console` holds past `tail.next`; returns once all of it is on the server, on the
/// first failure, or after a bounded number of pieces (a server that keeps answering the same
/// offset must not hold the thread).
pub fn ship(
    tail: &mut LogTail,
    console: &mut File,
    sink: &mut impl LogSink,
) -> Result<(), ApiFailure> {
    let len = console
        .metadata()
        .map_err(|e| ApiFailure::BadAnswer(format!("the console log: {e}")))?
        .len();
    let rounds = len / tail.piece as u64 + 8;
    let mut buf = vec![0u8; tail.piece];
    for _ in 0..rounds {
        let Some((offset, want)) = tail.next_piece(len) else {
            return Ok(());
        };
        console
            .seek(SeekFrom::Start(offset))
            .and_then(|_| read_up_to(console, &mut buf[..want]))
            .map_err(|e| ApiFailure::BadAnswer(format!("the console log: {e}")))
            .and_then(|n| {
                let answer = sink.append(offset, &buf[..n])?;
                tail.answered(answer);
                Ok(())
            })?;
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The log thread's handle: [`LogThread::finish`] sends the rest and waits for it.
pub struct LogThread {
    handle: JoinHandle<()>,
    flush: Arc<AtomicBool>,
}

impl LogThread {
    /// The VM has ended: send what is left (while the lease may hold), then end.
    pub fn finish(self) {
        self.flush.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
    }
}

/// Starts tailing `live.console` for `api`'s attempt.
pub fn spawn(api: AttemptApi, live: Arc<Live>, children: Arc<Children>) -> LogThread {
    let flush = Arc::new(AtomicBool::new(false));
    let (t_live, t_flush) = (live.clone(), flush.clone());
    let handle = std::thread::Builder::new()
        .name(format!("log-{}", live.key))
        .spawn(move || tail_loop(api, &t_live, &t_flush, &children))
        .expect("spawn the log thread");
    LogThread { handle, flush }
}

fn tail_loop(mut api: AttemptApi, live: &Live, flush: &AtomicBool, children: &Children) {
    let mut tail = LogTail::default();
    let mut backoff = Backoff::default();
    let mut console: Option<File> = None;
    loop {
        let last = flush.load(Ordering::SeqCst);
        if live.lost() {
            return;
        }
        if console.is_none() {
            console = open(&live.console);
        }
        let mut wait = TAIL_EVERY;
        if let Some(file) = console.as_mut() {
            match ship(&mut tail, file, &mut api) {
                Ok(()) => {
                    backoff.reset();
                    if last {
                        return;
                    }
                }
                Err(e) if e.is_lease_lost() => {
                    live.stop_vm(StopWhy::LeaseLost, children);
                    return;
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!("attempt {}: log: {e}; trying again", live.key);
                    if last && !live.lease_may_hold() {
                        return;
                    }
                    wait = backoff.next_delay();
                }
                Err(e) => {
                    // A refusal that will not change (the console past what the server takes):
                    // the rest of the log is not sent; the job goes on.
                    tracing::warn!(
                        "attempt {}: log refused: {e}; no more of it is sent",
                        live.key
                    );
                    return;
                }
            }
        } else if last {
            return;
        }
        if last {
            std::thread::sleep(wait.min(Duration::from_secs(5)));
        } else {
            // Until the next look, or at once when the VM has ended.
            super::retry::sleep_unless(flush, wait);
        }
    }
}

fn open(path: &Path) -> Option<File> {
    File::open(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::log::{AppendKind, plan_append};
    use std::io::Write;

    /// The server's side of log pieces, by construir-api's rule, over a link that loses some
    /// answers (the piece is stored, the runner hears nothing) and some pieces.
    struct FlakyServer {
        stored: Vec<u8>,
        received: u64,
        cap: u64,
        calls: u32,
    }

    impl LogSink for FlakyServer {
        fn append(&mut self, offset: u64, piece: &[u8]) -> Result<LogAnswer, ApiFailure> {
            self.calls += 1;
            if self.calls.is_multiple_of(5) {
                return Err(ApiFailure::Network("the piece was lost".into()));
            }
            let p = plan_append(self.received, offset, piece.len() as u64, self.cap);
            let kept = &piece[p.skip as usize..(p.skip + p.keep) as usize];
            assert_eq!(p.write_at, self.stored.len() as u64);
            self.stored.extend_from_slice(kept);
            self.received = p.next_offset;
            if self.calls.is_multiple_of(3) {
                return Err(ApiFailure::Network("the answer was lost".into()));
            }
            Ok(match p.kind {
                AppendKind::Gap => LogAnswer::Gap(p.next_offset),
                _ => LogAnswer::Taken(p.next_offset),
            })
        }
    }

    #[test]
    fn pieces_follow_the_servers_offset() {
        let t = LogTail { next: 10, piece: 4 };
        assert_eq!(t.next_piece(10), None);
        assert_eq!(t.next_piece(9), None, "a server ahead of the file waits");
        assert_eq!(t.next_piece(12), Some((10, 2)));
        assert_eq!(t.next_piece(100), Some((10, 4)));
        let mut t = t;
        t.answered(LogAnswer::Gap(3));
        assert_eq!(t.next, 3, "a gap sends from where the server is");
        t.answered(LogAnswer::Taken(14));
        assert_eq!(t.next, 14);
    }

    #[test]
    fn a_growing_console_arrives_whole_over_a_flaky_link() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        let mut writer = File::create(&path).unwrap();
        let mut reader = File::open(&path).unwrap();
        let mut server = FlakyServer {
            stored: Vec::new(),
            received: 0,
            cap: u64::MAX,
            calls: 0,
        };
        let mut tail = LogTail {
            next: 0,
            piece: 1000,
        };
        let mut written = Vec::new();
        for round in 0..40u32 {
            let line: Vec<u8> =
                format!("line {round} {}\n", "x".repeat(round as usize * 37)).into_bytes();
            writer.write_all(&line).unwrap();
            written.extend_from_slice(&line);
            // Failures are retried by the thread; here, by calling again.
            let _ = ship(&mut tail, &mut reader, &mut server);
        }
        for _ in 0..100 {
            if ship(&mut tail, &mut reader, &mut server).is_ok()
                && tail.next == written.len() as u64
            {
                break;
            }
        }
        assert_eq!(server.stored, written, "every byte once, in order");
        assert_eq!(tail.next, written.len() as u64);
    }

    #[test]
    fn a_server_that_restarted_with_less_is_sent_the_rest_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("console.log");
        std::fs::write(&path, vec![b'a'; 5000]).unwrap();
        let mut reader = File::open(&path).unwrap();
        // The runner believes 4000 bytes are there; the server has 1000.
        struct Behind {
            received: u64,
        }
        impl LogSink for Behind {
            fn append(&mut self, offset: u64, piece: &[u8]) -> Result<LogAnswer, ApiFailure> {
                let p = plan_append(self.received, offset, piece.len() as u64, u64::MAX);
                self.received = p.next_offset;
                Ok(if p.kind == AppendKind::Gap {
                    LogAnswer::Gap(p.next_offset)
                } else {
                    LogAnswer::Taken(p.next_offset)
                })
            }
        }
        let mut server = Behind { received: 1000 };
        let mut tail = LogTail {
            next: 4000,
            piece: 1500,
        };
        ship(&mut tail, &mut reader, &mut server).unwrap();
        assert_eq!((tail.next, server.received), (5000, 5000));
    }
}
