//! The image cache against a stand-in server ([`Source`]): the layout the launchers load, a
//! broken download resumed from its partial file, what a lying server's bytes and manifests get,
//! one fetch for concurrent attempts, and the LRU bound.

use super::*;
use construir_api::ApiError;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Arc;

fn sha(bytes: &[u8]) -> String {
    crate::remote::transfer::hex(&Sha256::digest(bytes))
}

/// An image's three parts as the server holds them, and its digest.
#[derive(Clone)]
struct Published {
    digest: String,
    manifest: Vec<u8>,
    kernel: Vec<u8>,
    disk: Vec<u8>,
}

fn manifest_of(index: &str, kernel: &[u8], disk: &[u8]) -> ImageManifest {
    ImageManifest {
        index: index.into(),
        description: "test".into(),
        disk: format!("{index}.qcow2"),
        disk_format: "qcow2".into(),
        disk_sha256: sha(disk),
        virtual_size: 1 << 20,
        kernel: "kernels/vmlinux-k".into(),
        kernel_sha256: sha(kernel),
        memory_mib: 128,
        vcpus: 1,
        init_sha256: "c".repeat(64),
        installed: vec![],
        build_key: "k".into(),
        tools: Default::default(),
    }
}

fn publish(manifest: &ImageManifest, kernel: &[u8], disk: &[u8]) -> Published {
    let bytes = serde_json::to_vec_pretty(manifest).unwrap();
    Published {
        digest: sha(&bytes),
        manifest: bytes,
        kernel: kernel.to_vec(),
        disk: disk.to_vec(),
    }
}

fn image(index: &str, disk: &[u8]) -> Published {
    let kernel = b"an ELF vmlinux, say".to_vec();
    publish(&manifest_of(index, &kernel, disk), &kernel, disk)
}

/// A body that breaks (connection reset) after `at` bytes.
struct Breaks {
    data: std::io::Cursor<Vec<u8>>,
    at: u64,
}

impl Read for Breaks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.at.saturating_sub(self.data.position());
        if left == 0 {
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        let n = buf.len().min(left as usize);
        self.data.read(&mut buf[..n])
    }
}

/// The server's side: the images it holds, what it was asked, and how it misbehaves.
#[derive(Default)]
struct Fake {
    images: Vec<Published>,
    /// Each request: (digest, part, from).
    asked: Arc<Mutex<Vec<(String, Part, u64)>>>,
    /// The next transfer of this part breaks after this many bytes.
    breaks: Mutex<Option<(Part, u64)>>,
    /// Serve these bytes for a part instead (a corrupt blob), sha256 header unchanged.
    corrupt: Option<(Part, Vec<u8>)>,
    /// Say this sha256 for a part.
    says: Option<(Part, String)>,
    /// Bytes to sleep before answering (to hold a fetch open).
    slow: Duration,
}

impl Source for Fake {
    fn get(&self, digest: &str, part: Part, from: u64) -> Result<Answer, ApiFailure> {
        self.asked
            .lock()
            .unwrap()
            .push((digest.to_string(), part, from));
        std::thread::sleep(self.slow);
        let Some(img) = self.images.iter().find(|i| i.digest == digest) else {
            return Err(ApiFailure::Refused {
                status: 404,
                error: ApiError::new("not-found", "no image published under that digest"),
            });
        };
        let real = match part {
            Part::Manifest => &img.manifest,
            Part::Kernel => &img.kernel,
            Part::Disk => &img.disk,
        };
        let said = match &self.says {
            Some((p, s)) if *p == part => s.clone(),
            _ => sha(real),
        };
        let bytes = match &self.corrupt {
            Some((p, b)) if *p == part => b,
            _ => real,
        };
        let total = bytes.len() as u64;
        if from > 0 && from >= total {
            return Ok(Answer::PastEnd { total: Some(total) });
        }
        let data = std::io::Cursor::new(bytes[from as usize..].to_vec());
        let mut breaks = self.breaks.lock().unwrap();
        let body: Box<dyn Read> = match *breaks {
            Some((p, at)) if p == part => {
                *breaks = None;
                Box::new(Breaks { data, at })
            }
            _ => Box::new(data),
        };
        Ok(Answer::Bytes {
            start: from,
            total,
            sha256: Some(said),
            body,
        })
    }
}

fn fetcher(source: &dyn Source) -> Fetcher<'_> {
    Fetcher {
        source,
        stopped: &|| false,
        may_retry: &|| true,
        backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
        key: "1",
    }
}

