//! Pruning the raw-base cache: each rebuilt image leaves its old base (hundreds of MiB) behind.
//!
//! A base is removed when no manifest in the images directory names it (`disk_sha256`), its last
//! use is older than the keep setting, and nobody holds it: the pruner takes an exclusive,
//! non-blocking `flock` and skips a base it cannot get (a launcher opening or running on it holds
//! a shared one). A `.partial` is removed when no conversion is under way (conversions hold the
//! cache directory's lock). Nothing else in the directory is touched. When a manifest cannot be
//! read, nothing unnamed is removed: the pruner cannot tell what that image uses.
//!
//! [`decide`] is the rule, a pure function; [`prune`] applies it to a directory. It runs after a
//! launcher makes a new base, and by hand with `construir-cache prune`.

use crate::lock;
use construir_contract::manifest::{Image, valid_index, valid_sha256};
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The setting: how long an unnamed base is kept after its last use (`3d`, `12h`, `30m`, `90s`,
/// or `0`: as soon as no manifest names it).
pub const KEEP_ENV: &str = "CONSTRUIR_RAW_CACHE_KEEP";

/// Default of [`KEEP_ENV`]: three days, so an image rolled back soon after a rebuild, or a
/// runner pointed at another images directory for a while, does not convert again.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(3 * 86400);

/// Parses a keep setting: `0`, or `N` with `s`, `m`, `h` or `d` (no unit: seconds).
pub fn parse_keep(text: &str) -> Result<Duration, String> {
    construir_launcher::duration::parse_span(text)
}

/// The keep setting from [`KEEP_ENV`] (a bad value is reported and the default used).
pub fn keep_from_env() -> Duration {
    match std::env::var(KEEP_ENV) {
        Ok(text) => parse_keep(&text).unwrap_or_else(|e| {
            tracing::warn!("{KEEP_ENV}: {e}; keeping unnamed bases for the default 3 days");
            DEFAULT_KEEP
        }),
        Err(_) => DEFAULT_KEEP,
    }
}

/// What a cache file is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<sha256>.raw`: a base.
    Base,
    /// `<sha256>.raw.<anything>.partial`: a conversion under way, or a dead one's leftover.
    Partial,
    /// Anything else: not the cache's, never touched.
    Other,
}

/// The kind of the cache file called `name`, and the sha256 it is for.
pub fn classify(name: &str) -> (Kind, Option<&str>) {
    let Some((sha, rest)) = name.split_at_checked(64) else {
        return (Kind::Other, None);
    };
    if !valid_sha256(sha) {
        return (Kind::Other, None);
    }
    if rest == ".raw" {
        (Kind::Base, Some(sha))
    } else if rest.starts_with(".raw.") && rest.ends_with(".partial") {
        (Kind::Partial, Some(sha))
    } else {
        (Kind::Other, None)
    }
}

/// One cache file, as the pruner saw it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    /// The last use (a base's modification time: set when made and by every launcher using it).
    pub last_used: SystemTime,
    /// Someone holds a lock on it: a launcher is opening or running on it.
    pub locked: bool,
}

/// The bases the images directory's manifests name.
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub sha256s: BTreeSet<String>,
    /// Manifests that could not be read, with why: while there are any, no unnamed base goes.
    pub unreadable: Vec<String>,
}

/// Why a file stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// A launcher holds it.
    InUse,
    /// A manifest names it.
    Named,
    /// A manifest could not be read, so this might be its base.
    Unsure,
    /// Used less than the keep setting ago.
    Recent(Duration),
    /// A conversion is under way (the cache directory is locked).
    Converting,
    /// Not a file the cache makes.
    NotOurs,
}

/// Why a file goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remove {
    /// No manifest names it and it was last used this long ago.
    Unnamed(Duration),
    /// A conversion's leftover, with no conversion under way.
    StalePartial,
}

