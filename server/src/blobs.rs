//! Blobs — job files, outputs, finished consoles — content-addressed (`sha256/ab/abcdef…`) in an
//! object store: object_store's local file system under `DATA/blobs` by default, or an S3 bucket
//! (`--store s3://BUCKET`, shared by every server of a farm), the same code. An upload is streamed into a private temporary file under `DATA/tmp` while it is
//! hashed and counted (cut off past its limit), then published under its hash: a blob is visible
//! whole or not at all, and equal blobs are stored once. The server computes every digest itself.
//!
//! Several servers may share one data directory, so temporary files are named by their owner
//! (`PID-RANDOM.…`), and each owner holds a lock file `DATA/tmp-owners/PID-RANDOM.lock` while it
//! lives: at start a server removes only the temporary files of owners whose lock nobody holds.
//!
//! Publishing and removing a blob are serialised per name (striped locks, [`NameLocks`]): an
//! upload that finds its bytes there already marks them as just published under the lock, and
//! the collector looks at a blob's rows and time and removes it under the same lock, so an
//! upload either sees the blob fresh-marked before the collector's look (kept), or finds it gone
//! and writes it anew. The locks are this process's: several servers sharing one data directory
//! are not coordinated by them (an upload of bytes equal to an old orphan, in one server, while
//! another removes it, can still lose it; the hour of grace makes that rare, not impossible).

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    /// The local store's directory; None for S3.
    root: Option<PathBuf>,
    tmp: PathBuf,
    /// Where blobs that must be files (image parts, served with ranges) are copied from S3.
    cache: PathBuf,
    /// The S3 bucket; None for the local store.
    bucket: Option<String>,
    owner: Arc<TmpOwner>,
    names: Arc<NameLocks>,
    /// Held while a blob is copied from S3 into the cache ([`Blobs::as_file`]); apart from the
    /// name locks, which are never held across a transfer.
    copies: Arc<NameLocks>,
}

/// Locks on blob names, striped by the digest's first byte: held by [`Blobs::publish`] around
/// its look for an equal blob and its mark, and by [`Blobs::remove_unless_fresh_or_named`]
/// around its look at the rows, the blob's time and the removal. Never held while writing a new
/// blob (one not there yet is not the collector's) or across anything that waits on a client.
struct NameLocks(Vec<tokio::sync::Mutex<()>>);