fn asked(fake: &Fake, part: Part) -> Vec<u64> {
    let asked = fake.asked.lock().unwrap();
    asked
        .iter()
        .filter(|(_, p, _)| *p == part)
        .map(|(_, _, f)| *f)
        .collect()
}

#[test]
fn a_fetched_image_is_laid_out_as_an_images_directory_and_found_again() {
    let d = tempfile::tempdir().unwrap();
    let img = image("t0", b"qcow2 bits");
    let fake = Fake {
        images: vec![img.clone()],
        ..Fake::default()
    };
    let cache = ImageCache::new(d.path().join(CACHE_DIR), 1 << 30);
    let held = cache.acquire(&fetcher(&fake), "t0", &img.digest).unwrap();
    assert_eq!(held.dir, d.path().join(CACHE_DIR).join(&img.digest));
    let loaded = Image::load(&held.dir, "t0").unwrap();
    assert_eq!(
        std::fs::read(held.dir.join("t0.json")).unwrap(),
        img.manifest
    );
    assert_eq!(std::fs::read(loaded.kernel_path()).unwrap(), img.kernel);
    assert_eq!(std::fs::read(loaded.disk_path()).unwrap(), img.disk);
    assert_eq!(
        loaded.kernel_path(),
        held.dir.join("kernels/vmlinux-k"),
        "the manifest's kernels/ kept"
    );
    assert!(held.dir.join(COMPLETE).is_file() && held.dir.join(USED).is_file());
    assert!(!held.dir.join(PARTIAL).exists());
    assert_eq!(
        crate::remote::caps::digests_in(cache.root()),
        [img.digest.as_str()]
    );
    drop(held);
    // Found complete: nothing asked again.
    let n = fake.asked.lock().unwrap().len();
    assert_eq!(n, 3);
    let again = cache.acquire(&fetcher(&fake), "t0", &img.digest).unwrap();
    assert_eq!(fake.asked.lock().unwrap().len(), n);
    drop(again);
    // A digest asked for under another index is not run as that one.
    let e = cache
        .acquire(&fetcher(&fake), "i0", &img.digest)
        .unwrap_err();
    assert!(e.is_image() && e.to_string().contains("is image"), "{e}");
    // A runner that fetches nothing says so (and is not blamed on the image).
    let none = ImageCache::new(d.path().join("other"), 0);
    let e = none
        .acquire(&fetcher(&fake), "t0", &img.digest)
        .unwrap_err();
    assert!(matches!(e, FetchError::Unfit(_)), "{e}");
    assert!(fake.asked.lock().unwrap().len() == n, "asked nothing");
}

#[test]
fn a_download_broken_half_way_resumes_from_its_partial_file() {
    let d = tempfile::tempdir().unwrap();
    let disk: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let img = image("t0", &disk);
    let fake = Fake {
        images: vec![img.clone()],
        breaks: Mutex::new(Some((Part::Disk, 150_000))),
        ..Fake::default()
    };
    // A kernel half there already (a runner killed during it): asked from where it stopped.
    let partial = d.path().join(CACHE_DIR).join(&img.digest).join(PARTIAL);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("kernel"), &img.kernel[..7]).unwrap();
    let cache = ImageCache::new(d.path().join(CACHE_DIR), 1 << 30);
    let held = cache.acquire(&fetcher(&fake), "t0", &img.digest).unwrap();
    assert_eq!(asked(&fake, Part::Kernel), [7]);
    assert_eq!(
        asked(&fake, Part::Disk),
        [0, 150_000],
        "the second try asks for the rest only"
    );
    let loaded = Image::load(&held.dir, "t0").unwrap();
    assert!(std::fs::read(loaded.disk_path()).unwrap() == disk);
    assert_eq!(std::fs::read(loaded.kernel_path()).unwrap(), img.kernel);

    // Breaking on every try without a byte more: given up, the partial kept for later.
    let d2 = tempfile::tempdir().unwrap();
    struct Dead;
    impl Source for Dead {
        fn get(&self, _: &str, _: Part, _: u64) -> Result<Answer, ApiFailure> {
            Err(ApiFailure::Network("connection refused".into()))
        }
    }
    let cache = ImageCache::new(d2.path().to_path_buf(), 1 << 30);
    let e = cache
        .acquire(&fetcher(&Dead), "t0", &img.digest)
        .unwrap_err();
    assert!(
        matches!(e, FetchError::Server { .. }) && !e.is_image(),
        "the network's failure, not the image's: {e}"
    );
}

