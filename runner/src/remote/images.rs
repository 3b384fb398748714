//! Images by digest: an offer pinned to a published image (`image_digest`) runs on exactly those
//! bits, fetched from the server (`GET /api/v1/images/{digest}/{part}`) into a cache under the
//! runner's directory, `DIR/image-cache/DIGEST/`, laid out as an images directory
//! (`INDEX.json`, the manifest's bytes exactly; its `disk`; its `kernel`, maybe under
//! `kernels/`), so the launchers run it as they run a local image. An offer without a digest
//! runs on `--images-dir`, as before.
//!
//! Nothing the server sends is trusted: the manifest's sha256 must be the digest, it is checked
//! as every manifest is (plain names, sizes) and must be the offer's index; the kernel and the
//! disk are capped as the server caps what it publishes ([`MAX_KERNEL_BYTES`],
//! [`max_qcow2_bytes`]) and must have the manifest's sha256s. Each part is streamed into
//! `DIGEST/.partial/PART`, resumed with a range request after a broken transfer, checked whole,
//! then renamed into place; a mismatch removes the partial file and says what differed. The
//! marker `.complete` is written last: a directory without it is resumed, never run. (The
//! runner's files start with `.`: no manifest can name such a file, so none can overwrite them.)
//!
//! One runner is one process (its directory is locked), so a mutex and a condition variable
//! keep attempts of one digest in step: one fetches, the others wait for it. The cache is bounded
//! by `--cache-size`: after a fetch, the digests used least recently (their `.used` file's time)
//! are removed until the rest fits, never one an attempt is using.

mod part;
#[cfg(test)]
mod tests;

use super::client::ApiFailure;
use super::retry::Backoff;
use construir_contract::manifest::{
    Image, ImageManifest, KERNELS_DIR, MAX_KERNEL_BYTES, MAX_MANIFEST_BYTES, max_qcow2_bytes,
    valid_sha256,
};
use construir_contract::text::printable;
use part::fetch_part;
pub use part::{Answer, Fetcher, HttpSource, Part, Source, parse_content_range};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The cache, under the runner's directory.
pub const CACHE_DIR: &str = "image-cache";
/// The default `--cache-size`.
pub const DEFAULT_CACHE_SIZE: u64 = 20 << 30;
/// Written last, holding the image's index: the digest's directory is complete.
pub const COMPLETE: &str = ".complete";
/// Touched at every use: the cache removes the least recently used first.
pub const USED: &str = ".used";
/// Where parts are downloaded before they are checked.
const PARTIAL: &str = ".partial";
/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The image is not one this runner will run: the server has no such digest, or what it
    /// sent is not what the digest pins. Reported as `unknown-image`.
    #[error("image {0}")]
    Image(String),
    /// This runner cannot hold it (no fetching, or a cache too small): aborted, so a runner
    /// that can takes it.
    #[error("{0}")]
    Unfit(String),
    /// The server could not be reached, or refused this runner: aborted, not the image's fault.
    #[error("fetching image {digest}'s {part}: {error}")]
    Server {
        digest: String,
        part: &'static str,
        error: ApiFailure,
    },
    #[error("the image cache: {0}")]
    Disk(String),
    #[error("the image fetch was stopped")]
    Stopped,
}

impl FetchError {
    /// Whether the image itself is at fault (reported), not the network or this runner (aborted).
    pub fn is_image(&self) -> bool {
        matches!(self, FetchError::Image(_))
    }
}

fn disk_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let what = format!("{what} {}", path.display());
    move |e| FetchError::Disk(format!("{what}: {e}"))
}

/// The cache of images by digest, and who uses what.
pub struct ImageCache {
    root: PathBuf,
    bound: u64,
    state: Mutex<CacheState>,
    changed: Condvar,
}

#[derive(Default)]
struct CacheState {
    /// Attempts using each digest (a fetch counts as one).
    in_use: HashMap<String, usize>,
    fetching: HashSet<String>,
}

/// A digest's directory, kept from eviction while this lives.
pub struct InUse<'a> {
    cache: &'a ImageCache,
    digest: String,
    pub dir: PathBuf,
}

impl std::fmt::Debug for InUse<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InUse").field("dir", &self.dir).finish()
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.cache.release(&self.digest);
    }
}

impl ImageCache {
    /// The cache in `root`, holding at most `bound` bytes (0: this runner fetches nothing).
    pub fn new(root: PathBuf, bound: u64) -> Self {
        ImageCache {
            root,
            bound,
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn bound(&self) -> u64 {
        self.bound
    }

    fn release(&self, digest: &str) {
        let mut st = self.state.lock().expect("cache lock");
        if let Some(n) = st.in_use.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                st.in_use.remove(digest);
            }
        }
        self.changed.notify_all();
    }