impl NameLocks {
    fn new() -> NameLocks {
        NameLocks((0..256).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    fn of(&self, sha256: &str) -> &tokio::sync::Mutex<()> {
        let stripe = sha256
            .get(..2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
        &self.0[stripe as usize]
    }
}

/// This process's claim on its temporary files: the lock is held as long as the file is open
/// (the kernel drops it when the process dies, even by `kill -9`).
struct TmpOwner {
    name: String,
    lock_path: PathBuf,
    _lock: std::fs::File,
}

impl Drop for TmpOwner {
    fn drop(&mut self) {
        // The last handle of this store went away: its owner name is not needed any more.
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// A temporary file not written to for this long, and named by no owner, is a leftover (of a
/// server from before owner names); an upload in flight writes far more often.
const UNOWNED_TMP_AGE: Duration = Duration::from_secs(3600);

/// A staging file of the store's (`sha256/ab/<sha>#N`, renamed into place when its publication
/// ends) not written to for this long is what a server killed during a publication left.
pub const STAGING_AGE: Duration = Duration::from_secs(3600);

/// An upload of bytes already stored marks them as just published; in S3, which has no way to
/// touch an object, by writing them again, but only once they are older than this (well inside
/// the collector's hour of grace, `retention::ORPHAN_GRACE`: younger ones are fresh to it).
pub const REFRESH_AFTER: Duration = Duration::from_secs(1800);

/// An S3 location as given to `--store` (`s3://BUCKET` or `s3://BUCKET/PREFIX`); the endpoint,
/// region and keys come from the usual `AWS_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl(String);

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        let bucket = url
            .strip_prefix("s3://")
            .map(|rest| rest.split('/').next().unwrap_or(""));
        match bucket {
            Some(b) if !b.is_empty() => Ok(StoreUrl(url.trim_end_matches('/').to_string())),
            _ => Err(format!(
                "{url:?} is not an s3://BUCKET URL (leave --store out for the local directory)"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn bucket(&self) -> &str {
        let rest = self.0.strip_prefix("s3://").unwrap_or(&self.0);
        rest.split('/').next().unwrap_or(rest)
    }

    /// The path under the bucket every blob goes under (`s3://BUCKET/PREFIX`); empty for none.
    pub fn prefix(&self) -> &str {
        let rest = self.0.strip_prefix("s3://").unwrap_or(&self.0);
        rest.split_once('/')
            .map_or("", |(_, p)| p.trim_matches('/'))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the upload is larger than {limit} bytes")]
    TooBig { limit: u64 },
    #[error("the upload was cut short: {0}")]
    Body(String),
    #[error("blob storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("blob storage: {0}")]
    Store(#[from] object_store::Error),
}

/// An upload received whole into a temporary file (removed when this is dropped).
pub struct Received {
    pub file: tempfile::TempPath,
    pub sha256: String,
    pub size: u64,
}

/// A blob being written into a temporary file, hashed and counted on the way.
pub struct BlobWriter {
    file: tokio::fs::File,
    path: tempfile::TempPath,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        self.file.write_all(bytes).await?;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// On disk and hashed: ready to publish.
    pub async fn finish(mut self) -> Result<Received, BlobError> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        Ok(Received {
            file: self.path,
            sha256: crate::tokens::hex(&self.hasher.finalize()),
            size: self.size,
        })
    }
}

/// A blob as a file ([`Blobs::as_file`]): the store's own, or a temporary copy removed on drop.
pub enum BlobFile {
    Stored(PathBuf),
    Copy(tempfile::TempPath),
}

impl BlobFile {
    pub fn path(&self) -> &Path {
        match self {
            BlobFile::Stored(p) => p,
            BlobFile::Copy(t) => t,
        }
    }
}

/// A stored blob as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub sha256: String,
    pub size: u64,
    /// When it was last published (written, or found there already by an equal upload).
    pub modified_ms: i64,
}

impl Blobs {
    /// The store `--store` names (an S3 bucket), or the local one under `data` when it names
    /// none. Temporary files are under `data` either way.
    pub fn open(store: Option<&StoreUrl>, data: &Path) -> Result<Blobs, BlobError> {
        match store {
            None => Blobs::open_local(data),
            Some(url) => Blobs::open_s3(url, data),
        }
    }

    /// The local store under `data`.
    pub fn open_local(data: &Path) -> Result<Blobs, BlobError> {
        let root = data.join("blobs");
        std::fs::create_dir_all(&root)?;
        // fsync on publish: an acknowledged blob survives a power loss like its database row.
        let store = LocalFileSystem::new_with_prefix(&root)?.with_fsync(true);
        Blobs::with_store(Arc::new(store), Some(root), data)
    }

    /// The S3 bucket `url` names, its endpoint, region and keys from the `AWS_*` variables
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`;
    /// `AWS_ALLOW_HTTP=true` for a plain-http endpoint). A PUT in S3 is atomic: an object is
    /// visible whole or not at all, as a rename makes it in the local store.
    pub fn open_s3(url: &StoreUrl, data: &Path) -> Result<Blobs, BlobError> {
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(url.bucket())
            .build()?;
        // object_store takes only the bucket from a URL: the prefix is ours to apply, so that
        // two farms in one bucket never see (nor collect) each other's blobs.
        let store: Arc<dyn ObjectStore> = match url.prefix() {
            "" => Arc::new(store),
            prefix => Arc::new(object_store::prefix::PrefixStore::new(
                store,
                StorePath::from(prefix),
            )),
        };
        let mut blobs = Blobs::with_store(store, None, data)?;
        blobs.bucket = Some(url.bucket().to_string());
        Ok(blobs)
    }

    fn with_store(
        store: Arc<dyn ObjectStore>,
        root: Option<PathBuf>,
        data: &Path,
    ) -> Result<Blobs, BlobError> {
        let tmp = data.join("tmp");
        let owners = data.join("tmp-owners");
        let cache = data.join("blob-cache");
        std::fs::create_dir_all(&tmp)?;
        std::fs::create_dir_all(&owners)?;
        let owner = claim_tmp(&tmp, &owners)?;
        Ok(Blobs {
            store,
            root,
            tmp,
            cache,
            bucket: None,
            owner: Arc::new(owner),
            names: Arc::new(NameLocks::new()),
            copies: Arc::new(NameLocks::new()),
        })
    }

    /// Whether blobs are in S3 (not the local directory).
    pub fn is_s3(&self) -> bool {
        self.root.is_none()
    }

    /// The name this process's temporary files start with.
    pub fn tmp_owner(&self) -> &str {
        &self.owner.name
    }

    fn key(sha256: &str) -> StorePath {
        StorePath::from(format!(
            "sha256/{}/{sha256}",
            &sha256[..2.min(sha256.len())]
        ))
    }

    /// A new temporary blob file of this process's.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        let named = tempfile::Builder::new()
            .prefix(&format!("{}.upload-", self.owner.name))
            .tempfile_in(&self.tmp)?;
        let (std_file, path) = named.into_parts();
        Ok(BlobWriter {
            file: tokio::fs::File::from_std(std_file),
            path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Streams `body` into a temporary file, hashing it, refusing it once past `limit` bytes.
    pub async fn receive(&self, body: Body, limit: u64) -> Result<Received, BlobError> {
        let mut writer = self.writer().await?;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            if writer.size() + chunk.len() as u64 > limit {
                return Err(BlobError::TooBig { limit });
            }
            writer.write(&chunk).await?;
        }
        writer.finish().await
    }

    /// Publishes a received upload under its hash (once: an equal blob is already there).
    pub async fn publish(&self, received: &Received) -> Result<(), BlobError> {
        let key = Self::key(&received.sha256);
        {
            // Under the name's lock: the collector removes it before this look (written anew
            // below) or sees it marked (kept), never in between.
            let _name = self.names.of(&received.sha256).lock().await;
            if let Ok(meta) = self.store.head(&key).await {
                // Equal bytes are there already: mark them as just published, so the orphan
                // collector's grace (blobs no row names yet) counts from now, not from the
                // first upload; the caller's row is written right after this. Gone meanwhile
                // (another server's collector): written again below. In S3, written again
                // below unless recent enough to be fresh to the collector anyway.
                match &self.root {
                    Some(_) => match self.touch(&received.sha256) {
                        Ok(()) => return Ok(()),
                        Err(BlobError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    },
                    None => {
                        let age = SystemTime::now()
                            .duration_since(SystemTime::from(meta.last_modified))
                            .unwrap_or_default();
                        if age < REFRESH_AFTER {
                            return Ok(());
                        }
                    }
                }
            }
        }
        // Not there: written without the lock (a blob not there is nobody's to remove, and
        // once renamed into place its time is its writing's: fresh).
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new(upload);
        let mut file = tokio::fs::File::open(&received.file).await?;
        let mut buf = vec![0u8; 8 << 20];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // At most two parts in flight: the file is read no faster than it is written.
            writer.wait_for_capacity(2).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// Blob `sha256` as a file, for readers that need one (the output indexer; image parts,
    /// served with ranges): the local store's own file, or, from S3, a copy — temporary, or
    /// with `keep` one under `DATA/blob-cache` that later calls reuse. A copy is checked
    /// against the digest before it is used. NotFound (as [`BlobError::Io`]) if there is none.
    pub async fn as_file(&self, sha256: &str, keep: bool) -> Result<BlobFile, BlobError> {
        if self.root.is_some() {
            let path = self.local_path(sha256);
            if !tokio::fs::try_exists(&path).await? {
                return Err(std::io::Error::from(std::io::ErrorKind::NotFound).into());
            }
            return Ok(BlobFile::Stored(path));
        }
        let kept = self.cache.join(sha256);
        if keep && tokio::fs::try_exists(&kept).await? {
            return Ok(BlobFile::Stored(kept));
        }
        // One copy of a kept blob at a time (200 runners asking for a new image's disk at once
        // make one download, not 200): the others wait, then find it kept.
        let _copying = match keep {
            true => Some(self.copies.of(sha256).lock().await),
            false => None,
        };
        if keep && tokio::fs::try_exists(&kept).await? {
            return Ok(BlobFile::Stored(kept));
        }
        let mut writer = self.writer().await?;
        let mut stream = match self.read(sha256).await {
            Err(BlobError::Store(object_store::Error::NotFound { .. })) => {
                return Err(std::io::Error::from(std::io::ErrorKind::NotFound).into());
            }
            r => r?,
        };
        while let Some(chunk) = stream.next().await {
            writer.write(&chunk?).await?;
        }
        let copy = writer.finish().await?;
        if copy.sha256 != sha256 {
            return Err(std::io::Error::other(format!(
                "blob {sha256} in the store has other bytes (sha256 {})",
                copy.sha256
            ))
            .into());
        }
        if !keep {
            return Ok(BlobFile::Copy(copy.file));
        }
        tokio::fs::create_dir_all(&self.cache).await?;
        copy.file
            .persist(&kept)
            .map_err(|e| BlobError::Io(e.error))?;
        Ok(BlobFile::Stored(kept))
    }

    fn local_path(&self, sha256: &str) -> PathBuf {
        self.root
            .as_deref()
            .unwrap_or(&self.cache)
            .join(Self::key(sha256).as_ref())
    }

    /// The directory the store's objects are files in: the local store's, or the test S3
    /// server's bucket (s3s-fs keeps an object as a file, its time the object's; see
    /// test_backends). For tests that age or damage a blob on purpose.
    #[cfg(test)]
    pub fn files_root(&self) -> PathBuf {
        match (&self.root, &self.bucket) {
            (Some(root), _) => root.clone(),
            (None, bucket) => PathBuf::from(
                std::env::var("CONSTRUIR_TEST_S3_ROOT").expect("the test S3 server's root"),
            )
            .join(bucket.as_deref().unwrap_or_default()),
        }
    }

    /// Where blob `sha256` is a file (see [`Blobs::files_root`]).
    #[cfg(test)]
    pub fn local_file(&self, sha256: &str) -> PathBuf {
        self.files_root().join(Self::key(sha256).as_ref())
    }

    fn touch(&self, sha256: &str) -> Result<(), BlobError> {
        let file = std::fs::File::options()
            .write(true)
            .open(self.local_path(sha256))?;
        file.set_modified(SystemTime::now())?;
        Ok(())
    }

    /// The blob's bytes, streamed.
    pub async fn read(
        &self,
        sha256: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, object_store::Error>> + use<>, BlobError> {
        let result = self.store.get(&Self::key(sha256)).await?;
        Ok(result.into_stream().map_err(|e| e))
    }

    /// Bytes `range` of the blob (cut at its end).
    pub async fn read_range(&self, sha256: &str, range: Range<u64>) -> Result<Bytes, BlobError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        Ok(self.store.get_range(&Self::key(sha256), range).await?)
    }

    /// The blob as stored, if it is.
    pub async fn info(&self, sha256: &str) -> Result<Option<BlobInfo>, BlobError> {
        match self.store.head(&Self::key(sha256)).await {
            Ok(meta) => Ok(Some(BlobInfo {
                sha256: sha256.to_string(),
                size: meta.size,
                modified_ms: meta.last_modified.timestamp_millis(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored blob.
    pub async fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&StorePath::from("sha256")));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            // Only names this store gives: anything else (a staging file) is not a blob.
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(BlobInfo {
                    sha256: name.to_string(),
                    size: meta.size,
                    modified_ms: meta.last_modified.timestamp_millis(),
                });
            }
        }
        Ok(out)
    }

    /// Removes the blob unless it was published at or after `published_before_ms` (someone may
    /// be about to write the row naming it). Whether any row names it is the caller's check.
    /// True if it is gone.
    pub async fn remove_unless_fresh(
        &self,
        sha256: &str,
        published_before_ms: i64,
    ) -> Result<bool, BlobError> {
        self.remove_unless_fresh_or_named(sha256, published_before_ms, async { Ok(false) })
            .await
    }

    /// Removes the blob unless `named` (awaited under the name's lock) says a row names it, or
    /// it was published at or after `published_before_ms`. The time is looked at after the
    /// rows: an upload marks the blob as published before it commits the row naming it, so one
    /// whose row the look missed shows a fresh time here (or waits for the lock, and finds the
    /// blob gone and writes it anew). True if it is gone.
    pub async fn remove_unless_fresh_or_named<E: From<BlobError>>(
        &self,
        sha256: &str,
        published_before_ms: i64,
        named: impl Future<Output = Result<bool, E>>,
    ) -> Result<bool, E> {
        let _name = self.names.of(sha256).lock().await;
        if named.await? {
            return Ok(false);
        }
        match self.info(sha256).await? {
            None => Ok(true),
            Some(b) if b.modified_ms >= published_before_ms => Ok(false),
            Some(_) => match self.store.delete(&Self::key(sha256)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(BlobError::from(e).into()),
            },
        }
    }

    /// Removes the store's staging files (`sha256/ab/<sha>#N`) not written to for `age`: what
    /// publications cut short by a kill left (a live one writes far more often; one of another
    /// server on this data directory too). Returns how many.
    pub async fn remove_stale_staging(&self, age: Duration) -> Result<usize, BlobError> {
        // S3 has no staging objects: an upload cut short is an incomplete multipart upload,
        // invisible, and removed by the bucket's lifecycle rule (docs/operations.md).
        let Some(root) = &self.root else {
            return Ok(0);
        };
        let root = root.join("sha256");
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
            let mut removed = 0;
            let Ok(dirs) = std::fs::read_dir(&root) else {
                return Ok(0);
            };
            for dir in dirs.flatten() {
                let Ok(files) = std::fs::read_dir(dir.path()) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    let name = name.to_string_lossy();
                    let staging = name.split_once('#').is_some_and(|(sha, n)| {
                        sha.len() == 64 && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
                    });
                    let old = f
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|t| t > age);
                    if staging && old && std::fs::remove_file(f.path()).is_ok() {
                        tracing::info!("removed {name}, a publication cut short");
                        removed += 1;
                    }
                }
            }
            Ok(removed)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(removed)
    }
}

/// Makes this process an owner of temporary files, and removes those of owners that are gone.
/// Both under `owners/.scan.lock`, so no scan sees an owner between its lock file's creation and
/// its lock.
fn claim_tmp(tmp: &Path, owners: &Path) -> Result<TmpOwner, BlobError> {
    let scan = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(owners.join(".scan.lock"))?;
    scan.lock()?;
    let random = crate::tokens::generate()?;
    let name = format!(
        "{}-{}",
        std::process::id(),
        &random[crate::tokens::PREFIX.len()..][..12]
    );
    let lock_path = owners.join(format!("{name}.lock"));
    let lock = std::fs::File::options()
        .create_new(true)
        .write(true)
        .open(&lock_path)?;
    lock.lock()?;
    let live = live_owners(owners, &name)?;
    for e in std::fs::read_dir(tmp)?.flatten() {
        let file_name = e.file_name();
        let file_name = file_name.to_string_lossy();
        let stale = match file_name.split_once('.') {
            Some((owner, _)) if owner.contains('-') => !live.iter().any(|l| l == owner),
            // A file of a server from before owner names: a leftover once it is not written.
            _ => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNOWNED_TMP_AGE),
        };
        if stale {
            tracing::info!(
                "removing {file_name}, left in the temporary directory by a dead server"
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(TmpOwner {
        name,
        lock_path,
        _lock: lock,
    })
}

/// The owners whose lock is held (by a live process); the lock files of the others are removed.
fn live_owners(owners: &Path, me: &str) -> Result<Vec<String>, BlobError> {
    let mut live = vec![me.to_string()];
    for e in std::fs::read_dir(owners)?.flatten() {
        let file_name = e.file_name();
        let Some(owner) = file_name.to_str().and_then(|n| n.strip_suffix(".lock")) else {
            continue;
        };
        if owner == me || owner.starts_with('.') {
            continue;
        }
        let Ok(file) = std::fs::File::options().write(true).open(e.path()) else {
            continue;
        };
        match file.try_lock() {
            Ok(()) => {
                // Nobody holds it: its owner is gone.
                let _ = std::fs::remove_file(e.path());
            }
            Err(_) => live.push(owner.to_string()),
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uploads_are_hashed_capped_published_once_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let data = vec![7u8; 3 << 20];
        let r = blobs
            .receive(Body::from(data.clone()), 4 << 20)
            .await
            .unwrap();
        assert_eq!(r.size, 3 << 20);
        assert_eq!(r.sha256, crate::tokens::hex(&Sha256::digest(&data)));
        blobs.publish(&r).await.unwrap();
        blobs.publish(&r).await.unwrap();
        let back: Vec<u8> = blobs
            .read(&r.sha256)
            .await
            .unwrap()
            .try_fold(Vec::new(), |mut v, b| async move {
                v.extend_from_slice(&b);
                Ok(v)
            })
            .await
            .unwrap();
        assert_eq!(back, data);
        let too_big = blobs.receive(Body::from(data.clone()), 1 << 20).await;
        assert!(matches!(too_big, Err(BlobError::TooBig { .. })));
        drop(r);
        assert_eq!(
            std::fs::read_dir(d.path().join("tmp")).unwrap().count(),
            0,
            "no temporary file is left"
        );
    }

    #[tokio::test]
    async fn two_servers_on_one_data_dir_keep_each_others_temporary_files() {
        let d = tempfile::tempdir().unwrap();
        let first = Blobs::open_local(d.path()).unwrap();
        let mut in_flight = first.writer().await.unwrap();
        in_flight.write(b"half an upload").await.unwrap();
        // A dead server's leftovers: its lock file, nobody holding it, and its upload.
        let owners = d.path().join("tmp-owners");
        std::fs::write(owners.join("999999-deadbeef0000.lock"), b"").unwrap();
        let dead = d.path().join("tmp/999999-deadbeef0000.upload-x");
        std::fs::write(&dead, b"lost").unwrap();
        // One of a server from before owner names: kept while fresh, removed once old.
        let fresh = d.path().join("tmp/upload-fresh");
        let old = d.path().join("tmp/upload-old");
        std::fs::write(&fresh, b"?").unwrap();
        std::fs::write(&old, b"?").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();

        let second = Blobs::open_local(d.path()).unwrap();
        assert_ne!(first.tmp_owner(), second.tmp_owner());
        assert!(!dead.exists(), "a dead owner's upload is removed");
        assert!(!owners.join("999999-deadbeef0000.lock").exists());
        assert!(!old.exists() && fresh.exists());
        let r = in_flight.finish().await.unwrap();
        assert!(
            r.file.exists(),
            "the live server's upload survives the other's start"
        );
        first.publish(&r).await.unwrap();
        assert_eq!(
            second.read_range(&r.sha256, 5..8).await.unwrap(),
            Bytes::from_static(b"an ")
        );
        // The first server gone (its lock released), the next start takes its files.
        let leftover = first.writer().await.unwrap().finish().await.unwrap();
        let leftover_path = leftover.file.to_path_buf();
        std::mem::forget(leftover);
        drop(r);
        drop(first);
        let _third = Blobs::open_local(d.path()).unwrap();
        assert!(!leftover_path.exists());
    }

    fn age(blobs: &Blobs, sha256: &str, secs: u64) {
        std::fs::File::options()
            .write(true)
            .open(blobs.local_path(sha256))
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    async fn received(blobs: &Blobs, bytes: &[u8]) -> Received {
        let mut w = blobs.writer().await.unwrap();
        w.write(bytes).await.unwrap();
        w.finish().await.unwrap()
    }

    /// An equal upload while the collector removes an old unnamed blob: whichever goes first,
    /// once the upload is acknowledged its blob is there.
    #[tokio::test]
    async fn an_equal_upload_racing_a_removal_always_leaves_its_blob() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let r = received(&blobs, b"every empty console").await;
        let sha = r.sha256.clone();
        blobs.publish(&r).await.unwrap();
        age(&blobs, &sha, 7200);
        let hour_ago = crate::db::now_ms() - 3_600_000;
        // The upload comes while the collector is in its look (no row names it yet): it waits,
        // the old blob goes, and the upload writes it anew.
        let mut upload = None;
        let named = async {
            let b = blobs.clone();
            upload = Some(tokio::spawn(async move {
                b.publish(&r).await.unwrap();
                r
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, BlobError>(false)
        };
        assert!(
            blobs
                .remove_unless_fresh_or_named(&sha, hour_ago, named)
                .await
                .unwrap()
        );
        let r = upload.unwrap().await.unwrap();
        let info = blobs.info(&sha).await.unwrap().expect("written anew");
        assert!(info.modified_ms >= hour_ago);
        // Made old again; the upload first: the collector's look comes after its mark.
        age(&blobs, &sha, 7200);
        blobs.publish(&r).await.unwrap();
        assert!(
            !blobs
                .remove_unless_fresh_or_named(&sha, hour_ago, async { Ok::<_, BlobError>(false) })
                .await
                .unwrap()
        );
        // Old, and a row names it: kept.
        age(&blobs, &sha, 7200);
        assert!(
            !blobs
                .remove_unless_fresh_or_named(&sha, hour_ago, async { Ok::<_, BlobError>(true) })
                .await
                .unwrap()
        );
        assert!(blobs.info(&sha).await.unwrap().is_some());
    }

    /// Without the lock, a publication's head and mark can fall between the collector's look
    /// at the time and its removal: many rounds of the two at once, on two threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledged_publication_is_never_removed_under_it() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let r = Arc::new(received(&blobs, b"reproducible").await);
        blobs.publish(&r).await.unwrap();
        for _ in 0..300 {
            age(&blobs, &r.sha256, 7200);
            let hour_ago = crate::db::now_ms() - 3_600_000;
            let (b, rr) = (blobs.clone(), r.clone());
            let upload = tokio::spawn(async move { b.publish(&rr).await });
            let b = blobs.clone();
            let sha = r.sha256.clone();
            let gc = tokio::spawn(async move { b.remove_unless_fresh(&sha, hour_ago).await });
            upload.await.unwrap().unwrap();
            gc.await.unwrap().unwrap();
            assert!(
                blobs.info(&r.sha256).await.unwrap().is_some(),
                "acknowledged, then removed"
            );
        }
    }

    #[tokio::test]
    async fn staging_files_a_kill_left_are_removed_once_old() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let r = received(&blobs, b"a blob").await;
        blobs.publish(&r).await.unwrap();
        let blob = blobs.local_path(&r.sha256);
        let staging = |n: u32| PathBuf::from(format!("{}#{n}", blob.display()));
        std::fs::write(staging(1), b"half").unwrap();
        std::fs::write(staging(2), b"in flight").unwrap();
        std::fs::File::options()
            .write(true)
            .open(staging(1))
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        age(&blobs, &r.sha256, 7200);
        assert_eq!(blobs.remove_stale_staging(STAGING_AGE).await.unwrap(), 1);
        assert!(!staging(1).exists());
        assert!(
            staging(2).exists(),
            "a fresh one may be a publication under way"
        );
        assert!(blob.exists(), "blobs are not staging files");
        assert_eq!(blobs.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn blobs_are_listed_and_removed_only_when_not_freshly_published() {
        let d = tempfile::tempdir().unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        let mut w = blobs.writer().await.unwrap();
        w.write(b"console").await.unwrap();
        let r = w.finish().await.unwrap();
        blobs.publish(&r).await.unwrap();
        let listed = blobs.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].sha256.as_str(), listed[0].size),
            (r.sha256.as_str(), 7)
        );
        let published = listed[0].modified_ms;
        assert!(
            !blobs
                .remove_unless_fresh(&r.sha256, published)
                .await
                .unwrap(),
            "published at the cutoff: kept"
        );
        // Made old, then published again by an equal upload: fresh again.
        std::fs::File::options()
            .write(true)
            .open(blobs.local_path(&r.sha256))
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        let hour_ago = crate::db::now_ms() - 3_600_000;
        blobs.publish(&r).await.unwrap();
        assert!(
            !blobs
                .remove_unless_fresh(&r.sha256, hour_ago)
                .await
                .unwrap()
        );
        assert!(
            blobs
                .remove_unless_fresh(&r.sha256, crate::db::now_ms() + 1000)
                .await
                .unwrap()
        );
        assert_eq!(blobs.info(&r.sha256).await.unwrap(), None);
        assert!(blobs.list().await.unwrap().is_empty());
    }
}
