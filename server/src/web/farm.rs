//! `/runners` and `/images`: the farm's runners (who lends them, whether they are online, what
//! they run now, how their votes fared, a revoke button for their owner) and its published images
//! (digests, sizes, the packages each manifest says are installed).
//!
//! Runner names, user names and package strings are strangers' text: the templates escape them,
//! and nothing here marks any of it safe.

use super::jobs::urlencode;
use super::session::{CsrfForm, Visitor};
use super::{Chrome, WebError, bytes, render, utc};
use crate::service::Shared;
use askama::Template;
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use construir_api::trust::key_id;
use construir_api::types::{ImageView, RunnerId, UserId};
use construir_contract::manifest::{ImageManifest, MAX_MANIFEST_BYTES};
use futures::StreamExt;
use std::collections::HashMap;

/// A runner seen this recently is online.
pub const ONLINE_MS: u64 = 2 * 60 * 1000;

/// The most of an image's packages its page lists.
pub const PACKAGES_SHOWN: usize = 2000;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/runners", get(runners))
        .route("/runners/{id}/revoke", post(revoke))
        .route("/images", get(images))
}

/// A runner as `/runners` lists it.
pub struct RunnerRow {
    pub id: u64,
    pub name: String,
    pub owner: String,
    /// The owner's jobs (`/jobs?owner=NAME`, under the site's base).
    pub owner_href: String,
    pub online: bool,
    pub revoked: bool,
    pub last_seen: String,
    /// Its live attempts' jobs: the id of one the viewer may see, none for a private one.
    pub running: Vec<Option<u64>>,
    pub done: u64,
    pub agreed_in_row: u64,
    pub agreed: u64,
    pub disagreed: u64,
    /// Its public key's id ([`key_id`]: what `construir verify` names a runner's key by); empty
    /// without a key.
    pub key_id: String,
    /// The viewer may revoke it (its owner, or an admin) and it is not revoked yet.
    pub revocable: bool,
}

#[derive(Template)]
#[template(path = "runners.html")]
struct RunnersPage {
    chrome: Chrome,
    rows: Vec<RunnerRow>,
    /// The command a volunteer runs (for a signed-in viewer only).
    command: Option<String>,
}

async fn runners(State(app): State<Shared>, visitor: Visitor) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Runners");
    let fail = |e: crate::db::DbError| WebError::from_refusal(e.into(), &chrome);
    let viewer = visitor.viewer();
    let listed = app.db.list_runners().await.map_err(fail)?;
    let mut running: HashMap<RunnerId, Vec<Option<u64>>> = HashMap::new();
    for live in app.db.farm_live_attempts().await.map_err(fail)? {
        let seen = viewer.may_see(&live.job).then_some(live.job.id.0);
        running.entry(live.runner).or_default().push(seen);
    }
    let done = app.db.farm_reported_counts().await.map_err(fail)?;
    let now = crate::db::now_ms().max(0) as u64;
    let rows = listed
        .into_iter()
        .map(|r| RunnerRow {
            id: r.id.0,
            owner_href: format!("{}/jobs?owner={}", chrome.base, urlencode(&r.owner_name)),
            online: !r.revoked && now.saturating_sub(r.last_seen_ms) <= ONLINE_MS,
            last_seen: utc(r.last_seen_ms),
            running: running.remove(&r.id).unwrap_or_default(),
            done: done.get(&r.id).copied().unwrap_or(0),
            agreed_in_row: r.standing.agreed_in_row,
            agreed: r.standing.agreed,
            disagreed: r.standing.disagreed,
            key_id: r.public_key.as_deref().map(key_id).unwrap_or_default(),
            revocable: !r.revoked && (viewer.admin || viewer.user == Some(r.owner)),
            revoked: r.revoked,
            name: r.name,
            owner: r.owner_name,
        })
        .collect();
    let command = visitor.session.as_ref().map(|_| {
        format!(
            "construir-runner --server {} --token-file runner.token",
            app.settings.public_url
        )
    });
    let page = RunnersPage {
        chrome: chrome.clone(),
        rows,
        command,
    };
    Ok((visitor.jar(), render(&page, &chrome)?).into_response())
}

