//! A job's console and output for people: the live console as Server-Sent Events
//! (`/jobs/ID/live`, each event the console's new bytes rendered to styled text runs as JSON,
//! which `static/live.js` appends as text nodes), the whole log, the output archive and its
//! single files as downloads. Downloads are attachments of `application/octet-stream` with
//! names made safe: a browser never renders what a job wrote.

use super::WebError;
use super::jobs::seen;
use super::session::Visitor;
use crate::http::Refusal;
use crate::jobs::StoredJob;
use crate::logs::{ConsoleHome, read_console};
use crate::service::{Shared, Topic};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use construir_api::codes;
use construir_api::console::Renderer;
use construir_api::log::ConsoleCap;
use construir_api::types::{AttemptId, JobId};
use construir_contract::archive::OutputIndex;
use futures::StreamExt;
use std::convert::Infallible;
use std::time::Duration;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/jobs/{id}/live", get(live))
        .route("/jobs/{id}/log.txt", get(log_download))
        .route("/jobs/{id}/output", get(output_download))
        .route("/jobs/{id}/files/{*path}", get(file_download))
        .route("/jobs/{id}/receipt.json", get(receipt_download))
}

/// The server's signed receipt of the job's result, as the API gives it, as a download.
async fn receipt_download(
    State(app): State<Shared>,
    visitor: Visitor,
    Path(id): Path<u64>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let job = seen(&app, visitor.viewer(), id, &chrome).await?;
    let receipt = crate::receipts::receipt_of(&app, &job)
        .await
        .map_err(|r| WebError::from_refusal(r, &chrome))?;
    let json = serde_json::to_vec_pretty(&receipt).unwrap_or_default();
    let len = json.len() as u64;
    Ok(attachment(
        Body::from(json),
        &format!("job-{id}-receipt.json"),
        Some(len),
    ))
}

/// The last bytes of an attempt's console.
pub struct Tail {
    pub bytes: Vec<u8>,
    /// Bytes before these were not shown (the page says so; the download has them).
    pub cut: bool,
    /// The console offset after them: where the live console goes on.
    pub next: u64,
}

fn console_error(e: crate::logs::LogError) -> Refusal {
    tracing::error!("reading a console: {e}");
    Refusal::new(codes::INTERNAL, "the server could not read the console")
}

/// The last `max` bytes (or so: the console's own cap may have dropped some) of `attempt`'s
/// console.
pub async fn tail(
    app: &Shared,
    job: &StoredJob,
    attempt: AttemptId,
    max: u64,
) -> Result<Tail, Refusal> {
    let cap = ConsoleCap::new(job.facts.limits.console_cap);
    let probe = read_console(&app.db, &app.blobs, attempt, cap, 0, 0)
        .await
        .map_err(console_error)?;
    let from = probe.received.saturating_sub(max);
    let mut read = read_console(&app.db, &app.blobs, attempt, cap, from, max as usize)
        .await
        .map_err(console_error)?;
    if let ConsoleHome::Deleted { at_ms } = read.home {
        read.bytes = crate::retention::console_deleted_note(at_ms, 4096).into_bytes();
    }
    Ok(Tail {
        bytes: read.bytes,
        cut: from > 0,
        next: read.next,
    })
}

/// The server's index of `attempt`'s output: None when it could not index it (no archive).
pub async fn output_index(
    app: &Shared,
    attempt: AttemptId,
) -> Result<Option<OutputIndex>, Refusal> {
    let Some(sha) = app.db.output_index_blob(attempt).await? else {
        return Ok(None);
    };
    let size = app.blobs.info(&sha).await?.map_or(0, |i| i.size);
    if size > MAX_INDEX_ON_PAGE {
        return Err(Refusal::new(
            codes::NOT_FOUND,
            format!("the output's index is {size} bytes, more than a page lists"),
        ));
    }
    let mut stream = app.blobs.read(&sha).await?;
    let mut json = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| Refusal::new(codes::INTERNAL, e.to_string()))?;
        json.extend_from_slice(&piece);
    }
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| Refusal::new(codes::INTERNAL, format!("the output's index: {e}")))
}

