//! Images served by the server, by digest: `construir-server image publish INDEX` stores an
//! image's kernel, qcow2 and manifest (from the images directory `image/build` fills) as blobs
//! and records them; `GET /api/v1/images` lists them; a job is pinned at submit to its index's
//! current digest ([`Db::current_image`]); runners fetch the three parts by digest from
//! `GET /api/v1/images/{digest}/{part}` ([`part`]), resumably (HTTP ranges).
//!
//! **The digest** of an image is the sha256 of its manifest file's bytes. The manifest names the
//! kernel's and the qcow2's sha256 (`kernel_sha256`, `disk_sha256`), and publishing refuses an
//! image whose kernel or qcow2 blob (hashed by the server while it is written) differs from what
//! the manifest says, so the digest pins all three: one manifest digest, one kernel, one qcow2.
//!
//! The manifest is checked as the contract checks it ([`ImageManifest::check`]: plain file
//! names, sha256s, capped sizes, its index matching its file name), read at most
//! [`MAX_MANIFEST_BYTES`]; the kernel is capped at [`MAX_KERNEL_BYTES`] and the qcow2 file by the
//! virtual size it declares ([`max_qcow2_bytes`]): the contract's caps, which runners apply to
//! what they download too.
//!
//! Rows are never deleted: a new build of an index becomes its current digest, older digests stay
//! listed and their blobs stay named (`retention::referenced`).

use crate::blobs::{BlobError, Blobs, Received};
use crate::db::{Db, DbError, now_ms};
use crate::http::{Caller, Refusal};
use crate::service::Shared;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use construir_api::types::ImageView;
use construir_api::{ApiError, codes};
use construir_contract::manifest::{
    ImageManifest, MAX_KERNEL_BYTES, MAX_MANIFEST_BYTES, ManifestError, max_qcow2_bytes,
    valid_index, valid_sha256,
};
use sqlx::Row;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use tokio::io::AsyncReadExt;
use tower::ServiceExt;

/// The header naming the sha256 of the bytes a blob answer carries (the whole blob's, also on a
/// range), as the job output's answer has it.
pub const SHA256_HEADER: &str = "Construir-Sha256";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("image {index}: {reason}")]
    Refused { index: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ImageError {
    fn from(e: sqlx::Error) -> Self {
        ImageError::Db(e.into())
    }
}

/// What [`publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub digest: String,
    /// False: these bits were published already and were the index's current digest (nothing
    /// changed).
    pub changed: bool,
}

/// Reads image `index`'s manifest from `dir` (checked), stores its kernel, qcow2 and manifest as
/// blobs and makes its digest the index's current one.
pub async fn publish(
    db: &Db,
    blobs: &Blobs,
    dir: &Path,
    index: &str,
) -> Result<Published, ImageError> {
    if !valid_index(index) {
        return Err(ManifestError::BadIndex(index.to_string()).into());
    }
    let path = dir.join(format!("{index}.json"));
    // The bytes are read once: what is checked is what is hashed and stored.
    let bytes = read_manifest(&path, index, dir).await?;
    let manifest: ImageManifest =
        serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
            path: path.clone(),
            source,
        })?;
    let invalid = |reason: String| ManifestError::Invalid {
        path: path.clone(),
        reason,
    };
    manifest.check().map_err(invalid)?;
    if manifest.index != index {
        return Err(invalid(format!(
            "it says it is image {:?}, but is named {index}.json",
            manifest.index
        ))
        .into());
    }
    let refused = |reason: String| ImageError::Refused {
        index: index.to_string(),
        reason,
    };
    let kernel = store_file(blobs, &dir.join(&manifest.kernel), MAX_KERNEL_BYTES, index).await?;
    if kernel.sha256 != manifest.kernel_sha256 {
        return Err(refused(format!(
            "the kernel {} has sha256 {}, but the manifest says {} (rebuild the image)",
            manifest.kernel, kernel.sha256, manifest.kernel_sha256
        )));
    }
    let qcow2 = store_file(
        blobs,
        &dir.join(&manifest.disk),
        max_qcow2_bytes(manifest.virtual_size),
        index,
    )
    .await?;
    if qcow2.sha256 != manifest.disk_sha256 {
        return Err(refused(format!(
            "the disk {} has sha256 {}, but the manifest says {} (rebuild the image)",
            manifest.disk, qcow2.sha256, manifest.disk_sha256
        )));
    }
    let mut writer = blobs.writer().await?;
    writer.write(&bytes).await?;
    let manifest_blob = writer.finish().await?;
    for blob in [&kernel, &qcow2, &manifest_blob] {
        blobs.publish(blob).await?;
    }
    let digest = manifest_blob.sha256.clone();
    let changed = db
        .record_image(index, &digest, &manifest_blob, &kernel, &qcow2, now_ms())
        .await?;
    Ok(Published { digest, changed })
}