async fn revoke(
    State(app): State<Shared>,
    visitor: Visitor,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Runners");
    visitor.check_form(&headers, &form.csrf)?;
    let session = visitor.signed_in()?;
    let fail = |r: crate::http::Refusal| WebError::from_refusal(r, &chrome);
    // An admin revokes any runner; anyone else only their own (another's is not there for them).
    let owner = (!session.is_admin()).then_some(UserId(session.user_id as u64));
    let done = app
        .db
        .revoke_runner(RunnerId(id), owner)
        .await
        .map_err(|e| fail(e.into()))?;
    if !done {
        return Err(WebError::new(
            StatusCode::NOT_FOUND,
            format!("you have no runner {id}"),
            &chrome,
        ));
    }
    tracing::info!("runner {id} revoked on the website by {}", session.user);
    crate::runners::tell_revoked(&app, RunnerId(id))
        .await
        .map_err(fail)?;
    Ok(Redirect::to(&visitor.link("/runners")).into_response())
}

/// A published image as `/images` shows it.
pub struct ImageRow {
    pub digest: String,
    pub current: bool,
    pub published: String,
    pub kernel: String,
    pub qcow2: String,
    pub manifest: String,
    /// What its manifest says it is for.
    pub description: String,
    /// Its first [`PACKAGES_SHOWN`] installed packages, and how many it lists in all.
    pub packages: Vec<String>,
    pub package_count: usize,
    /// Why its manifest could not be read, if it could not.
    pub problem: String,
}

/// The digests of one index, newest first.
pub struct IndexGroup {
    pub index: String,
    pub images: Vec<ImageRow>,
}

#[derive(Template)]
#[template(path = "images.html")]
struct ImagesPage {
    chrome: Chrome,
    groups: Vec<IndexGroup>,
}

async fn images(State(app): State<Shared>, visitor: Visitor) -> Result<Response, WebError> {
    let chrome = visitor.chrome("Images");
    let listed = app
        .db
        .list_images()
        .await
        .map_err(|e| WebError::from_refusal(e.into(), &chrome))?;
    // Listed by index, newest first within each.
    let mut groups: Vec<IndexGroup> = Vec::new();
    for image in listed {
        let row = image_row(&app, &image).await;
        match groups.last_mut() {
            Some(g) if g.index == image.index => g.images.push(row),
            _ => groups.push(IndexGroup {
                index: image.index,
                images: vec![row],
            }),
        }
    }
    let page = ImagesPage {
        chrome: chrome.clone(),
        groups,
    };
    Ok((visitor.jar(), render(&page, &chrome)?).into_response())
}

async fn image_row(app: &Shared, image: &ImageView) -> ImageRow {
    let (manifest, problem) = match read_manifest(app, &image.manifest_sha256).await {
        Ok(m) => (Some(m), String::new()),
        Err(why) => {
            tracing::warn!("image {}: its manifest: {why}", image.digest);
            (
                None,
                "its manifest could not be read (the server's log says why)".to_string(),
            )
        }
    };
    let (description, packages, package_count) = match manifest {
        Some(m) => {
            let count = m.installed.len();
            let mut installed = m.installed;
            installed.truncate(PACKAGES_SHOWN);
            (m.description, installed, count)
        }
        None => (String::new(), Vec::new(), 0),
    };
    ImageRow {
        digest: image.digest.clone(),
        current: image.current,
        published: utc(image.published_ms),
        kernel: bytes(image.kernel_size),
        qcow2: bytes(image.qcow2_size),
        manifest: bytes(image.manifest_size),
        description,
        packages,
        package_count,
        problem,
    }
}

/// The manifest blob `sha256`, read (at most [`MAX_MANIFEST_BYTES`]) and parsed.
async fn read_manifest(app: &Shared, sha256: &str) -> Result<ImageManifest, String> {
    let mut stream = app.blobs.read(sha256).await.map_err(|e| e.to_string())?;
    let mut json = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| e.to_string())?;
        json.extend_from_slice(&piece);
        if json.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(format!("it is over {MAX_MANIFEST_BYTES} bytes"));
        }
    }
    serde_json::from_slice(&json).map_err(|e| format!("it is not a manifest ({e})"))
}