#[derive(serde::Deserialize)]
struct LiveQuery {
    attempt: Option<u64>,
    #[serde(default)]
    from: u64,
}

/// Single files read out of outputs at a time (each one decompresses an archive on a blocking
/// thread): more wait their turn.
static EXTRACTIONS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The largest output index a job page reads (its JSON): a bigger one is not listed there.
pub const MAX_INDEX_ON_PAGE: u64 = 16 << 20;

/// How long the live console waits between looks when nothing wakes it.
const LIVE_IDLE: Duration = Duration::from_secs(10);

/// The live console: events `console` (data: the new bytes as `[{"class", "text"}]`, id: the
/// offset after them), `attempt` (another attempt holds the job now: data its id; the page
/// reloads) and `end` (the attempt has ended and everything was sent).
async fn live(
    State(app): State<Shared>,
    visitor: Visitor,
    Path(id): Path<u64>,
    Query(q): Query<LiveQuery>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let job = seen(&app, visitor.viewer(), id, &chrome).await?;
    // Only an attempt of this job: the id in the address is the visitor's.
    let attempt = q
        .attempt
        .map(AttemptId)
        .filter(|a| job.snapshot.attempt(*a).is_some())
        .or(job.snapshot.attempts.last().map(|a| a.id));
    let cap = ConsoleCap::new(job.facts.limits.console_cap);
    let state = Follow {
        app: app.clone(),
        job: JobId(id),
        attempt,
        offset: q.from,
        renderer: Renderer::new(),
        done: false,
        cap,
    };
    let stream = futures::stream::unfold(state, |mut f| async move {
        if f.done {
            return None;
        }
        let event = f.next_event().await;
        Some((Ok::<_, Infallible>(event), f))
    });
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// A live console being followed.
struct Follow {
    app: Shared,
    job: JobId,
    attempt: Option<AttemptId>,
    offset: u64,
    renderer: Renderer,
    done: bool,
    cap: ConsoleCap,
}

impl Follow {
    async fn next_event(&mut self) -> SseEvent {
        loop {
            let job_watch = self.app.watchers.watch(Topic::Job(self.job));
            let job_changed = job_watch.notified();
            let Ok(Some(job)) = self.app.db.load_job(self.job).await else {
                self.done = true;
                return SseEvent::default().event("end").data("gone");
            };
            let latest = job.snapshot.attempts.last().map(|a| a.id);
            let Some(attempt) = self.attempt else {
                // Queued when the page was drawn: once a runner takes it, the page is drawn
                // again (it shows the new attempt).
                if let Some(a) = latest {
                    self.done = true;
                    return SseEvent::default().event("attempt").data(a.0.to_string());
                }
                if job.snapshot.state.is_terminal() {
                    self.done = true;
                    return SseEvent::default()
                        .event("end")
                        .data(job.snapshot.state.as_str());
                }
                wait(job_changed, None).await;
                continue;
            };
            let Some(ours) = job.snapshot.attempt(attempt) else {
                self.done = true;
                return SseEvent::default().event("end").data("no such attempt");
            };
            let ours_ended = !ours.state.is_live();
            if ours_ended && latest.is_some_and(|l| l != attempt) {
                // Another attempt holds the job now (a retry, another replica): draw it.
                self.done = true;
                let id = latest.map_or(0, |a| a.0);
                return SseEvent::default().event("attempt").data(id.to_string());
            }
            let console_watch = self.app.watchers.watch(Topic::Console(attempt));
            let piece_came = console_watch.notified();
            let read = match read_console(
                &self.app.db,
                &self.app.blobs,
                attempt,
                self.cap,
                self.offset,
                64 << 10,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("live console of attempt {attempt}: {e}");
                    self.done = true;
                    return SseEvent::default().event("end").data("error");
                }
            };
            let ended = ours_ended;
            if !read.bytes.is_empty() || read.next > self.offset {
                self.offset = read.next;
                let mut segments = self.renderer.feed(&read.bytes);
                if ended && read.next >= read.received {
                    segments.extend(self.renderer.finish());
                }
                let data = serde_json::to_string(&segments).unwrap_or_else(|_| "[]".into());
                return SseEvent::default()
                    .event("console")
                    .id(self.offset.to_string())
                    .data(data);
            }
            // The attempt ended and all of it was sent: the page is drawn again once the job
            // has ended, or once another attempt takes it (a retry after a back-off may be
            // hours away: until then the stream waits, quietly).
            if ended && job.snapshot.state.is_terminal() {
                self.done = true;
                return SseEvent::default()
                    .event("end")
                    .data(job.snapshot.state.as_str());
            }
            if self.app.is_stopping() {
                self.done = true;
                return SseEvent::default().event("end").data("server stopping");
            }
            wait(job_changed, Some(piece_came)).await;
        }
    }
}