async fn read_manifest(path: &Path, index: &str, dir: &Path) -> Result<Vec<u8>, ImageError> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ManifestError::Missing {
                index: index.to_string(),
                dir: dir.to_path_buf(),
            }
            .into());
        }
        Err(source) => {
            return Err(ImageError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ImageError::Refused {
            index: index.to_string(),
            reason: format!(
                "{} is larger than {MAX_MANIFEST_BYTES} bytes",
                path.display()
            ),
        });
    }
    Ok(bytes)
}

/// Streams `path` into a temporary blob, hashed on the way, refused past `limit` bytes.
async fn store_file(
    blobs: &Blobs,
    path: &Path,
    limit: u64,
    index: &str,
) -> Result<Received, ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
    let mut writer = blobs.writer().await?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(read_err)?;
        if n == 0 {
            break;
        }
        if writer.size() + n as u64 > limit {
            return Err(ImageError::Refused {
                index: index.to_string(),
                reason: format!("{} is larger than {limit} bytes", path.display()),
            });
        }
        writer.write(&buf[..n]).await?;
    }
    Ok(writer.finish().await?)
}

impl Db {
    /// Records a published image (once per digest) and makes it its index's current one. True
    /// if anything changed (a new digest, or an older one made current again).
    pub async fn record_image(
        &self,
        index: &str,
        digest: &str,
        manifest: &Received,
        kernel: &Received,
        qcow2: &Received,
        published_ms: i64,
    ) -> Result<bool, DbError> {
        let mut tx = self.pool().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO images (digest, image_index, manifest_sha256, manifest_size, \
             kernel_sha256, kernel_size, qcow2_sha256, qcow2_size, published_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (digest) DO NOTHING",
        )
        .bind(digest)
        .bind(index)
        .bind(&manifest.sha256)
        .bind(manifest.size as i64)
        .bind(&kernel.sha256)
        .bind(kernel.size as i64)
        .bind(&qcow2.sha256)
        .bind(qcow2.size as i64)
        .bind(published_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let current = sqlx::query(
            "INSERT INTO image_current (image_index, digest) VALUES ($1, $2) \
             ON CONFLICT (image_index) DO UPDATE SET digest = excluded.digest \
             WHERE image_current.digest <> excluded.digest",
        )
        .bind(index)
        .bind(digest)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(inserted > 0 || current > 0)
    }

    /// The digest image `index` is pinned to now, if it has been published.
    pub async fn current_image(&self, index: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query("SELECT digest FROM image_current WHERE image_index = $1")
            .bind(index)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Every published image, by index, newest first within each.
    pub async fn list_images(&self) -> Result<Vec<ImageView>, DbError> {
        let rows = sqlx::query(
            "SELECT i.image_index, i.digest, i.manifest_sha256, i.manifest_size, \
             i.kernel_sha256, i.kernel_size, i.qcow2_sha256, i.qcow2_size, i.published_ms, \
             CASE WHEN c.digest IS NULL THEN 0 ELSE 1 END AS current \
             FROM images i LEFT JOIN image_current c ON c.digest = i.digest \
             ORDER BY i.image_index, i.published_ms DESC, i.digest",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ImageView {
                    index: r.try_get(0)?,
                    digest: r.try_get(1)?,
                    manifest_sha256: r.try_get(2)?,
                    manifest_size: r.try_get::<i64, _>(3)? as u64,
                    kernel_sha256: r.try_get(4)?,
                    kernel_size: r.try_get::<i64, _>(5)? as u64,
                    qcow2_sha256: r.try_get(6)?,
                    qcow2_size: r.try_get::<i64, _>(7)? as u64,
                    published_ms: r.try_get::<i64, _>(8)? as u64,
                    current: r.try_get::<i64, _>(9)? != 0,
                })
            })
            .collect()
    }
}

