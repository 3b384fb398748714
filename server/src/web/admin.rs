//! `/admin`: an operator's page (delete a job and its blobs, ban a user or a runner, the users
//! at a glance). For admin sessions only: to anyone else `/admin` and its forms' addresses are
//! the same 404 as a page that does not exist, whatever the method, before anything else is
//! looked at. Every form carries the session's CSRF token; an action answers with a 303 back
//! to `/admin?done=…` (the result line, escaped like any text) or an error page.

use super::jobs::urlencode;
use super::session::Visitor;
use super::{Chrome, WebError, render, utc};
use crate::accounts::Session;
use crate::deletion::{self, BanError, DeleteError, Deletion};
use crate::service::Shared;
use askama::Template;
use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use construir_api::types::{JobId, RunnerId};

/// Users the page lists at most.
pub const USERS: i64 = 1000;

/// The longest result line shown (it comes back in the address).
const DONE_CHARS: usize = 300;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin", get(admin_page).fallback(no_page))
        .route("/admin/jobs/delete", post(delete_job).fallback(no_page))
        .route("/admin/users/ban", post(ban_user).fallback(no_page))
        .route(
            "/admin/runners/revoke",
            post(revoke_runner).fallback(no_page),
        )
}

/// What the site answers for an address that is no page (the site's own fallback's words).
fn not_a_page(visitor: &Visitor) -> WebError {
    WebError::new(
        StatusCode::NOT_FOUND,
        "there is no such page",
        &visitor.chrome("Not found"),
    )
}

async fn no_page(visitor: Visitor) -> WebError {
    not_a_page(&visitor)
}

/// The visitor's session if it is an admin's; else the 404 of a page that does not exist.
fn admin_of(visitor: &Visitor) -> Result<&Session, WebError> {
    visitor
        .session
        .as_ref()
        .filter(|s| s.is_admin())
        .ok_or_else(|| not_a_page(visitor))
}

/// A user as the page lists them.
pub struct UserLine {
    pub id: i64,
    pub name: String,
    pub admin: bool,
    pub banned: String,
    pub created: String,
    pub jobs: i64,
    pub runners: i64,
}

#[derive(Template)]
#[template(path = "admin.html")]
struct AdminPage {
    chrome: Chrome,
    done: String,
    users: Vec<UserLine>,
    /// More users than the page lists.
    cut: bool,
}

#[derive(serde::Deserialize)]
struct DoneQuery {
    #[serde(default)]
    done: String,
}

async fn admin_page(
    State(app): State<Shared>,
    visitor: Visitor,
    query: Result<Query<DoneQuery>, QueryRejection>,
) -> Result<Response, WebError> {
    admin_of(&visitor)?;
    let chrome = visitor.chrome("Admin");
    let done = query
        .map(|Query(q)| q.done)
        .unwrap_or_default()
        .chars()
        .take(DONE_CHARS)
        .collect();
    let mut users = app
        .db
        .users_overview(USERS + 1)
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    let cut = users.len() as i64 > USERS;
    users.truncate(USERS as usize);
    let page = AdminPage {
        done,
        users: users
            .into_iter()
            .map(|u| UserLine {
                id: u.id,
                name: u.name,
                admin: u.admin,
                banned: u.banned_ms.map(|t| utc(t as u64)).unwrap_or_default(),
                created: utc(u.created_ms as u64),
                jobs: u.jobs,
                runners: u.runners,
            })
            .collect(),
        cut,
        chrome: chrome.clone(),
    };
    let mut r = render(&page, &chrome)?;
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((visitor.jar(), r).into_response())
}

/// A 303 back to the page, with `line` as its result.
fn done(visitor: &Visitor, line: &str) -> Response {
    let line: String = line.chars().take(DONE_CHARS).collect();
    Redirect::to(&format!(
        "{}?done={}",
        visitor.link("/admin"),
        urlencode(&line)
    ))
    .into_response()
}

/// The form, or a page saying why it could not be read.
fn form_of<T>(form: Result<Form<T>, FormRejection>, chrome: &Chrome) -> Result<T, WebError> {
    form.map(|Form(f)| f)
        .map_err(|e| WebError::new(e.status(), e.body_text(), chrome))
}