async fn wait(
    job_changed: tokio::sync::futures::Notified<'_>,
    piece_came: Option<tokio::sync::futures::Notified<'_>>,
) {
    let piece = async {
        match piece_came {
            Some(p) => p.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = job_changed => {}
        () = piece => {}
        () = tokio::time::sleep(LIVE_IDLE) => {}
    }
}

/// `name` as a download's file name: letters, digits, `.`, `-` and `_` kept, anything else `_`,
/// never empty, never a dot file.
pub fn safe_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() {
        "download".into()
    } else {
        cleaned
    }
}

/// An attachment: `application/octet-stream` under `name` (made safe), never shown inline.
fn attachment(body: Body, name: &str, len: Option<u64>) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let disposition = format!("attachment; filename=\"{}\"", safe_name(name));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(n) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    r
}

#[derive(serde::Deserialize)]
struct AttemptQuery {
    attempt: Option<u64>,
}

async fn log_download(
    State(app): State<Shared>,
    visitor: Visitor,
    Path(id): Path<u64>,
    Query(q): Query<AttemptQuery>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let job = seen(&app, visitor.viewer(), id, &chrome).await?;
    let attempt = q
        .attempt
        .map(AttemptId)
        .filter(|a| job.snapshot.attempt(*a).is_some())
        .or(job.snapshot.result_attempt)
        .or(job.snapshot.attempts.last().map(|a| a.id))
        .ok_or_else(|| super::jobs::not_found("console: no runner has taken the job", &chrome))?;
    let cap = ConsoleCap::new(job.facts.limits.console_cap);
    // Streamed a MiB at a time: a console may be as long as its job's cap.
    let state = (app.clone(), 0u64, false);
    let stream = futures::stream::unfold(state, move |(app, from, done)| async move {
        if done {
            return None;
        }
        match read_console(&app.db, &app.blobs, attempt, cap, from, 1 << 20).await {
            Err(e) => {
                tracing::error!("job {id}: the console of attempt {attempt}: {e}");
                let e = std::io::Error::other("the console could not be read");
                Some((Err(e), (app, from, true)))
            }
            Ok(read) => {
                if let ConsoleHome::Deleted { at_ms } = read.home {
                    let note = crate::retention::console_deleted_note(at_ms, 4096).into_bytes();
                    return Some((Ok(bytes::Bytes::from(note)), (app, from, true)));
                }
                let last = read.next <= from || read.next >= read.received;
                let next = read.next;
                Some((Ok(bytes::Bytes::from(read.bytes)), (app, next, last)))
            }
        }
    });
    Ok(attachment(
        Body::from_stream(stream),
        &format!("job-{id}-attempt-{attempt}-console.txt"),
        None,
    ))
}

/// The result's output sha256, size and (when indexed) index.
async fn result_output(
    app: &Shared,
    job: &StoredJob,
) -> Result<Option<(AttemptId, String, Option<u64>)>, Refusal> {
    let Some(result) = job.snapshot.result_attempt else {
        return Ok(None);
    };
    let blobs = app.db.attempt_blobs(job.facts.id).await?;
    Ok(blobs
        .get(&result)
        .and_then(|b| Some((result, b.output_sha256.clone()?, b.output_size))))
}