#[test]
fn a_corrupt_or_oversized_part_is_refused_and_its_partial_removed() {
    let d = tempfile::tempdir().unwrap();
    let disk = vec![5u8; 100_000];
    let img = image("t0", &disk);
    let mut bad = disk.clone();
    bad[50_000] ^= 1;
    let fake = Fake {
        images: vec![img.clone()],
        corrupt: Some((Part::Disk, bad.clone())),
        ..Fake::default()
    };
    let cache = ImageCache::new(d.path().to_path_buf(), 1 << 30);
    let e = cache
        .acquire(&fetcher(&fake), "t0", &img.digest)
        .unwrap_err();
    assert!(e.is_image(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("disk") && text.contains(&sha(&bad)) && text.contains(&sha(&disk)),
        "names the part and both sha256s: {text}"
    );
    let dir = d.path().join(&img.digest);
    assert!(
        !dir.join(PARTIAL).join("disk").exists(),
        "the partial is gone"
    );
    assert!(!dir.join(COMPLETE).exists() && !dir.join("t0.qcow2").exists());
    assert!(crate::remote::caps::digests_in(d.path()).is_empty());

    // A server that says another sha256 than the manifest's is refused before its bytes.
    let cache = ImageCache::new(d.path().join("says"), 1 << 30);
    let fake = Fake {
        images: vec![img.clone()],
        says: Some((Part::Kernel, "e".repeat(64))),
        ..Fake::default()
    };
    let e = cache
        .acquire(&fetcher(&fake), "t0", &img.digest)
        .unwrap_err();
    assert!(e.to_string().contains(&"e".repeat(64)), "{e}");
    assert_eq!(asked(&fake, Part::Disk), [0u64; 0], "the disk never asked");
    let cache = ImageCache::new(d.path().join("huge"), 1 << 30);

    // A kernel past the cap any image's kernel has: refused before a byte is read.
    struct Huge(Published);
    impl Source for Huge {
        fn get(&self, digest: &str, part: Part, from: u64) -> Result<Answer, ApiFailure> {
            if part == Part::Manifest {
                let fake = Fake {
                    images: vec![self.0.clone()],
                    ..Fake::default()
                };
                return fake.get(digest, part, from);
            }
            Ok(Answer::Bytes {
                start: 0,
                total: MAX_KERNEL_BYTES + 1,
                sha256: None,
                body: Box::new(std::io::repeat(0)),
            })
        }
    }
    let e = cache
        .acquire(&fetcher(&Huge(img.clone())), "t0", &img.digest)
        .unwrap_err();
    assert!(e.is_image() && e.to_string().contains("more than"), "{e}");
    // One larger than this runner's cache: not the image's fault (aborted, not reported).
    let small = ImageCache::new(d.path().join("small"), img.manifest.len() as u64 + 10);
    let fake = Fake {
        images: vec![img.clone()],
        ..Fake::default()
    };
    let e = small
        .acquire(&fetcher(&fake), "t0", &img.digest)
        .unwrap_err();
    assert!(
        matches!(e, FetchError::Unfit(_)) && e.to_string().contains("--cache-size"),
        "{e}"
    );
}

#[test]
fn hostile_manifests_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let cache = ImageCache::new(d.path().to_path_buf(), 1 << 30);
    let kernel = b"k".to_vec();
    let disk = b"d".to_vec();
    let refused = |m: ImageManifest, index: &str, says: &str| {
        let img = publish(&m, &kernel, &disk);
        let fake = Fake {
            images: vec![img.clone()],
            ..Fake::default()
        };
        let e = cache
            .acquire(&fetcher(&fake), index, &img.digest)
            .unwrap_err();
        assert!(e.is_image() && e.to_string().contains(says), "{says}: {e}");
        assert!(
            asked(&fake, Part::Disk).is_empty(),
            "{says}: nothing more asked"
        );
        assert!(!d.path().join(&img.digest).join("t0.json").exists());
    };
    let good = manifest_of("t0", &kernel, &disk);
    refused(
        ImageManifest {
            disk: "../../escape.qcow2".into(),
            ..good.clone()
        },
        "t0",
        "plain file name",
    );
    refused(
        ImageManifest {
            kernel: "/boot/vmlinuz".into(),
            ..good.clone()
        },
        "t0",
        "plain file name",
    );
    refused(good.clone(), "t1", "the offer is for t1");
    refused(
        ImageManifest {
            disk: "t0.json".into(),
            ..good.clone()
        },
        "t0",
        "its own file",
    );
    refused(
        ImageManifest {
            disk: "vmlinux".into(),
            kernel: "vmlinux".into(),
            ..good.clone()
        },
        "t0",
        "one file",
    );
    // A manifest that is not the digest's: refused, naming both.
    let img = publish(&good, &kernel, &disk);
    let other = "f".repeat(64);
    let fake = Fake {
        images: vec![Published {
            digest: other.clone(),
            ..img.clone()
        }],
        ..Fake::default()
    };
    let e = cache.acquire(&fetcher(&fake), "t0", &other).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("manifest") && text.contains(&img.digest) && text.contains(&other),
        "{text}"
    );
    // Not a digest at all, or one the server does not have.
    let e = cache
        .acquire(&fetcher(&fake), "t0", "../../etc")
        .unwrap_err();
    assert!(e.is_image(), "{e}");
    let e = cache
        .acquire(&fetcher(&fake), "t0", &"a".repeat(64))
        .unwrap_err();
    assert!(
        e.is_image() && e.to_string().contains("no such image"),
        "{e}"
    );
}

