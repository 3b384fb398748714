//! The cache of raw bases: `<cache>/<disk_sha256>.raw`, one per image qcow2, made once and shared
//! read-only by every run (each run's writes go to its own throw-away overlay).
//!
//! - **Made once**: the first launcher to need a base checks the qcow2's sha256 against the
//!   manifest (on the open file it then converts), converts it into `<sha>.raw.<pid>.partial`
//!   and publishes it with `link(2)`, which never replaces a file. Conversions in one cache take
//!   turns (an exclusive `flock` on the cache directory), so N launchers starting on a new image
//!   convert it once, and a `.partial` whose converter holds no such lock is a dead one's.
//! - **Held while used**: a launcher opens its base and holds a shared `flock` on it for its whole
//!   run (before any sandbox; QEMU inherits a duplicate, so the lock lives as long as QEMU does),
//!   and stamps the use by setting the base's modification time. The pruner ([`crate::prune`])
//!   removes only a base it can lock exclusively, so never one in use.
//! - **Races with the pruner**: the pruner may remove a base between a launcher's `open` and its
//!   `flock`; the launcher then finds its descriptor no longer linked at the path and starts
//!   over (converting again). A newly made base is locked from before it is published.

use crate::convert::{ConvertError, MAX_VIRTUAL_SIZE, convert_file, sha256_reader};
use crate::lock;
use construir_contract::manifest::{Image, valid_sha256};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A raw base, open read-only, with this process's shared lock on it: it cannot be pruned while
/// this value (or a duplicate of its descriptor, such as the one QEMU inherits) is alive.
#[derive(Debug)]
pub struct RawBase {
    path: PathBuf,
    file: File,
}

/// How many times a launcher starts over when its base vanishes under it (pruned between its
/// open and its lock). Each time means another pruner ran in that instant; three in a row is
/// something else.
const ATTEMPTS: usize = 3;

impl RawBase {
    /// The raw base of `image` in `cache_dir` (converted the first time; the manifests of the
    /// image's directory decide what a prune after a conversion keeps).
    pub fn for_image(image: &Image, cache_dir: &Path) -> Result<Self, ConvertError> {
        Self::obtain(
            &image.disk_path(),
            &image.manifest.disk_sha256,
            cache_dir,
            &image.dir,
        )
    }

    /// The raw base for `qcow2`, whose sha256 must be `expected_sha256`: the cached one, or one
    /// made now (after which the cache is pruned, keeping what `images_dir`'s manifests name).
    pub fn obtain(
        qcow2: &Path,
        expected_sha256: &str,
        cache_dir: &Path,
        images_dir: &Path,
    ) -> Result<Self, ConvertError> {
        if !valid_sha256(expected_sha256) {
            return Err(ConvertError::BadHash(expected_sha256.to_string()));
        }
        let path = cache_dir.join(format!("{expected_sha256}.raw"));
        let mut made = false;
        // Holds a shared lock on a base this call made, from before it was published until the
        // open below has one of its own.
        let mut guard: Option<File> = None;
        for _ in 0..ATTEMPTS {
            let read = |source| ConvertError::Read {
                path: path.clone(),
                source,
            };
            if let Some(file) = open_locked(&path).map_err(read)? {
                if let Err(e) = lock::touch(&file) {
                    tracing::warn!(
                        "cannot stamp {} as used ({e}); a prune may remove it sooner after this run",
                        path.display()
                    );
                }
                let base = RawBase { path, file };
                drop(guard);
                if made {
                    crate::prune::after_conversion(cache_dir, images_dir);
                }
                return Ok(base);
            }
            // Not there (or pruned between our open and our lock): make it.
            guard = make(qcow2, expected_sha256, cache_dir, &path)?;
            made |= guard.is_some();
        }
        Err(ConvertError::Read {
            path,
            source: std::io::Error::other(
                "the base kept being removed while this launcher opened it (a prune running in a loop?)",
            ),
        })
    }

    /// Where the base is (for messages and sandbox rules; the file to use is [`Self::file`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The base, open read-only and locked.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Keeps the lock until the process exits and returns the path: for a launcher that runs one
    /// VM per process and opens the base again itself (construir-vmm).
    pub fn hold_for_process(self) -> PathBuf {
        static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());
        let path = self.path;
        HELD.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(self.file);
        path
    }
}

/// The cached raw base for `qcow2` (whose manifest hash is `expected_sha256`), converting it the
/// first time. Returns the raw file's path; the base stays locked against pruning until the
/// process exits ([`RawBase::hold_for_process`]). The qcow2's directory is taken as the images
/// directory whose manifests a prune keeps (manifest disks are plain names in it).
pub fn cached_raw_base(
    qcow2: &Path,
    expected_sha256: &str,
    cache_dir: &Path,
) -> Result<PathBuf, ConvertError> {
    let images_dir = qcow2.parent().unwrap_or(Path::new("."));
    Ok(RawBase::obtain(qcow2, expected_sha256, cache_dir, images_dir)?.hold_for_process())
}

