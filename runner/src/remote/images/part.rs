//! One part of an image (its manifest, kernel or disk) downloaded into a partial file: resumed
//! with a range request from the partial file's length after a broken transfer, capped, and
//! checked against the sha256 it must have before the caller renames it into place.

use super::{FetchError, disk_err};
use crate::remote::client::{ApiFailure, Client, Payload, http::Method};
use crate::remote::retry::Backoff;
use crate::remote::transfer::hex;
use construir_contract::text::printable;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Broken transfers of one part tried again (with back-off) before the fetch gives up; each try
/// that brought bytes starts the count again.
const TRIES: u32 = 5;
/// A progress line at least this often while a part downloads (and at each tenth of it).
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// An image's parts, as the server's path names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Manifest,
    Kernel,
    Disk,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Manifest => "manifest",
            Part::Kernel => "kernel",
            Part::Disk => "disk",
        }
    }
}

/// A server's answer for a part from byte `from` on.
pub enum Answer {
    /// Bytes from `start` (`from`, or 0 when the range was not honoured) of a part of `total`
    /// bytes, whose sha256 the server says is `sha256`.
    Bytes {
        start: u64,
        total: u64,
        sha256: Option<String>,
        body: Box<dyn Read>,
    },
    /// `from` is at or past the part's end (416), whose size is `total` if said.
    PastEnd { total: Option<u64> },
}

/// Where parts come from: the server ([`HttpSource`]), or a test's stand-in.
pub trait Source {
    fn get(&self, digest: &str, part: Part, from: u64) -> Result<Answer, ApiFailure>;
}

/// The server, with the runner's own token (images are served to runners, not to attempts).
pub struct HttpSource {
    pub client: Client,
    pub token: String,
}

impl Source for HttpSource {
    fn get(&self, digest: &str, part: Part, from: u64) -> Result<Answer, ApiFailure> {
        let range = [("Range", format!("bytes={from}-"))];
        let response = self.client.exchange(
            Method::GET,
            &format!("/api/v1/images/{digest}/{}", part.name()),
            &self.token,
            if from > 0 { &range } else { &[] },
            Payload::None,
            &[416],
        )?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_range = header("Content-Range").and_then(|v| parse_content_range(&v));
        let sha256 = header("Construir-Sha256");
        let bad = |why: String| ApiFailure::BadAnswer(why);
        let (start, total) = match response.status().as_u16() {
            416 => {
                return Ok(Answer::PastEnd {
                    total: content_range.map(|(_, total)| total),
                });
            }
            206 => match content_range {
                Some((Some((start, _)), total)) => (start, total),
                _ => return Err(bad("a 206 without a Content-Range".into())),
            },
            _ => match response.body().content_length() {
                Some(total) => (0, total),
                None => return Err(bad("an image part without a Content-Length".into())),
            },
        };
        let (_, body) = response.into_parts();
        // Never more than the part's size (the caller caps the size itself).
        let body = body
            .into_with_config()
            .limit(total.saturating_sub(start).saturating_add(1))
            .reader();
        Ok(Answer::Bytes {
            start,
            total,
            sha256,
            body: Box::new(body),
        })
    }
}

/// Reads `bytes S-E/T` (`Some((S, E))`, T) or `bytes */T` (`None`, T).
pub fn parse_content_range(value: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let total = total.parse().ok()?;
    if range == "*" {
        return Some((None, total));
    }
    let (start, end) = range.split_once('-')?;
    let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
    (start <= end && end < total).then_some((Some((start, end)), total))
}

/// What a fetch may do: where from, when to stop, whether to go on trying.
pub struct Fetcher<'a> {
    pub source: &'a dyn Source,
    /// Asked between chunks and while waiting: the attempt was stopped.
    pub stopped: &'a dyn Fn() -> bool,
    /// Whether a broken transfer may be tried again (the lease may still hold).
    pub may_retry: &'a dyn Fn() -> bool,
    /// The wait between tries.
    pub backoff: Backoff,
    /// Names the attempt in log lines.
    pub key: &'a str,
}

impl Fetcher<'_> {
    /// Waits `d` unless stopped meanwhile; false if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if (self.stopped)() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
        !(self.stopped)()
    }
}

/// How one try at a part ended.
enum Step {
    Done,
    /// The transfer broke (why, if it was an error), what came kept for the next try.
    Broke(Option<ApiFailure>),
}