    /// Digest `digest` of image `index`, complete in the cache: found there, or fetched now
    /// (or by another attempt, waited for).
    pub fn acquire(
        &self,
        f: &Fetcher<'_>,
        index: &str,
        digest: &str,
    ) -> Result<InUse<'_>, FetchError> {
        if !valid_sha256(digest) {
            return Err(FetchError::Image(format!(
                "digest {:?} is not a sha256",
                printable(digest)
            )));
        }
        let dir = self.root.join(digest);
        let mut st = self.state.lock().expect("cache lock");
        while st.fetching.contains(digest) {
            if (f.stopped)() {
                return Err(FetchError::Stopped);
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(500))
                .expect("cache lock")
                .0;
        }
        *st.in_use.entry(digest.to_string()).or_default() += 1;
        let complete = complete_index(&dir);
        if complete.is_none() && self.bound > 0 {
            st.fetching.insert(digest.to_string());
        }
        // Released before `held` exists: dropping it takes the lock.
        drop(st);
        let held = InUse {
            cache: self,
            digest: digest.to_string(),
            dir: dir.clone(),
        };
        if let Some(indexed) = complete {
            if indexed != index {
                return Err(FetchError::Image(format!(
                    "{digest} is image {:?}, not {index}",
                    printable(&indexed)
                )));
            }
            touch(&dir.join(USED));
            return Ok(held);
        }
        if self.bound == 0 {
            return Err(FetchError::Unfit(format!(
                "this runner does not hold image {index}@{digest} and fetches no images \
                 (--cache-size 0)"
            )));
        }
        let fetched = fetch(f, &dir, index, digest, self.bound);
        self.state
            .lock()
            .expect("cache lock")
            .fetching
            .remove(digest);
        self.changed.notify_all();
        fetched?;
        touch(&dir.join(USED));
        self.evict();
        Ok(held)
    }

    /// Removes the least recently used digests until the cache is within its bound; never one
    /// in use (nor being fetched). Returns the digests removed.
    pub fn evict(&self) -> Vec<String> {
        let st = self.state.lock().expect("cache lock");
        let mut entries: Vec<(SystemTime, String, u64)> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                valid_sha256(&name).then(|| (last_used(&e.path()), name, size_of(&e.path(), 3)))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|(_, _, size)| size).sum();
        entries.sort();
        let mut removed = Vec::new();
        for (_, digest, size) in entries {
            if total <= self.bound {
                break;
            }
            if st.in_use.contains_key(&digest) || st.fetching.contains(&digest) {
                continue;
            }
            let dir = self.root.join(&digest);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(
                        "image cache: removed {digest} ({size} bytes; least recently used, over \
                         --cache-size {})",
                        self.bound
                    );
                    total = total.saturating_sub(size);
                    removed.push(digest);
                }
                Err(e) => tracing::warn!("image cache: cannot remove {}: {e}", dir.display()),
            }
        }
        removed
    }
}

/// The index a complete digest directory holds, if it is complete.
fn complete_index(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(COMPLETE)).ok()?;
    Some(text.trim().to_string())
}

/// When a digest was last used: its `.used` file's time, else its directory's.
fn last_used(dir: &Path) -> SystemTime {
    let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    time(&dir.join(USED))
        .or_else(|| time(dir))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The bytes of the files under `path`, `depth` levels down, links not followed.
fn size_of(path: &Path, depth: u32) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    if depth == 0 {
        return 0;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| size_of(&e.path(), depth - 1))
        .sum()
}

fn touch(path: &Path) {
    let now = SystemTime::now();
    let touched = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(now));
    if let Err(e) = touched {
        tracing::warn!("image cache: cannot touch {}: {e}", path.display());
    }
}

/// Whether a checked manifest's files would collide in a digest directory: the disk and the
/// kernel one file, either of them the manifest's own file, the disk where `kernels/` goes.
pub fn layout_conflict(m: &ImageManifest) -> Option<String> {
    let manifest = format!("{}.json", m.index);
    if m.disk == m.kernel {
        return Some(format!("its disk and kernel are one file, {:?}", m.disk));
    }
    if m.disk == manifest || m.kernel == manifest {
        return Some(format!(
            "it names its own file {manifest:?} as a disk or kernel"
        ));
    }
    if m.disk == KERNELS_DIR && m.kernel.contains('/') {
        return Some(format!(
            "its disk is named like the {KERNELS_DIR}/ directory"
        ));
    }
    None
}

