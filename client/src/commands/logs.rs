//! `logs`, and following a console as it comes (`logs --follow`, `submit --follow`).

use super::{finish, get_job, poll_interval, progress_line};
use crate::escape::ConsoleFilter;
use crate::http::{Api, HttpError};
use crate::paths;
use construir_api::types::{AttemptId, JobId, JobView};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How long one log long poll may wait for new bytes (the server's most is 30 s).
const LONG_POLL_S: u32 = 25;
/// The most console bytes one answer may hold (the largest console cap is 64 MiB).
const PIECE_LIMIT: u64 = 80 << 20;
/// The headers of a log answer (docs/api.md, "Submitters").
const NEXT_HEADER: &str = "Construir-Log-Next";
const COMPLETE_HEADER: &str = "Construir-Log-Complete";

/// `logs ID [--follow] [--attempt A] [--raw]`.
pub fn run(
    api: &Api,
    id: JobId,
    follow_on: bool,
    attempt: Option<AttemptId>,
    raw: bool,
) -> anyhow::Result<u8> {
    let mut out = ConsoleOut::stdout(raw);
    if follow_on {
        let job = follow(api, id, attempt, &mut out)?;
        out.finish()?;
        return Ok(if job.state.is_terminal() {
            finish(&job)
        } else {
            0
        });
    }
    // The attempt is pinned first: "the job's last" could change while the pieces are read.
    let attempt = match attempt {
        Some(a) => a,
        None => {
            let (job, _) = get_job(api, id)?;
            match job.attempts.last() {
                Some(a) => a.id,
                None => {
                    eprintln!(
                        "construir: job {id} has no console: no runner has taken it yet ({})",
                        job.state
                    );
                    return Ok(0);
                }
            }
        }
    };
    stream(api, id, attempt, 0, &mut out)?;
    out.finish()?;
    Ok(0)
}

/// Prints the job's console as it comes, attempt after attempt (a try that a runner's failure
/// ended is followed by the next), until the job ends; or only `only`'s, until it ends.
pub fn follow(
    api: &Api,
    id: JobId,
    only: Option<AttemptId>,
    out: &mut impl Write,
) -> anyhow::Result<JobView> {
    let started = Instant::now();
    let mut followed: Vec<AttemptId> = Vec::new();
    let mut seen = None;
    loop {
        let (job, _) = get_job(api, id)?;
        // While no console comes (queued, between tries), say why on stderr.
        let now = (job.state, job.attempts.last().map(|a| a.id));
        if seen != Some(now) && !job.state.is_terminal() && only.is_none() {
            out.flush()?;
            eprintln!("{}", progress_line(&job));
        }
        seen = Some(now);
        let next = match only {
            Some(a) => Some(a).filter(|a| !followed.contains(a)),
            None => job
                .attempts
                .last()
                .map(|a| a.id)
                .filter(|a| !followed.contains(a)),
        };
        match next {
            Some(a) => {
                if let Some(previous) = followed.last() {
                    out.flush()?;
                    eprintln!("construir: attempt {previous} ended; attempt {a} has begun");
                }
                stream(api, id, a, LONG_POLL_S, out)?;
                followed.push(a);
                if only.is_some() {
                    return Ok(get_job(api, id)?.0);
                }
            }
            None if job.state.is_terminal() || only.is_some() => return Ok(job),
            None => std::thread::sleep(poll_interval(started.elapsed())),
        }
    }
}

/// Copies an attempt's console to `out` from its start: with `wait_s`, long polls until the
/// server says it is complete; without, what there is now.
pub fn stream(
    api: &Api,
    id: JobId,
    attempt: AttemptId,
    wait_s: u32,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    loop {
        let asked = Instant::now();
        let path = paths::log(id, Some(attempt), offset, wait_s);
        let (headers, body) = api.get_bytes(&path, PIECE_LIMIT)?;
        let protocol = |message: String| HttpError::Protocol {
            what: format!("GET {path}"),
            message,
        };
        let next = headers
            .get(NEXT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| protocol(format!("the answer has no {NEXT_HEADER} offset")))?;
        let complete = headers
            .get(COMPLETE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        // Bytes past the console cap are counted in the offset but not sent, so the offset may
        // run ahead of the body; it may never go back.
        if next < offset || (body.len() as u64) > next - offset {
            return Err(protocol(format!(
                "{NEXT_HEADER} {next} after {} bytes from offset {offset}",
                body.len()
            ))
            .into());
        }
        out.write_all(&body)?;
        out.flush()?;
        let moved = next > offset;
        offset = next;
        if complete || (wait_s == 0 && !moved) {
            return Ok(());
        }
        // A server that does not hold the poll open must not be asked in a busy loop.
        if !moved && asked.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Where a console goes on stdout: escaped on a terminal (a job's escape sequences are not for
/// the user's terminal), as it is elsewhere or with `--raw`.
pub struct ConsoleOut {
    filter: Option<ConsoleFilter>,
    out: std::io::Stdout,
}

impl ConsoleOut {
    pub fn stdout(raw: bool) -> Self {
        let out = std::io::stdout();
        let filter = (!raw && out.is_terminal()).then(ConsoleFilter::default);
        ConsoleOut { filter, out }
    }

    /// Writes what the filter still holds.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if let Some(f) = &mut self.filter {
            let rest = f.finish();
            self.out.write_all(rest.as_bytes())?;
        }
        self.out.flush()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.filter {
            Some(f) => {
                let text = f.push(buf);
                self.out.write_all(text.as_bytes())?;
            }
            None => self.out.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::tests::{answer, fake_server};

    #[test]
    fn a_console_is_read_piece_by_piece_to_its_end() {
        let (url, server) = fake_server(vec![
            answer(200, true, "Construir-Log-Next: 6\r\n", "hello "),
            answer(200, true, "Construir-Log-Next: 6\r\n", ""),
            answer(
                200,
                true,
                "Construir-Log-Next: 20\r\nConstruir-Log-Complete: true\r\n",
                "world\n",
            ),
        ]);
        let api = Api::new(&url, "t");
        let mut out = Vec::new();
        stream(&api, JobId(4), AttemptId(2), 25, &mut out).unwrap();
        assert_eq!(
            out, b"hello world\n",
            "bytes past the cap are counted, not sent"
        );
        let seen = server.join().unwrap();
        assert!(seen[0].starts_with("GET /api/v1/jobs/4/log?attempt=2&offset=0&wait_s=25 "));
        assert!(seen[1].starts_with("GET /api/v1/jobs/4/log?attempt=2&offset=6&wait_s=25 "));
        assert!(seen[2].starts_with("GET /api/v1/jobs/4/log?attempt=2&offset=6&wait_s=25 "));
    }

    #[test]
    fn without_waiting_it_stops_when_nothing_more_is_there_and_offsets_never_go_back() {
        let (url, server) = fake_server(vec![
            answer(200, true, "Construir-Log-Next: 3\r\n", "abc"),
            answer(200, true, "Construir-Log-Next: 3\r\n", ""),
            answer(200, true, "Construir-Log-Next: 0\r\n", "x"),
            answer(200, true, "", "x"),
        ]);
        let api = Api::new(&url, "t");
        let mut out = Vec::new();
        stream(&api, JobId(4), AttemptId(2), 0, &mut out).unwrap();
        assert_eq!(out, b"abc");
        let e = stream(&api, JobId(4), AttemptId(2), 0, &mut out).unwrap_err();
        assert!(
            e.to_string().contains("Construir-Log-Next 0 after 1 bytes"),
            "{e}"
        );
        let e = stream(&api, JobId(4), AttemptId(2), 0, &mut out).unwrap_err();
        assert!(e.to_string().contains("no Construir-Log-Next"), "{e}");
        server.join().unwrap();
    }
}