/// The verdict on one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Keep(Keep),
    Remove(Remove),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = |d: &Duration| format!("{:.1} h", d.as_secs_f64() / 3600.0);
        match self {
            Verdict::Keep(Keep::InUse) => write!(f, "keep: in use"),
            Verdict::Keep(Keep::Named) => write!(f, "keep: named by a manifest"),
            Verdict::Keep(Keep::Unsure) => {
                write!(f, "keep: a manifest cannot be read, it may name this")
            }
            Verdict::Keep(Keep::Recent(age)) => write!(f, "keep: last used {} ago", h(age)),
            Verdict::Keep(Keep::Converting) => write!(f, "keep: a conversion is under way"),
            Verdict::Keep(Keep::NotOurs) => write!(f, "keep: not a cache file"),
            Verdict::Remove(Remove::Unnamed(age)) => {
                write!(f, "remove: no manifest names it, last used {} ago", h(age))
            }
            Verdict::Remove(Remove::StalePartial) => {
                write!(f, "remove: a dead conversion's leftover")
            }
        }
    }
}

/// The rule. `converting`: the cache directory's conversion lock is held by someone else. A
/// last use in the future (a clock set back) counts as now.
pub fn decide(
    entry: &Entry,
    names: &Names,
    converting: bool,
    now: SystemTime,
    keep: Duration,
) -> Verdict {
    let age = now.duration_since(entry.last_used).unwrap_or_default();
    match classify(&entry.name) {
        (Kind::Other, _) | (_, None) => Verdict::Keep(Keep::NotOurs),
        (Kind::Partial, _) if converting || entry.locked => Verdict::Keep(Keep::Converting),
        (Kind::Partial, _) => Verdict::Remove(Remove::StalePartial),
        (Kind::Base, _) if entry.locked => Verdict::Keep(Keep::InUse),
        (Kind::Base, Some(sha)) if names.sha256s.contains(sha) => Verdict::Keep(Keep::Named),
        (Kind::Base, _) if !names.unreadable.is_empty() => Verdict::Keep(Keep::Unsure),
        (Kind::Base, _) if age < keep => Verdict::Keep(Keep::Recent(age)),
        (Kind::Base, _) => Verdict::Remove(Remove::Unnamed(age)),
    }
}

/// What the manifests in `images_dir` name (`<index>.json` files; others are not manifests).
pub fn manifest_names(images_dir: &Path) -> std::io::Result<Names> {
    let mut names = Names::default();
    for entry in std::fs::read_dir(images_dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(index) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !valid_index(index) {
            continue;
        }
        match Image::load(images_dir, index) {
            Ok(image) => {
                names.sha256s.insert(image.manifest.disk_sha256);
            }
            Err(e) => names.unreadable.push(format!("{index}.json: {e}")),
        }
    }
    Ok(names)
}

/// One file's outcome in a prune.
#[derive(Debug, Clone)]
pub struct Pruned {
    pub entry: Entry,
    pub verdict: Verdict,
    /// Removed (false on a dry run, or when the file changed under the pruner).
    pub removed: bool,
}

/// A prune's result.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    pub files: Vec<Pruned>,
    pub names: Names,
}

impl PruneReport {
    /// Bytes freed (allocated blocks of the removed files).
    pub fn freed(&self) -> u64 {
        self.files
            .iter()
            .filter(|f| f.removed)
            .map(|f| f.entry.size)
            .sum()
    }
}