/// Fetches what `dir` lacks of digest `digest` (image `index`), checks it, and marks it complete.
fn fetch(
    f: &Fetcher<'_>,
    dir: &Path,
    index: &str,
    digest: &str,
    bound: u64,
) -> Result<(), FetchError> {
    let partial = dir.join(PARTIAL);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&partial)
        .map_err(disk_err("make", &partial))?;
    let image = |reason: String| FetchError::Image(format!("{index}@{digest}: {reason}"));
    tracing::info!("attempt {}: fetching image {index}@{digest}", f.key);
    let started = Instant::now();
    let manifest_file = fetch_part(
        f,
        digest,
        Part::Manifest,
        &partial,
        MAX_MANIFEST_BYTES,
        bound,
        digest,
    )?;
    let bytes = std::fs::read(&manifest_file).map_err(disk_err("read", &manifest_file))?;
    let manifest: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| {
        let _ = std::fs::remove_file(&manifest_file);
        image(format!("its manifest is not an image manifest: {e}"))
    })?;
    let refused = |reason: String| {
        let _ = std::fs::remove_file(&manifest_file);
        image(format!("its manifest is refused: {reason}"))
    };
    manifest.check().map_err(refused)?;
    if manifest.index != index {
        return Err(refused(format!(
            "it is image {:?}, but the offer is for {index}",
            manifest.index
        )));
    }
    if let Some(conflict) = layout_conflict(&manifest) {
        return Err(refused(conflict));
    }
    let mut room = bound.saturating_sub(bytes.len() as u64);
    for (part, name, cap, sha256) in [
        (
            Part::Kernel,
            &manifest.kernel,
            MAX_KERNEL_BYTES,
            &manifest.kernel_sha256,
        ),
        (
            Part::Disk,
            &manifest.disk,
            max_qcow2_bytes(manifest.virtual_size),
            &manifest.disk_sha256,
        ),
    ] {
        let target = dir.join(name);
        // Renamed into place only once checked: a file there is a checked one.
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            room = room.saturating_sub(meta.len());
            continue;
        }
        let file = fetch_part(f, digest, part, &partial, cap, room, sha256)?;
        room = room.saturating_sub(std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(disk_err("make", parent))?;
        }
        std::fs::rename(&file, &target).map_err(disk_err("place", &target))?;
    }
    let manifest_path = dir.join(format!("{index}.json"));
    std::fs::rename(&manifest_file, &manifest_path).map_err(disk_err("place", &manifest_path))?;
    // The launchers load it as they load any images directory: a check that it is one.
    Image::load(dir, index).map_err(|e| image(format!("the cached copy does not load: {e}")))?;
    let tmp = dir.join(".complete.tmp");
    std::fs::write(&tmp, index)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, dir.join(COMPLETE)))
        .map_err(disk_err("mark complete", dir))?;
    let _ = std::fs::remove_dir_all(&partial);
    tracing::info!(
        "attempt {}: image {index}@{digest} fetched ({} bytes in {:.1} s)",
        f.key,
        size_of(dir, 3),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The images directory an attempt runs on, kept while it runs.
pub enum Prepared<'a> {
    /// `--images-dir`: the offer is pinned to no digest.
    Local(PathBuf),
    /// The digest's directory in the cache.
    Cached(InUse<'a>),
}

impl Prepared<'_> {
    pub fn dir(&self) -> &Path {
        match self {
            Prepared::Local(dir) => dir,
            Prepared::Cached(held) => &held.dir,
        }
    }
}

/// The images directory for `offer`: `--images-dir` for an offer pinned to no digest (which
/// must hold its image), else the digest's directory in the cache, fetched now if it is not
/// there complete (heartbeats go on meanwhile: the attempt is `downloading`).
pub fn prepare<'a>(
    ctx: &'a super::Ctx,
    offer: &construir_api::types::ClaimResponse,
    live: &super::heartbeat::Live,
    stopped: &dyn Fn() -> bool,
) -> Result<Prepared<'a>, FetchError> {
    let Some(digest) = &offer.image_digest else {
        return match Image::load(&ctx.cfg.images_dir, &offer.image) {
            Ok(_) => Ok(Prepared::Local(ctx.cfg.images_dir.clone())),
            Err(e) => Err(FetchError::Image(format!(
                "{}: this runner does not have it after all ({e})",
                offer.image
            ))),
        };
    };
    let source = HttpSource {
        client: ctx.calls.clone(),
        token: ctx.cfg.token.clone(),
    };
    let fetcher = Fetcher {
        source: &source,
        stopped,
        may_retry: &|| ctx.may_retry(live),
        backoff: Backoff::default(),
        key: &live.key,
    };
    ctx.images
        .acquire(&fetcher, &offer.image, digest)
        .map(Prepared::Cached)
}