#[test]
fn concurrent_attempts_of_one_digest_fetch_it_once() {
    let d = tempfile::tempdir().unwrap();
    let img = image("t0", &[3u8; 10_000]);
    let asked = Arc::new(Mutex::new(Vec::new()));
    let cache = ImageCache::new(d.path().to_path_buf(), 1 << 30);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (asked, img, cache) = (asked.clone(), img.clone(), &cache);
                s.spawn(move || {
                    let fake = Fake {
                        images: vec![img.clone()],
                        asked,
                        slow: Duration::from_millis(100),
                        ..Fake::default()
                    };
                    let held = cache.acquire(&fetcher(&fake), "t0", &img.digest).unwrap();
                    Image::load(&held.dir, "t0").unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let manifests = asked
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _)| *p == Part::Manifest)
        .count();
    assert_eq!(manifests, 1, "one fetched, the others waited");
}

#[test]
fn the_least_recently_used_go_first_never_one_in_use() {
    let d = tempfile::tempdir().unwrap();
    let imgs: Vec<Published> = (0..4u8).map(|i| image("t0", &[i; 100_000])).collect();
    let fake = Fake {
        images: imgs.clone(),
        ..Fake::default()
    };
    let one = 100_000 + imgs[0].kernel.len() as u64 + imgs[0].manifest.len() as u64 + 64;
    // Room for three: fetching the fourth removes one.
    let cache = ImageCache::new(d.path().to_path_buf(), 3 * one);
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut held = Vec::new();
    for (i, img) in imgs[..3].iter().enumerate() {
        let h = cache.acquire(&fetcher(&fake), "t0", &img.digest).unwrap();
        // Used in order 0, 1, 2, an hour ago and after.
        File::options()
            .write(true)
            .open(h.dir.join(USED))
            .unwrap()
            .set_modified(old + Duration::from_secs(i as u64))
            .unwrap();
        held.push(h);
    }
    // The oldest is in use (a running attempt); the others are done with.
    held.truncate(1);
    let newest = cache
        .acquire(&fetcher(&fake), "t0", &imgs[3].digest)
        .unwrap();
    let left = crate::remote::caps::digests_in(d.path());
    assert_eq!(
        left,
        [
            imgs[3].digest.clone(),
            imgs[2].digest.clone(),
            imgs[0].digest.clone()
        ],
        "1 went: the least recently used that no attempt holds"
    );
    assert!(!d.path().join(&imgs[1].digest).exists());
    // Within the bound again: nothing more goes.
    drop((newest, held));
    assert!(cache.evict().is_empty());
    assert_eq!(crate::remote::caps::digests_in(d.path()).len(), 3);
}

#[test]
fn content_ranges_and_layouts() {
    assert_eq!(
        parse_content_range("bytes 10-19/100"),
        Some((Some((10, 19)), 100))
    );
    assert_eq!(parse_content_range("bytes */100"), Some((None, 100)));
    for bad in [
        "",
        "bytes 10-19",
        "bytes 19-10/100",
        "bytes 10-100/100",
        "items 1-2/3",
        "bytes a-b/c",
    ] {
        assert_eq!(parse_content_range(bad), None, "{bad}");
    }
    let m = manifest_of("t0", b"k", b"d");
    assert_eq!(layout_conflict(&m), None);
    let kernels = ImageManifest {
        disk: "kernels".into(),
        ..m.clone()
    };
    assert!(layout_conflict(&kernels).is_some());
    let flat = ImageManifest {
        kernel: "vmlinux".into(),
        disk: "kernels".into(),
        ..m
    };
    assert_eq!(layout_conflict(&flat), None);
}