/// An id typed in a form.
fn id_of(text: &str, what: &str, chrome: &Chrome) -> Result<u64, WebError> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= i64::MAX as u64)
        .ok_or_else(|| {
            WebError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("a {what} id is a number: nothing was done"),
                chrome,
            )
        })
}

#[derive(serde::Deserialize)]
struct DeleteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    sure: String,
}

async fn delete_job(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    form: Result<Form<DeleteForm>, FormRejection>,
) -> Result<Response, WebError> {
    let session = admin_of(&visitor)?;
    let chrome = visitor.chrome("Admin");
    let form = form_of(form, &chrome)?;
    visitor.check_form(&headers, &form.csrf)?;
    let id = id_of(&form.id, "job", &chrome)?;
    if form.sure.is_empty() {
        return Err(WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("tick “I am sure” to delete job {id}: nothing was deleted"),
            &chrome,
        ));
    }
    let fail = |status: StatusCode, message: String| WebError::new(status, message, &chrome);
    match deletion::delete_job(&app, JobId(id), &session.user).await {
        Ok(Deletion::Deleted { named, gone }) => {
            let line = if gone == named {
                format!("job {id} deleted, and the {named} blobs it named with it")
            } else {
                format!(
                    "job {id} deleted; {gone} of the {named} blobs it named removed now, the \
                     others (another job's, or published within the last hour) are left to the \
                     housekeeping"
                )
            };
            Ok(done(&visitor, &line))
        }
        Ok(Deletion::Gone { at_ms }) => Err(fail(
            StatusCode::GONE,
            format!(
                "job {id} is gone: it was deleted at {}",
                utc(at_ms.max(0) as u64)
            ),
        )),
        Err(DeleteError::NoJob(_)) => Err(fail(StatusCode::NOT_FOUND, format!("no job {id}"))),
        Err(e @ DeleteError::Contended(_)) => Err(fail(StatusCode::CONFLICT, e.to_string())),
        Err(DeleteError::Db(e)) => Err(WebError::from_refusal(e.into(), &chrome)),
    }
}

#[derive(serde::Deserialize)]
struct BanForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

async fn ban_user(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    form: Result<Form<BanForm>, FormRejection>,
) -> Result<Response, WebError> {
    let session = admin_of(&visitor)?;
    let chrome = visitor.chrome("Admin");
    let form = form_of(form, &chrome)?;
    visitor.check_form(&headers, &form.csrf)?;
    let name = form.name.trim();
    if name.is_empty() {
        return Err(WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "give the name of the user to ban",
            &chrome,
        ));
    }
    match deletion::ban_user(&app, name, session.user_id).await {
        Ok(b) => {
            tracing::info!("user {name} banned on the website by {}", session.user);
            let line = if b.now {
                format!(
                    "user {name} banned; {} runners of theirs revoked",
                    b.runners
                )
            } else {
                format!(
                    "user {name} was banned already; their {} runners are revoked",
                    b.runners
                )
            };
            Ok(done(&visitor, &line))
        }
        Err(BanError::NoUser(_)) => Err(WebError::new(
            StatusCode::NOT_FOUND,
            format!("no user {name}"),
            &chrome,
        )),
        Err(e @ BanError::Yourself) => Err(WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            e.to_string(),
            &chrome,
        )),
        Err(BanError::Db(e)) => Err(WebError::from_refusal(e.into(), &chrome)),
    }
}

#[derive(serde::Deserialize)]
struct RevokeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    id: String,
}

async fn revoke_runner(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    form: Result<Form<RevokeForm>, FormRejection>,
) -> Result<Response, WebError> {
    let session = admin_of(&visitor)?;
    let chrome = visitor.chrome("Admin");
    let form = form_of(form, &chrome)?;
    visitor.check_form(&headers, &form.csrf)?;
    let id = id_of(&form.id, "runner", &chrome)?;
    let revoked = deletion::revoke_runner(&app, RunnerId(id))
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    if !revoked {
        return Err(WebError::new(
            StatusCode::NOT_FOUND,
            format!("no runner {id}"),
            &chrome,
        ));
    }
    tracing::info!("runner {id} revoked on the website by {}", session.user);
    Ok(done(&visitor, &format!("runner {id} revoked")))
}