/// Downloads one part into `partial/PART`, resuming what is there: at most `cap` bytes (what an
/// image's part may have) and `room` (what the cache has left); checks its sha256 is `sha256`.
/// Returns the checked file.
pub(super) fn fetch_part(
    f: &Fetcher<'_>,
    digest: &str,
    part: Part,
    partial: &Path,
    cap: u64,
    room: u64,
    sha256: &str,
) -> Result<PathBuf, FetchError> {
    let path = partial.join(part.name());
    let server = |error| FetchError::Server {
        digest: digest.to_string(),
        part: part.name(),
        error,
    };
    let refuse = |reason: String| {
        let _ = std::fs::remove_file(&path);
        FetchError::Image(format!("{digest}: its {}: {reason}", part.name()))
    };
    let mut backoff = f.backoff.clone();
    let mut tries = 0;
    loop {
        if (f.stopped)() {
            return Err(FetchError::Stopped);
        }
        let mut have = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if have > cap.min(room) {
            let _ = std::fs::remove_file(&path);
            have = 0;
        }
        let before = have;
        let step = match f.source.get(digest, part, have) {
            Err(e) if e.code() == Some(construir_api::codes::NOT_FOUND) => {
                return Err(FetchError::Image(format!(
                    "{digest}: the server has no such image ({e})"
                )));
            }
            Err(e) if e.is_transient() => Step::Broke(Some(e)),
            Err(e) => return Err(server(e)),
            Ok(Answer::PastEnd { total }) if total == Some(have) => Step::Done,
            Ok(Answer::PastEnd { .. }) => {
                // A partial file longer than the part: not ours to keep.
                let _ = std::fs::remove_file(&path);
                have = 0;
                Step::Broke(None)
            }
            Ok(Answer::Bytes {
                start,
                total,
                sha256: said,
                mut body,
            }) => {
                if total > cap {
                    return Err(refuse(format!(
                        "{total} bytes, more than the {cap} an image's {} may have",
                        part.name()
                    )));
                }
                if total > room {
                    let _ = std::fs::remove_file(&path);
                    return Err(FetchError::Unfit(format!(
                        "image {digest} does not fit in this runner's --cache-size: its {} is \
                         {total} bytes, {room} are left",
                        part.name()
                    )));
                }
                if let Some(said) = said.filter(|s| s != sha256) {
                    return Err(refuse(format!(
                        "the server says its sha256 is {}, but it must be {sha256}",
                        printable(&said)
                    )));
                }
                if start != have && start != 0 {
                    return Err(server(ApiFailure::BadAnswer(format!(
                        "asked from byte {have}, given from byte {start}"
                    ))));
                }
                // A server that ignored the range sends it all again: start over.
                let file = File::options()
                    .create(true)
                    .write(true)
                    .append(start > 0)
                    .truncate(start == 0)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(disk_err("write", &path))?;
                have = start;
                let resumed = if start > 0 {
                    format!(", resumed at byte {start}")
                } else {
                    String::new()
                };
                tracing::info!(
                    "attempt {}: image {digest}: {}, {total} bytes{resumed}",
                    f.key,
                    part.name()
                );
                match copy_body(f, &mut *body, file, &mut have, total, part) {
                    Err(FetchError::Image(why)) => return Err(refuse(why)),
                    Err(e) => return Err(e),
                    Ok(Ok(())) if have == total => Step::Done,
                    Ok(Ok(())) => Step::Broke(None),
                    Ok(Err(e)) => Step::Broke(Some(e)),
                }
            }
        };
        let Step::Broke(why) = step else {
            break;
        };
        // A try that brought bytes starts the count again: a slow, flaky line still gets there.
        tries = if have > before { 0 } else { tries + 1 };
        if tries >= TRIES || !(f.may_retry)() {
            return Err(server(why.unwrap_or_else(|| {
                ApiFailure::Network(format!("the transfer broke off at byte {have}"))
            })));
        }
        tracing::warn!(
            "attempt {}: image {digest}: the {} broke off at byte {have}{}; trying again",
            f.key,
            part.name(),
            why.map(|e| format!(" ({e})")).unwrap_or_default()
        );
        if tries > 0 && !f.sleep(backoff.next_delay()) {
            return Err(FetchError::Stopped);
        }
    }
    let got = sha256_of(&path).map_err(disk_err("read", &path))?;
    if got != sha256 {
        let named_by = if part == Part::Manifest {
            "digest"
        } else {
            "manifest"
        };
        return Err(refuse(format!(
            "its sha256 is {got}, but the {named_by} says {sha256}"
        )));
    }
    Ok(path)
}

/// Appends the body to `file`, counting into `have`, at most `total`. The inner error is the
/// network's (the bytes written so far kept for a resume); the outer one ends the fetch.
fn copy_body(
    f: &Fetcher<'_>,
    body: &mut dyn Read,
    mut file: File,
    have: &mut u64,
    total: u64,
    part: Part,
) -> Result<Result<(), ApiFailure>, FetchError> {
    let mut buf = vec![0u8; 256 << 10];
    let mut last_line = Instant::now();
    let mut next_tenth = *have * 10 / total.max(1) + 1;
    let result = loop {
        if (f.stopped)() {
            break Err(FetchError::Stopped);
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break Ok(Ok(())),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Ok(Err(ApiFailure::Network(format!("the transfer broke: {e}")))),
        };
        if *have + n as u64 > total {
            break Err(FetchError::Image(format!(
                "longer than the {total} bytes the server said"
            )));
        }
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(FetchError::Disk(format!(
                "writing the {}: {e}",
                part.name()
            )));
        }
        *have += n as u64;
        let tenth = *have * 10 / total.max(1);
        // (A part of less than a MiB comes at once: its first line said its size.)
        let worth = total >= 1 << 20;
        if worth && (tenth >= next_tenth || last_line.elapsed() >= PROGRESS_EVERY) {
            tracing::info!(
                "attempt {}: {}: {} of {total} bytes ({}%)",
                f.key,
                part.name(),
                *have,
                *have * 100 / total.max(1)
            );
            next_tenth = tenth + 1;
            last_line = Instant::now();
        }
    };
    // What came is kept for the next try, so it must be on disk.
    file.sync_all()
        .map_err(|e| FetchError::Disk(format!("writing the {}: {e}", part.name())))?;
    result
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hex(&hash.finalize())),
            n => hash.update(&buf[..n]),
        }
    }
}
