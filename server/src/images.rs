//! Images served by the server, by digest: `construir-server image publish INDEX` stores an
//! image's kernel, qcow2 and manifest (from the images directory `image/build` fills) as blobs
//! and records them; `GET /api/v1/images` lists them; a job is pinned at submit to its index's
//! current digest ([`Db::current_image`]).
//!
//! **The digest** of an image is the sha256 of its manifest file's bytes. The manifest names the
//! kernel's and the qcow2's sha256 (`kernel_sha256`, `disk_sha256`), and publishing refuses an
//! image whose kernel or qcow2 blob (hashed by the server while it is written) differs from what
//! the manifest says, so the digest pins all three: one manifest digest, one kernel, one qcow2.
//!
//! The manifest is checked as the contract checks it ([`ImageManifest::check`]: plain file
//! names, sha256s, capped sizes, its index matching its file name), read at most
//! [`MAX_MANIFEST_BYTES`]; the kernel is capped at [`MAX_KERNEL_BYTES`] and the qcow2 file by the
//! virtual size it declares ([`max_qcow2_bytes`]).
//!
//! Rows are never deleted: a new build of an index becomes its current digest, older digests stay
//! listed and their blobs stay named (`retention::referenced`).

use crate::blobs::{BlobError, Blobs, Received};
use crate::db::{Db, DbError, now_ms};
use crate::http::{Caller, Refusal};
use crate::service::Shared;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use construir_api::types::ImageView;
use construir_contract::manifest::{ImageManifest, MAX_MANIFEST_BYTES, ManifestError, valid_index};
use sqlx::Row;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// Largest kernel file published (a vmlinux is tens of MiB).
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// Largest qcow2 file published for a declared virtual size: the virtual size, plus an eighth
/// and 64 MiB for qcow2's own tables (a fully allocated qcow2 is a little larger than its
/// virtual size; [`construir_contract::manifest::MAX_VIRTUAL_SIZE`] caps that).
pub fn max_qcow2_bytes(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 8)
        .saturating_add(64 << 20)
}

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

pub fn routes() -> Router<Shared> {
    Router::new().route("/images", get(list))
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