/// Opens `path` read-only with a shared lock, or `None` when it is not there, or was removed
/// (pruned) between the open and the lock.
fn open_locked(path: &Path) -> std::io::Result<Option<File>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    lock::lock_shared(&file)?;
    let held = file.metadata()?;
    if !held.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(now) if held.nlink() > 0 && now.dev() == held.dev() && now.ino() == held.ino() => {
            Ok(Some(file))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the cache directory (made if missing), for its conversion lock.
pub(crate) fn open_dir(cache_dir: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(cache_dir)
}

/// Makes the base at `raw` from `qcow2`, unless another launcher made it while this one waited
/// for its turn. Returns a guard (the new file, share-locked) or `None`.
fn make(
    qcow2: &Path,
    expected_sha256: &str,
    cache_dir: &Path,
    raw: &Path,
) -> Result<Option<File>, ConvertError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConvertError::Write { path, source }
    };
    std::fs::create_dir_all(cache_dir).map_err(werr(cache_dir))?;
    let dir = open_dir(cache_dir).map_err(werr(cache_dir))?;
    lock::lock_exclusive(&dir).map_err(|source| ConvertError::Lock {
        path: cache_dir.to_path_buf(),
        source,
    })?;
    if std::fs::symlink_metadata(raw).is_ok() {
        // Made while we waited (or, if it cannot be opened, the next open says why).
        return Ok(None);
    }
    // Hash the file we then convert: what was checked is what is converted.
    let image = File::open(qcow2).map_err(|source| ConvertError::Read {
        path: qcow2.to_path_buf(),
        source,
    })?;
    let actual = sha256_reader(&image).map_err(|source| ConvertError::Read {
        path: qcow2.to_path_buf(),
        source,
    })?;
    if actual != expected_sha256 {
        return Err(ConvertError::HashMismatch {
            path: qcow2.to_path_buf(),
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    let tmp = cache_dir.join(format!(
        "{expected_sha256}.raw.{}.partial",
        std::process::id()
    ));
    // We hold the conversion lock, so a file by this name is a dead converter's.
    let _ = std::fs::remove_file(&tmp);
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    tracing::info!(
        "converting {} to a raw base (once per image)",
        qcow2.display()
    );
    let started = std::time::Instant::now();
    let published = convert_file(image, qcow2, &mut out, &tmp, MAX_VIRTUAL_SIZE).and_then(|_| {
        // Nobody writes a base: read-only for all, and locked before anyone can see it.
        out.set_permissions(std::fs::Permissions::from_mode(0o444))
            .map_err(werr(&tmp))?;
        lock::lock_shared(&out).map_err(|source| ConvertError::Lock {
            path: tmp.clone(),
            source,
        })?;
        match std::fs::hard_link(&tmp, raw) {
            Ok(()) => Ok(()),
            // Someone made it all the same (an older launcher without the turn lock).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(werr(raw)(e)),
        }
    });
    let _ = std::fs::remove_file(&tmp);
    published?;
    tracing::info!(
        "converted in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        raw.display()
    );
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::sha256_file;
    use std::ffi::OsStr;

    fn qemu_img(args: &[&OsStr]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is needed (Debian package qemu-utils; tools/test installs it)");
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn qcow2_of(dir: &Path, name: &str, data: &[u8], compressed: bool) -> PathBuf {
        let raw_in = dir.join(format!("{name}.in"));
        std::fs::write(&raw_in, data).unwrap();
        let q = dir.join(name);
        let mut args: Vec<&OsStr> = vec!["convert".as_ref(), "-O".as_ref(), "qcow2".as_ref()];
        if compressed {
            args.push("-c".as_ref());
        }
        args.push(raw_in.as_os_str());
        args.push(q.as_os_str());
        qemu_img(&args);
        q
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn converts_a_qcow2_made_by_qemu_img_byte_for_byte_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 3 << 20];
        for (i, b) in data.iter_mut().enumerate().skip(1 << 20).take(70_000) {
            *b = (i * 31 % 253) as u8;
        }
        data[(3 << 20) - 1] = 0x42;
        for compressed in [false, true] {
            let q = qcow2_of(
                dir.path(),
                &format!("img-{compressed}.qcow2"),
                &data,
                compressed,
            );
            let sha = sha256_file(&q).unwrap();
            let cache = dir.path().join(format!("cache-{compressed}"));
            let base = RawBase::obtain(&q, &sha, &cache, dir.path()).unwrap();
            assert_eq!(base.path(), cache.join(format!("{sha}.raw")));
            assert!(
                std::fs::read(base.path()).unwrap() == data,
                "converted bytes differ (compressed: {compressed})"
            );
            let meta = std::fs::metadata(base.path()).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o444);
            // Cached: the second call does not convert again (same file, nothing else left).
            let again = RawBase::obtain(&q, &sha, &cache, dir.path()).unwrap();
            assert_eq!(
                std::fs::metadata(again.path()).unwrap().ino(),
                meta.ino(),
                "converted twice"
            );
            assert_eq!(entries(&cache), vec![format!("{sha}.raw")]);
            // Both hold the base: it cannot be locked exclusively.
            let probe = File::open(base.path()).unwrap();
            assert!(!lock::try_lock_exclusive(&probe).unwrap());
            drop((base, again));
            assert!(lock::try_lock_exclusive(&probe).unwrap());
        }
    }

    #[test]
    fn using_a_base_stamps_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = qcow2_of(dir.path(), "s.qcow2", &[1u8; 65536], false);
        let sha = sha256_file(&q).unwrap();
        let cache = dir.path().join("cache");
        let path = RawBase::obtain(&q, &sha, &cache, dir.path())
            .unwrap()
            .path()
            .to_path_buf();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86400);
        // The owner may set the times through a read-only descriptor.
        File::open(&path).unwrap().set_modified(old).unwrap();
        let base = RawBase::obtain(&q, &sha, &cache, dir.path()).unwrap();
        let stamped = std::fs::metadata(base.path()).unwrap().modified().unwrap();
        assert!(stamped > old + std::time::Duration::from_secs(86400));
    }

    #[test]
    fn a_hash_mismatch_is_refused_before_any_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let q = qcow2_of(dir.path(), "m.qcow2", &[7u8; 65536], false);
        let cache = dir.path().join("cache");
        let wrong = "0".repeat(64);
        let err = RawBase::obtain(&q, &wrong, &cache, dir.path()).unwrap_err();
        assert!(matches!(err, ConvertError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("manifest says"), "{err}");
        assert!(entries(&cache).is_empty(), "{:?}", entries(&cache));
        // Not a hash at all: refused before it is used in a path.
        for bad in ["00", "../../etc/passwd", &"A".repeat(64)] {
            assert!(matches!(
                RawBase::obtain(&q, bad, &cache, dir.path()),
                Err(ConvertError::BadHash(_))
            ));
        }
    }

    #[test]
    fn garbage_and_backing_files_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.qcow2");
        std::fs::write(&junk, vec![0x51u8; 10_000]).unwrap();
        let sha = sha256_file(&junk).unwrap();
        let cache = dir.path().join("c");
        assert!(matches!(
            RawBase::obtain(&junk, &sha, &cache, dir.path()),
            Err(ConvertError::Qcow2 { .. })
        ));
        // A qcow2 pointing at a backing file on the host must not open it.
        let secret = dir.path().join("secret.raw");
        std::fs::write(&secret, vec![0x77u8; 1 << 20]).unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            secret.as_os_str(),
            overlay.as_os_str(),
        ]);
        let sha = sha256_file(&overlay).unwrap();
        let err = RawBase::obtain(&overlay, &sha, &cache, dir.path()).unwrap_err();
        let ConvertError::Qcow2 { source, .. } = &err else {
            panic!("{err}")
        };
        assert!(source.to_string().contains("denied"), "{source}");
        // No partial file is left behind.
        assert!(entries(&cache).is_empty(), "{:?}", entries(&cache));
    }

    #[test]
    fn a_base_pruned_between_open_and_lock_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let q = qcow2_of(dir.path(), "p.qcow2", &[3u8; 65536], false);
        let sha = sha256_file(&q).unwrap();
        let cache = dir.path().join("cache");
        let first = RawBase::obtain(&q, &sha, &cache, dir.path()).unwrap();
        let ino = first.file().metadata().unwrap().ino();
        // What open_locked sees when a pruner unlinked the file after its open: not linked.
        std::fs::remove_file(first.path()).unwrap();
        assert!(open_locked(first.path()).unwrap().is_none());
        let second = RawBase::obtain(&q, &sha, &cache, dir.path()).unwrap();
        assert_ne!(second.file().metadata().unwrap().ino(), ino);
        assert_eq!(std::fs::read(second.path()).unwrap(), vec![3u8; 65536]);
    }

    #[test]
    fn cached_raw_base_keeps_its_lock_for_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let q = qcow2_of(dir.path(), "h.qcow2", &[9u8; 65536], false);
        let sha = sha256_file(&q).unwrap();
        let cache = dir.path().join("cache");
        let path = cached_raw_base(&q, &sha, &cache).unwrap();
        let probe = File::open(&path).unwrap();
        assert!(!lock::try_lock_exclusive(&probe).unwrap());
    }
}