/// The three parts of an image, as the blob path names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Manifest,
    Kernel,
    Disk,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Manifest, Part::Kernel, Part::Disk];

    pub fn name(self) -> &'static str {
        match self {
            Part::Manifest => "manifest",
            Part::Kernel => "kernel",
            Part::Disk => "disk",
        }
    }

    pub fn parse(name: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// A published image's blobs: each part's sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageBlobs {
    pub manifest: (String, u64),
    pub kernel: (String, u64),
    pub qcow2: (String, u64),
}

impl ImageBlobs {
    pub fn part(&self, part: Part) -> &(String, u64) {
        match part {
            Part::Manifest => &self.manifest,
            Part::Kernel => &self.kernel,
            Part::Disk => &self.qcow2,
        }
    }

    /// What a runner downloads and keeps of it: the three sizes together.
    pub fn total(&self) -> u64 {
        self.manifest
            .1
            .saturating_add(self.kernel.1)
            .saturating_add(self.qcow2.1)
    }
}

/// Images' total sizes by digest, for [`Db::image_bytes`]. One map for every database: a
/// digest's sizes are a function of its bytes (the digest pins the manifest, which pins the
/// kernel's and the qcow2's sha256s), so an entry can never be wrong for another server's
/// database either; only images found are kept (one not published yet may be soon).
static IMAGE_BYTES: LazyLock<Mutex<HashMap<String, u64>>> = LazyLock::new(Mutex::default);

/// The most digests [`IMAGE_BYTES`] keeps before it starts over (an image is published a few
/// times a year; this only bounds a memory that could otherwise grow without end).
const IMAGE_BYTES_KEPT: usize = 4096;

impl Db {
    /// The blobs of the image published under `digest`, if one is.
    pub async fn image_blobs(&self, digest: &str) -> Result<Option<ImageBlobs>, DbError> {
        let row = sqlx::query(
            "SELECT manifest_sha256, manifest_size, kernel_sha256, kernel_size, qcow2_sha256, \
             qcow2_size FROM images WHERE digest = $1",
        )
        .bind(digest)
        .fetch_optional(self.pool())
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        let size = |i| r.try_get::<i64, _>(i).map(|n| n.max(0) as u64);
        Ok(Some(ImageBlobs {
            manifest: (r.try_get(0)?, size(1)?),
            kernel: (r.try_get(2)?, size(3)?),
            qcow2: (r.try_get(4)?, size(5)?),
        }))
    }

    /// The total size (kernel, qcow2 and manifest) of the image published under `digest`, if
    /// one is: what a runner's cache must hold to fetch it. Cached, since a claim asks it for
    /// every pinned candidate job.
    pub async fn image_bytes(&self, digest: &str) -> Result<Option<u64>, DbError> {
        if let Some(n) = IMAGE_BYTES.lock().expect("image sizes").get(digest) {
            return Ok(Some(*n));
        }
        let Some(blobs) = self.image_blobs(digest).await? else {
            return Ok(None);
        };
        let total = blobs.total();
        let mut cache = IMAGE_BYTES.lock().expect("image sizes");
        if cache.len() >= IMAGE_BYTES_KEPT {
            cache.clear();
        }
        cache.insert(digest.to_string(), total);
        Ok(Some(total))
    }
}

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/images", get(list))
        .route("/images/{digest}/{part}", get(part))
}

#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses((status = 200, description = "the published images, by index, newest first within each; `current` marks what jobs submitted now are pinned to", body = Vec<ImageView>), (status = 400, description = "bad request", body = construir_api::ApiError), (status = 401, description = "no or bad token", body = construir_api::ApiError)),
    security(("token" = [])))]
pub async fn list(
    State(app): State<Shared>,
    _caller: Caller,
) -> Result<Json<Vec<ImageView>>, Refusal> {
    Ok(Json(app.db.list_images().await?))
}

/// The first characters of what a caller sent, for a message (quoted with `{:?}`, which
/// escapes what is not printable).
fn excerpt(text: &str) -> String {
    text.chars().take(80).collect()
}