/// Prunes `cache_dir` (a missing one is empty), keeping what `images_dir`'s manifests name and
/// unnamed bases used less than `keep` ago. With `dry_run`, only says what it would do.
pub fn prune(
    cache_dir: &Path,
    images_dir: &Path,
    keep: Duration,
    dry_run: bool,
) -> std::io::Result<PruneReport> {
    let names = manifest_names(images_dir)?;
    for why in &names.unreadable {
        tracing::warn!("not removing unnamed raw bases: {why}");
    }
    let dir = match crate::cache::open_dir(cache_dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(PruneReport {
                files: Vec::new(),
                names,
            });
        }
        Err(e) => return Err(e),
    };
    // Held for the pass: no conversion starts or publishes meanwhile.
    let converting = !lock::try_lock_exclusive(&dir)?;
    let mut files = Vec::new();
    let mut listing: Vec<_> = std::fs::read_dir(cache_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    listing.sort();
    for file_name in listing {
        let Some(name) = file_name.to_str() else {
            continue;
        };
        let path = cache_dir.join(name);
        if classify(name).0 == Kind::Other {
            continue;
        }
        // Never follow a link, never block on a FIFO; what is not a regular file is not ours.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let locked = !lock::try_lock_exclusive(&file)?;
        let entry = Entry {
            name: name.to_string(),
            size: meta.blocks() * 512,
            last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            locked,
        };
        let verdict = decide(&entry, &names, converting, SystemTime::now(), keep);
        let mut removed = false;
        if matches!(verdict, Verdict::Remove(_)) && !dry_run {
            // Remove the file we judged and hold, not one put in its place since.
            let same = std::fs::symlink_metadata(&path)
                .is_ok_and(|now| now.dev() == meta.dev() && now.ino() == meta.ino());
            if same {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
                }
            }
        }
        drop(file);
        files.push(Pruned {
            entry,
            verdict,
            removed,
        });
    }
    drop(dir);
    Ok(PruneReport { files, names })
}

