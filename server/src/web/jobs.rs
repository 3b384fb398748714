//! `/jobs` (the list) and `/jobs/ID` (a job: its state, attempts and timeline, console, output
//! and verification), with cancel and resubmit for its owner.

use super::console_page;
use super::session::{CsrfForm, Visitor};
use super::timeline::{self, Row};
use super::{Chrome, WebError, bytes, render, span, utc};
use crate::access::{self, Viewer};
use crate::listing::JobFilter;
use crate::service::Shared;
use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use construir_api::console::{self, Segment};
use construir_api::state::Event;
use construir_api::types::{JobId, JobState, JobView};

/// Jobs on one page of the list.
pub const PAGE: i64 = 50;

/// The most output entries a job page lists (the whole output is a download).
pub const FILES_ON_PAGE: usize = 1000;

/// The most console bytes a job page shows (its tail; the whole log is a download).
pub const CONSOLE_ON_PAGE: u64 = 256 << 10;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(show))
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/resubmit", post(resubmit))
        .merge(console_page::routes())
}

#[derive(serde::Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    image: String,
    before: Option<u64>,
}

/// One row of the list.
pub struct ListRow {
    pub id: u64,
    pub name: String,
    pub state: &'static str,
    pub verification: String,
    pub image: String,
    pub owner: String,
    pub duration: String,
    pub runner: String,
    pub created: String,
    pub private: bool,
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct ListPage {
    chrome: Chrome,
    rows: Vec<ListRow>,
    /// The state filter's choices, and whether each is the one chosen.
    states: Vec<(&'static str, bool)>,
    owner: String,
    image: String,
    /// The next page's address, when there is one.
    next: Option<String>,
}

/// How far a job's result is vouched for, in words: `verified by 2`, `on standing`,
/// `unverified`, `self-attested`, `inconclusive`, or nothing before a result.
pub fn verification(v: &JobView) -> String {
    use construir_api::trust::Attestation;
    if v.state == JobState::Inconclusive {
        return "inconclusive".into();
    }
    match v.attestation {
        Some(Attestation::Verified) => format!("verified by {}", v.agreeing.len()),
        Some(Attestation::OnStanding) => "on standing".into(),
        Some(Attestation::Unverified) => "unverified".into(),
        Some(Attestation::SelfAttested) => "self-attested".into(),
        None => String::new(),
    }
}

fn parse_state(text: &str) -> Option<JobState> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
}

const STATES: [&str; 9] = [
    "queued",
    "running",
    "succeeded",
    "failed",
    "errored",
    "canceled",
    "expired",
    "inconclusive",
    "",
];

async fn list(
    State(app): State<Shared>,
    visitor: Visitor,
    Query(q): Query<ListQuery>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Jobs");
    let trimmed = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let filter = JobFilter {
        state: parse_state(q.state.trim()),
        owner: trimmed(&q.owner).filter(|o| o.len() <= 64),
        image: trimmed(&q.image).filter(|i| i.len() <= 16),
        before: q.before.map(JobId),
    };
    let listed = app
        .db
        .list_page(visitor.viewer(), &filter, PAGE + 1)
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    let more = listed.len() as i64 > PAGE;
    let now = crate::db::now_ms() as u64;
    let rows: Vec<ListRow> = listed
        .iter()
        .take(PAGE as usize)
        .map(|l| {
            let s = &l.job.snapshot;
            let view = s.view(l.job.facts.clone(), |_| Default::default());
            let first_start = s.attempts.iter().filter_map(|a| a.started_ms).min();
            let duration = first_start
                .map(|t| span(s.ended_ms.unwrap_or(now).saturating_sub(t)))
                .unwrap_or_default();
            let runner = s
                .attempts
                .last()
                .map(|a| format!("runner {}", a.runner))
                .unwrap_or_default();
            ListRow {
                id: l.job.facts.id.0,
                name: l.job.facts.name.clone(),
                state: s.state.as_str(),
                verification: verification(&view),
                image: l.job.facts.image.clone(),
                owner: l.owner_name.clone(),
                duration,
                runner,
                created: utc(s.created_ms),
                private: l.job.facts.private,
            }
        })
        .collect();
    let next = match (more, rows.last()) {
        (true, Some(last)) => {
            let mut url = format!("{}/jobs?before={}", chrome.base, last.id);
            for (k, v) in [
                ("state", &q.state),
                ("owner", &q.owner),
                ("image", &q.image),
            ] {
                if !v.trim().is_empty() {
                    url.push_str(&format!("&{k}={}", urlencode(v.trim())));
                }
            }
            Some(url)
        }
        _ => None,
    };
    let chosen = filter.state.map(|s| s.as_str()).unwrap_or_default();
    let page = ListPage {
        states: STATES.iter().map(|s| (*s, *s == chosen)).collect(),
        owner: filter.owner.unwrap_or_default(),
        image: filter.image.unwrap_or_default(),
        rows,
        next,
        chrome: chrome.clone(),
    };
    Ok((visitor.jar(), render(&page, &chrome)?).into_response())
}

/// `text` as a query value (RFC 3986 unreserved characters kept).
pub fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An attempt as the job page shows it.
pub struct AttemptRow {
    pub id: u64,
    pub runner: u64,
    pub owner: u64,
    pub state: String,
    pub why: String,
    pub vote: String,
    pub alone: String,
    pub claimed: String,
    pub took: String,
    pub signed: bool,
}

/// A file of the output.
pub struct FileRow {
    pub path: String,
    /// The download's address (files only).
    pub href: Option<String>,
    pub kind: String,
    pub size: String,
    pub mode: String,
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    chrome: Chrome,
    job: JobView,
    owner_name: String,
    state: &'static str,
    verification: String,
    mine: bool,
    live: bool,
    created: String,
    ended: String,
    attempts: Vec<AttemptRow>,
    rows: Vec<Row>,
    /// The attempt whose console is shown, the console's segments, and whether its head was cut.
    console_attempt: Option<u64>,
    console: Vec<Segment>,
    console_cut: bool,
    console_next: u64,
    files: Vec<FileRow>,
    output_size: String,
    files_note: String,
    agreeing: String,
}

async fn show(
    State(app): State<Shared>,
    visitor: Visitor,
    Path(id): Path<u64>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    let fail = |r: crate::http::Refusal| WebError::from_refusal(r, &chrome);
    let viewer = visitor.viewer();
    let job = access::seen_job(&app, viewer, JobId(id))
        .await
        .map_err(fail)?;
    let view = crate::api_jobs::view(&app, &job).await.map_err(fail)?;
    let owner_name = app
        .db
        .user_name(view.owner.0 as i64)
        .await
        .map_err(|e| fail(e.into()))?
        .unwrap_or_else(|| format!("user {}", view.owner));
    let now = crate::db::now_ms() as u64;
    let attempts = view
        .attempts
        .iter()
        .map(|a| AttemptRow {
            id: a.id.0,
            runner: a.runner.0,
            owner: a.runner_owner.0,
            state: a.state.to_string(),
            why: a.why.clone(),
            vote: a.vote.clone().unwrap_or_default(),
            alone: a.alone.clone().unwrap_or_default(),
            claimed: utc(a.claimed_ms),
            took: a
                .started_ms
                .map(|s| span(a.ended_ms.unwrap_or(now).saturating_sub(s)))
                .unwrap_or_default(),
            signed: a.signed,
        })
        .collect();
    let rows = timeline::rows(view.created_ms, view.ended_ms, &view.attempts, now);
    // The console of the result's attempt, else the latest.
    let shown = view.result_attempt.or(view.attempts.last().map(|a| a.id));
    let (console, console_cut, console_next) = match shown {
        Some(a) => {
            let tail = console_page::tail(&app, &job, a, CONSOLE_ON_PAGE)
                .await
                .map_err(fail)?;
            (console::render(&tail.bytes), tail.cut, tail.next)
        }
        None => (Vec::new(), false, 0),
    };
    let (files, files_note, output_size) = files_of(&app, &job, &view, &chrome.base).await;
    let agreeing = view
        .agreeing
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let page = JobPage {
        state: view.state.as_str(),
        verification: verification(&view),
        mine: viewer.may_change(&job.facts),
        live: !view.state.is_terminal(),
        created: utc(view.created_ms),
        ended: view.ended_ms.map(utc).unwrap_or_default(),
        owner_name,
        attempts,
        rows,
        console_attempt: shown.map(|a| a.0),
        console,
        console_cut,
        console_next,
        files,
        files_note,
        output_size,
        agreeing,
        job: view,
        chrome: chrome.clone(),
    };
    Ok((visitor.jar(), render(&page, &chrome)?).into_response())
}

/// The result's output files (from the server's own index), with download links for files.
async fn files_of(
    app: &Shared,
    job: &crate::jobs::StoredJob,
    view: &JobView,
    base: &str,
) -> (Vec<FileRow>, String, String) {
    let Some(result) = view.result_attempt else {
        return (Vec::new(), "no output yet".into(), String::new());
    };
    let size = view
        .attempts
        .iter()
        .find(|a| a.id == result)
        .and_then(|a| a.output_size);
    let Some(size) = size else {
        return (Vec::new(), "the result has no output".into(), String::new());
    };
    match console_page::output_index(app, result).await {
        Ok(Some(index)) => {
            let shown = index.entries.len().min(FILES_ON_PAGE);
            let more = index.entries.len() - shown;
            let files = index
                .entries
                .iter()
                .take(FILES_ON_PAGE)
                .map(|e| {
                    let file = matches!(e.kind, construir_contract::archive::EntryKind::File);
                    FileRow {
                        href: file.then(|| {
                            format!(
                                "{base}/jobs/{}/files/{}",
                                job.facts.id,
                                e.path
                                    .split('/')
                                    .map(urlencode)
                                    .collect::<Vec<_>>()
                                    .join("/")
                            )
                        }),
                        path: e.path.clone(),
                        kind: format!("{:?}", e.kind).to_lowercase(),
                        size: bytes(e.size),
                        mode: format!("{:04o}", e.mode),
                    }
                })
                .collect();
            let note = match more {
                0 => String::new(),
                n => format!(
                    "the first {shown} entries; {n} more are in the whole output and its index \
                     (GET /api/v1/jobs/{}/output/index)",
                    job.facts.id
                ),
            };
            (files, note, bytes(size))
        }
        Ok(None) => (
            Vec::new(),
            "the output is not an archive the server could read".into(),
            bytes(size),
        ),
        Err(e) => {
            tracing::error!("job {}: reading its output's index: {e:?}", job.facts.id);
            (
                Vec::new(),
                "the output's index could not be read".into(),
                bytes(size),
            )
        }
    }
}

async fn cancel(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    visitor.check_form(&headers, &form.csrf)?;
    visitor.signed_in()?;
    let fail = |r: crate::http::Refusal| WebError::from_refusal(r, &chrome);
    access::owned_job(&app, visitor.viewer(), JobId(id))
        .await
        .map_err(fail)?;
    app.apply(JobId(id), |_| Event::Cancel)
        .await
        .map_err(|e| fail(e.into()))?;
    tracing::info!(
        "job {id} canceled on the website by {}",
        visitor.session.as_ref().map_or("?", |s| s.user.as_str())
    );
    Ok(Redirect::to(&visitor.link(&format!("/jobs/{id}"))).into_response())
}

async fn resubmit(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome(format!("Job {id}"));
    visitor.check_form(&headers, &form.csrf)?;
    let session = visitor.signed_in()?;
    let fail = |r: crate::http::Refusal| WebError::from_refusal(r, &chrome);
    let job = access::owned_job(&app, visitor.viewer(), JobId(id))
        .await
        .map_err(fail)?;
    let new = crate::api_jobs::resubmit(
        &app,
        &job,
        construir_api::types::UserId(session.user_id as u64),
    )
    .await
    .map_err(fail)?;
    Ok(Redirect::to(&visitor.link(&format!("/jobs/{}", new.0))).into_response())
}

/// A 404 page for what a viewer may not see (or that is not there).
pub fn not_found(what: &str, chrome: &Chrome) -> WebError {
    WebError::new(StatusCode::NOT_FOUND, format!("no {what}"), chrome)
}

/// Whether `viewer` may see job `id` (for the downloads and the live console).
pub async fn seen(
    app: &Shared,
    viewer: Viewer,
    id: u64,
    chrome: &Chrome,
) -> Result<crate::jobs::StoredJob, WebError> {
    access::seen_job(app, viewer, JobId(id))
        .await
        .map_err(|r| WebError::from_refusal(r, chrome))
}