async fn output_download(
    State(app): State<Shared>,
    visitor: Visitor,
    Path(id): Path<u64>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let job = seen(&app, visitor.viewer(), id, &chrome).await?;
    let fail = |r: Refusal| WebError::from_refusal(r, &chrome);
    let (result, sha, size) = result_output(&app, &job)
        .await
        .map_err(fail)?
        .ok_or_else(|| super::jobs::not_found("output (yet)", &chrome))?;
    let ext = match output_index(&app, result).await.ok().flatten() {
        Some(i) => match i.compression.as_str() {
            "xz" => "tar.xz",
            "gzip" => "tar.gz",
            "zstd" => "tar.zst",
            _ => "tar",
        },
        None => "bin",
    };
    let stream = app.blobs.read(&sha).await.map_err(|e| fail(e.into()))?;
    Ok(attachment(
        Body::from_stream(stream),
        &format!("job-{id}-output.{ext}"),
        size,
    ))
}

async fn file_download(
    State(app): State<Shared>,
    visitor: Visitor,
    Path((id, path)): Path<(u64, String)>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let job = seen(&app, visitor.viewer(), id, &chrome).await?;
    let fail = |r: Refusal| WebError::from_refusal(r, &chrome);
    let no_file = || super::jobs::not_found(&format!("file {path:?} in the output"), &chrome);
    let (result, sha, _) = result_output(&app, &job)
        .await
        .map_err(fail)?
        .ok_or_else(no_file)?;
    let index = output_index(&app, result)
        .await
        .map_err(fail)?
        .ok_or_else(no_file)?;
    let entry = index
        .entries
        .iter()
        .find(|e| e.path == path && matches!(e.kind, construir_contract::archive::EntryKind::File))
        .ok_or_else(no_file)?;
    let size = entry.size;
    let name = path.rsplit('/').next().unwrap_or("file").to_string();
    let limits = construir_contract::archive::index_limits(job.facts.limits.output_size);
    let stream = app.blobs.read(&sha).await.map_err(|e| fail(e.into()))?;
    let reader =
        tokio_util::io::StreamReader::new(stream.map(|r| r.map_err(std::io::Error::other)));
    let want = path.clone();
    let _turn = EXTRACTIONS.acquire().await.map_err(|_| {
        WebError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping",
            &chrome,
        )
    })?;
    // The archive is read on a blocking thread (the reader is synchronous), the one file
    // copied into an unnamed temporary file, then streamed.
    let copied = tokio::task::spawn_blocking(move || {
        let mut source = tokio_util::io::SyncIoBridge::new(reader);
        let mut out = tempfile::tempfile()?;
        let n = construir_contract::archive::copy_file(&mut source, &want, size, &limits, &mut out)
            .map_err(std::io::Error::other)?;
        use std::io::Seek;
        out.rewind()?;
        Ok::<_, std::io::Error>((n, out))
    })
    .await
    .map_err(|e| fail(Refusal::new(codes::INTERNAL, e.to_string())))?;
    let (n, file) = copied.map_err(|e| {
        tracing::error!("job {id}: extracting {path:?}: {e}");
        WebError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the file could not be read out of the output",
            &chrome,
        )
    })?;
    let Some(n) = n else {
        return Err(no_file());
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    ));
    Ok(attachment(body, &name, Some(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_are_made_safe() {
        assert_eq!(safe_name("hello.txt"), "hello.txt");
        assert_eq!(safe_name("<script>.html"), "_script_.html");
        assert_eq!(safe_name("a\"b\r\nc"), "a_b__c");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("..."), "download");
        assert_eq!(safe_name("ü"), "_");
        assert_eq!(safe_name(&"x".repeat(500)).len(), 100);
    }
}