/// The prune a launcher runs after making a new base (the keep setting from the environment);
/// it only logs.
pub(crate) fn after_conversion(cache_dir: &Path, images_dir: &Path) {
    match prune(cache_dir, images_dir, keep_from_env(), false) {
        Ok(report) => {
            for f in report.files.iter().filter(|f| f.removed) {
                tracing::info!("raw-base cache: removed {} ({})", f.entry.name, f.verdict);
            }
        }
        Err(e) => tracing::warn!(
            "cannot prune the raw-base cache {}: {e}",
            cache_dir.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::RawBase;
    use std::fs::File;

    const DAY: Duration = Duration::from_secs(86400);

    fn sha(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn entry(name: &str, age: Duration, locked: bool, now: SystemTime) -> Entry {
        Entry {
            name: name.into(),
            size: 1,
            last_used: now - age,
            locked,
        }
    }

    #[test]
    fn the_rule() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100 * 86400);
        let names = Names {
            sha256s: [sha('a')].into(),
            unreadable: Vec::new(),
        };
        let keep = 3 * DAY;
        let v = |name: &str, age, locked, converting| {
            decide(
                &entry(name, age, locked, now),
                &names,
                converting,
                now,
                keep,
            )
        };
        let named = format!("{}.raw", sha('a'));
        let unnamed = format!("{}.raw", sha('b'));
        // Named: kept however old.
        assert_eq!(
            v(&named, 90 * DAY, false, false),
            Verdict::Keep(Keep::Named)
        );
        // Unnamed and old: removed; unless locked (a launcher is on it), or recent.
        assert_eq!(
            v(&unnamed, 4 * DAY, false, false),
            Verdict::Remove(Remove::Unnamed(4 * DAY))
        );
        assert_eq!(
            v(&unnamed, 90 * DAY, true, false),
            Verdict::Keep(Keep::InUse)
        );
        assert_eq!(
            v(&unnamed, DAY, false, false),
            Verdict::Keep(Keep::Recent(DAY))
        );
        // A conversion under way does not protect bases.
        assert_eq!(
            v(&unnamed, 4 * DAY, false, true),
            Verdict::Remove(Remove::Unnamed(4 * DAY))
        );
        // A last use in the future counts as now.
        assert_eq!(
            decide(
                &Entry {
                    last_used: now + DAY,
                    ..entry(&unnamed, DAY, false, now)
                },
                &names,
                false,
                now,
                keep
            ),
            Verdict::Keep(Keep::Recent(Duration::ZERO))
        );
        // keep = 0: as soon as unnamed, still never when locked.
        let zero = |locked| {
            decide(
                &entry(&unnamed, Duration::ZERO, locked, now),
                &names,
                false,
                now,
                Duration::ZERO,
            )
        };
        assert_eq!(
            zero(false),
            Verdict::Remove(Remove::Unnamed(Duration::ZERO))
        );
        assert_eq!(zero(true), Verdict::Keep(Keep::InUse));
        // An unreadable manifest: nothing unnamed goes.
        let unsure = Names {
            unreadable: vec!["i0.json: damaged".into()],
            ..names.clone()
        };
        assert_eq!(
            decide(
                &entry(&unnamed, 90 * DAY, false, now),
                &unsure,
                false,
                now,
                keep
            ),
            Verdict::Keep(Keep::Unsure)
        );
        // Partials: removed unless a conversion is under way.
        let partial = format!("{}.raw.4242.partial", sha('c'));
        assert_eq!(
            v(&partial, Duration::ZERO, false, false),
            Verdict::Remove(Remove::StalePartial)
        );
        assert_eq!(
            v(&partial, 90 * DAY, false, true),
            Verdict::Keep(Keep::Converting)
        );
        // Anything else is not ours.
        for other in [
            "notes.txt".to_string(),
            format!("{}.raw", "A".repeat(64)),
            format!("{}.qcow2", sha('b')),
            format!("{}.raw.old", sha('b')),
            format!("x{}.raw", sha('b')),
            "é".repeat(40),
        ] {
            assert_eq!(
                v(&other, 90 * DAY, false, false),
                Verdict::Keep(Keep::NotOurs),
                "{other}"
            );
        }
    }

    #[test]
    fn keep_settings() {
        assert_eq!(parse_keep("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_keep("3d").unwrap(), 3 * DAY);
        assert_eq!(parse_keep("12h").unwrap(), Duration::from_secs(12 * 3600));
        assert_eq!(parse_keep("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_keep("90").unwrap(), Duration::from_secs(90));
        for bad in ["", "d", "-1d", "1w", "1.5d", "99999999999999999999d", "3 d"] {
            assert!(parse_keep(bad).is_err(), "{bad}");
        }
    }

    /// A manifest as image/build writes one, naming `disk_sha256`.
    fn manifest(index: &str, disk_sha256: &str) -> String {
        let other = sha('1');
        format!(
            r#"{{"index":"{index}","description":"t","disk":"{index}.qcow2","disk_format":"qcow2",
            "disk_sha256":"{disk_sha256}","virtual_size":1048576,"kernel":"kernels/vmlinux-x",
            "kernel_sha256":"{other}","memory_mib":128,"vcpus":1,"init_sha256":"{other}",
            "installed":[],"build_key":"k"}}"#
        )
    }

    fn age(path: &Path, by: Duration) {
        File::open(path)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    #[test]
    fn a_prune_removes_old_unnamed_bases_and_dead_partials_only() {
        let d = tempfile::tempdir().unwrap();
        let images = d.path().join("images");
        let cache = d.path().join("raw");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(images.join("t0.json"), manifest("t0", &sha('a'))).unwrap();
        std::fs::write(images.join("t0.json.tmp"), "{").unwrap(); // not a manifest
        let base = |c: char| cache.join(format!("{}.raw", sha(c)));
        for c in ['a', 'b', 'c', 'd'] {
            std::fs::write(base(c), vec![c as u8; 8192]).unwrap();
            age(&base(c), 10 * DAY);
        }
        age(&base('d'), DAY); // recent
        // 'c' is in use: a launcher holds a shared lock on it.
        let user = File::open(base('c')).unwrap();
        lock::lock_shared(&user).unwrap();
        let partial = cache.join(format!("{}.raw.999999.partial", sha('e')));
        std::fs::write(&partial, b"half").unwrap();
        std::fs::write(cache.join("README"), b"mine").unwrap();
        let link = cache.join(format!("{}.raw", sha('f')));
        std::os::unix::fs::symlink(base('a'), &link).unwrap();

        // A dry run changes nothing.
        let dry = prune(&cache, &images, 3 * DAY, true).unwrap();
        assert!(dry.files.iter().all(|f| !f.removed));
        assert!(base('b').exists() && partial.exists());

        let report = prune(&cache, &images, 3 * DAY, false).unwrap();
        let removed: Vec<&str> = report
            .files
            .iter()
            .filter(|f| f.removed)
            .map(|f| f.entry.name.as_str())
            .collect();
        assert_eq!(
            removed,
            vec![
                format!("{}.raw", sha('b')).as_str(),
                format!("{}.raw.999999.partial", sha('e')).as_str()
            ]
        );
        assert!(report.freed() >= 8192);
        assert!(base('a').exists(), "named");
        assert!(base('c').exists(), "in use");
        assert!(base('d').exists(), "recent");
        assert!(cache.join("README").exists() && link.exists());
        let verdict = |c: char| {
            report
                .files
                .iter()
                .find(|f| f.entry.name == format!("{}.raw", sha(c)))
                .map(|f| f.verdict.clone())
        };
        assert_eq!(verdict('c'), Some(Verdict::Keep(Keep::InUse)));
        assert_eq!(verdict('f'), None, "a symbolic link is not looked at");

        // Released, the old unnamed base goes too.
        drop(user);
        let report = prune(&cache, &images, 3 * DAY, false).unwrap();
        assert!(report.files.iter().any(|f| f.removed));
        assert!(!base('c').exists());

        // A damaged manifest: nothing unnamed goes, whatever its age (keep 0).
        std::fs::write(images.join("t1.json"), "{").unwrap();
        let report = prune(&cache, &images, Duration::ZERO, false).unwrap();
        assert!(report.files.iter().all(|f| !f.removed));
        assert_eq!(report.names.unreadable.len(), 1);
        assert!(base('d').exists());
    }

    #[test]
    fn partials_stay_while_a_conversion_holds_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let images = d.path().join("images");
        let cache = d.path().join("raw");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        let partial = cache.join(format!("{}.raw.1.partial", sha('e')));
        std::fs::write(&partial, b"half").unwrap();
        let converter = crate::cache::open_dir(&cache).unwrap();
        lock::lock_exclusive(&converter).unwrap();
        let report = prune(&cache, &images, Duration::ZERO, false).unwrap();
        assert_eq!(report.files[0].verdict, Verdict::Keep(Keep::Converting));
        assert!(partial.exists());
        drop(converter);
        prune(&cache, &images, Duration::ZERO, false).unwrap();
        assert!(!partial.exists());
    }

    #[test]
    fn making_a_new_base_prunes_the_old_one_but_not_the_new() {
        let d = tempfile::tempdir().unwrap();
        let images = d.path().join("images");
        let cache = d.path().join("raw");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        // The previous build's base, unnamed now, last used long ago.
        let old = cache.join(format!("{}.raw", sha('b')));
        std::fs::write(&old, vec![1u8; 4096]).unwrap();
        age(&old, 30 * DAY);
        // The new image: a tiny qcow2 whose hash the manifest names.
        let raw_in = d.path().join("in");
        std::fs::write(&raw_in, vec![5u8; 65536]).unwrap();
        let q = images.join("t0.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw_in)
            .arg(&q)
            .output()
            .expect("qemu-img is needed (Debian package qemu-utils)");
        assert!(out.status.success());
        let q_sha = crate::convert::sha256_file(&q).unwrap();
        std::fs::write(images.join("t0.json"), manifest("t0", &q_sha)).unwrap();
        let image = Image::load(&images, "t0").unwrap();
        let base = RawBase::for_image(&image, &cache).unwrap();
        assert!(base.path().exists());
        assert!(
            !old.exists(),
            "the old base is pruned when the new one is made"
        );
    }
}