#[utoipa::path(get, path = "/api/v1/images/{digest}/{part}", tag = "images",
    params(("digest" = String, Path, description = "the image's digest (the sha256 of its manifest)"),
        ("part" = String, Path, description = "`manifest`, `kernel` or `disk` (the qcow2)"),
        ("Range" = Option<String>, Header, description = "one range, `bytes=N-` or `bytes=N-M`, to resume a download")),
    responses((status = 200, description = "the part's bytes, with Content-Length and Construir-Sha256 (the part's sha256)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "the range asked for, with Content-Range (Construir-Sha256 is the whole part's)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 416, description = "a range past the part's end (Content-Range: bytes */SIZE), or several ranges", body = ApiError),
        (status = 403, description = "not a runner's (or an admin's) token", body = ApiError),
        (status = 404, description = "no image of that digest, or no such part", body = ApiError),
        (status = 401, description = "no or bad token", body = ApiError)),
    security(("token" = [])))]
pub async fn part(
    State(app): State<Shared>,
    caller: Caller,
    UrlPath((digest, part)): UrlPath<(String, String)>,
    request: Request,
) -> Result<Response, Refusal> {
    // Runners fetch images to run jobs; a submitter has no use for gigabytes of qcow2.
    if caller.0.role != "runner" && caller.0.role != "admin" {
        return Err(Refusal::new(
            codes::FORBIDDEN,
            "an image's parts are served to runners (a token of role runner or admin)",
        ));
    }
    let Some(which) = Part::parse(&part) else {
        return Err(Refusal::new(
            codes::NOT_FOUND,
            format!(
                "no part {:?} of an image: manifest, kernel or disk",
                excerpt(&part)
            ),
        ));
    };
    let blobs = if valid_sha256(&digest) {
        app.db.image_blobs(&digest).await?
    } else {
        None
    };
    let Some(blobs) = blobs else {
        return Err(Refusal::new(
            codes::NOT_FOUND,
            format!("no image published under digest {:?}", excerpt(&digest)),
        ));
    };
    let (sha256, size) = blobs.part(which).clone();
    // The local store's file (from S3, a kept copy), served with HTTP ranges (tower-http's
    // ServeFile: one range, 206, 416), so a runner resumes a broken download where it stopped.
    let lost = || {
        tracing::error!(
            "image {digest}: its {} blob {sha256} is missing from the blob store",
            which.name()
        );
        Refusal::new(
            codes::INTERNAL,
            format!("the server has lost image {digest}'s {}", which.name()),
        )
    };
    let file = match app.blobs.as_file(&sha256, true).await {
        Ok(f) => f.path().to_path_buf(),
        Err(BlobError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Err(lost()),
        Err(e) => {
            tracing::error!("image {digest}: its {} blob {sha256}: {e}", which.name());
            return Err(Refusal::new(
                codes::INTERNAL,
                "the server could not read the image; try again",
            ));
        }
    };
    let asked = request
        .headers()
        .get(header::RANGE)
        .map(|v| format!(" {:?}", excerpt(&String::from_utf8_lossy(v.as_bytes()))))
        .unwrap_or_default();
    let served = tower_http::services::ServeFile::new(&file)
        .oneshot(request)
        .await
        .map_err(|e| {
            tracing::error!("serving {}: {e}", file.display());
            Refusal::new(
                codes::INTERNAL,
                "the server could not read the image; try again",
            )
        })?;
    let mut response = match served.status() {
        StatusCode::NOT_FOUND => return Err(lost()),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // As an API error (the JSON body the API answers refusals with), keeping the
            // Content-Range that says the part's size.
            let range = served
                .headers()
                .get(header::CONTENT_RANGE)
                .cloned()
                .unwrap_or_else(|| {
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii")
                });
            let mut answer = (
                StatusCode::RANGE_NOT_SATISFIABLE,
                Json(ApiError::new(
                    codes::BAD_REQUEST,
                    format!(
                        "the range{asked} is not within image {digest}'s {} ({size} bytes; one \
                         range at a time)",
                        which.name()
                    ),
                )),
            )
                .into_response();
            answer.headers_mut().insert(header::CONTENT_RANGE, range);
            answer
        }
        _ => served.map(axum::body::Body::new),
    };
    response.headers_mut().insert(
        SHA256_HEADER,
        HeaderValue::from_str(&sha256).expect("a sha256 is ascii"),
    );
    Ok(response)
}
