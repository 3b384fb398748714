//! The website: server-rendered pages (askama templates in `server/templates/`, escaped by
//! default) on the same records as the API, for the people who use the farm: submitters
//! following their builds, volunteers looking at their runners, operators looking after it.
//!
//! Everything a job controls (its name, its console, its output's file names) is a stranger's:
//! templates escape it, the console goes through [`construir_api::console`], downloads are
//! attachments. Every page carries a Content-Security-Policy without inline scripts; every form
//! a CSRF token ([`session`]); a session is an HttpOnly, SameSite cookie. The pages work without
//! JavaScript; `static/live.js` (the only script) follows a running job's console.

pub mod admin;
pub mod console_page;
pub mod farm;
pub mod forms;
pub mod jobs;
pub mod limits;
pub mod session;
pub mod submit;
pub mod timeline;

use crate::http::Refusal;
use crate::service::Shared;
use askama::Template;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

/// The policy on every page: scripts and styles from this server only, nothing inline, no
/// frames, forms that post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The largest form body taken (a sign-in, a token's name); the submit form has its own.
pub const FORM_LIMIT: usize = 16 << 10;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { Redirect::to("jobs") }))
        .route("/static/site.css", get(site_css))
        .route("/static/live.js", get(live_js))
        .merge(jobs::routes())
        .merge(forms::routes())
        .merge(farm::routes())
        .merge(admin::routes())
        .merge(submit::routes())
        .fallback(no_such_page)
        .layer(axum::extract::DefaultBodyLimit::max(FORM_LIMIT))
        .layer(middleware::from_fn(page_headers))
}

/// A path that is no page (nor an API endpoint: those answer JSON under `/api/v1/`).
async fn no_such_page(visitor: session::Visitor) -> WebError {
    WebError::new(
        StatusCode::NOT_FOUND,
        "there is no such page",
        &visitor.chrome("Not found"),
    )
}

/// The headers every page and download carries.
async fn page_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Pages carry a session's CSRF token, private jobs, tokens just made: no cache keeps them
    // (the static files say otherwise for themselves).
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn site_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../static/site.css"),
    )
}

async fn live_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../static/live.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// What every page's frame shows: the title, who is signed in, the token its forms carry.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    pub title: String,
    /// Where the site lives (`""` at the root, `/farm` behind a proxy's path).
    pub base: String,
    pub user: Option<String>,
    pub admin: bool,
    /// The CSRF token this page's forms carry.
    pub csrf: String,
    pub open_signup: bool,
}

/// A page that could not be shown: its status and why, as a page.
#[derive(Debug)]
pub struct WebError {
    pub status: StatusCode,
    pub message: String,
    /// Boxed: a refusal travels in every handler's `Result`.
    pub chrome: Box<Chrome>,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    chrome: &'a Chrome,
    status: u16,
    message: &'a str,
}

impl WebError {
    pub fn new(status: StatusCode, message: impl Into<String>, chrome: &Chrome) -> Self {
        WebError {
            status,
            message: message.into(),
            chrome: Box::new(Chrome {
                title: status.canonical_reason().unwrap_or("Refused").to_string(),
                ..chrome.clone()
            }),
        }
    }

    /// The API's refusal, as a page.
    pub fn from_refusal(r: Refusal, chrome: &Chrome) -> Self {
        let status =
            StatusCode::from_u16(r.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        WebError::new(status, r.0.message, chrome)
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let page = ErrorPage {
            chrome: &self.chrome,
            status: self.status.as_u16(),
            message: &self.message,
        };
        match page.render() {
            Ok(html) => (self.status, Html(html)).into_response(),
            Err(e) => {
                tracing::error!("rendering an error page: {e}");
                (self.status, self.message).into_response()
            }
        }
    }
}

/// `template` as an HTML page, or a 500 page saying it could not be drawn.
pub fn render(template: &impl Template, chrome: &Chrome) -> Result<Response, WebError> {
    template
        .render()
        .map(|h| Html(h).into_response())
        .map_err(|e| {
            tracing::error!("rendering a page: {e}");
            WebError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be drawn",
                chrome,
            )
        })
}

/// `ms` (Unix milliseconds) as `2026-12-02 06:12:47 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A span of milliseconds for a person: `850 ms`, `42 s`, `3 min 5 s`, `2 h 7 min`.
pub fn span(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms} ms"),
        1000..60_000 => format!("{} s", ms / 1000),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// A byte count for a person: `512 B`, `3.2 KiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_sizes_and_spans_read_as_people_write_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_795_939_967_000), "2026-11-29 08:12:47 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(span(850), "850 ms");
        assert_eq!(span(42_000), "42 s");
        assert_eq!(span(185_000), "3 min 5 s");
        assert_eq!(span(7_620_000), "2 h 7 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3277), "3.2 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
