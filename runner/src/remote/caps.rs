//! What a pull runner offers: the volunteer's limits (they win over anything a server asks), the
//! images it holds, and what is free now. Sent with every claim, so a server matches jobs to
//! resources, not to slot counts, and a changed runner (an image added, a job running) never
//! gets work it cannot do.

use construir_api::fit::{Misfit, Pinned, fits};
use construir_api::types::{ClaimResponse, RunnerCapabilities};
use construir_contract::manifest::{Image, valid_index};
use std::path::Path;

/// The most images offered (the API's limit).
pub const MAX_IMAGES: usize = 64;

/// What the volunteer lends, as its flags say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lent {
    /// Jobs at a time.
    pub jobs: u32,
    /// Guest memory for all its jobs together, in MiB; also the largest guest.
    pub memory_mib: u32,
    /// The most vCPUs one guest gets.
    pub vcpus: u32,
    /// The longest time limit a job may have, in seconds.
    pub timeout_s: u64,
    /// The largest job file taken and the most output uploaded, in bytes.
    pub job_size: u64,
    pub output_size: u64,
}

/// What is taken of what is lent, by the jobs running now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Budget {
    pub running: u32,
    pub memory_mib: u32,
}

impl Budget {
    /// Free slots and memory.
    pub fn free(&self, lent: &Lent) -> (u32, u32) {
        (
            lent.jobs.saturating_sub(self.running),
            lent.memory_mib.saturating_sub(self.memory_mib),
        )
    }

    /// Takes a slot and `memory_mib` if both are free.
    pub fn reserve(&mut self, lent: &Lent, memory_mib: u32) -> bool {
        let (slots, memory) = self.free(lent);
        if slots == 0 || memory_mib > memory {
            return false;
        }
        self.running += 1;
        self.memory_mib += memory_mib;
        true
    }

    pub fn release(&mut self, memory_mib: u32) {
        self.running = self.running.saturating_sub(1);
        self.memory_mib = self.memory_mib.saturating_sub(memory_mib);
    }
}

/// The capabilities a claim sends: `images` in `--images-dir`, `image_digests` complete in the
/// cache, which holds at most `cache_bytes` (0: it fetches none).
pub fn capabilities(
    lent: &Lent,
    budget: &Budget,
    backend: &str,
    speed_class: &str,
    images: Vec<String>,
    image_digests: Vec<String>,
    cache_bytes: u64,
) -> RunnerCapabilities {
    let (free_slots, free_memory_mib) = budget.free(lent);
    RunnerCapabilities {
        arch: std::env::consts::ARCH.to_string(),
        backend: backend.to_string(),
        host_kind: speed_class.to_string(),
        images,
        max_memory_mib: lent.memory_mib,
        max_vcpus: lent.vcpus,
        max_timeout_s: lent.timeout_s,
        max_job_size: lent.job_size,
        max_output_size: lent.output_size,
        free_slots,
        free_memory_mib,
        image_digests,
        fetch_images: cache_bytes > 0,
        image_cache_bytes: cache_bytes,
    }
}

/// Whether an offer fits what is offered: the runner checks every claim answer itself, so that
/// its limits hold whatever a server sends.
pub fn check_offer(offer: &ClaimResponse, caps: &RunnerCapabilities) -> Result<(), Misfit> {
    // The image's size is not in the offer: the fetch holds it to the cache's bound.
    let pinned = offer
        .image_digest
        .as_deref()
        .map(|digest| Pinned { digest, bytes: 0 });
    fits(&offer.image, pinned, offer.size, &offer.limits, caps)?;
    // The console is kept on the volunteer's disk too: no larger than the output it lends.
    if offer.limits.console_cap > caps.max_output_size {
        return Err(Misfit::Output {
            wanted: offer.limits.console_cap,
            max: caps.max_output_size,
        });
    }
    Ok(())
}

/// The images in `dir` this runner can run: a valid manifest (`INDEX.json`) whose disk and
/// kernel are there. Sorted, at most [`MAX_IMAGES`].
pub fn images_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut images: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let index = name.strip_suffix(".json")?;
            if !valid_index(index) {
                return None;
            }
            let image = Image::load(dir, index).ok()?;
            let present = image.disk_path().is_file() && image.kernel_path().is_file();
            present.then(|| index.to_string())
        })
        .collect();
    images.sort();
    images.truncate(MAX_IMAGES);
    images
}

/// The digests complete in the image cache `root` (see [`super::images`]), the most recently
/// used first, at most [`MAX_IMAGES`].
pub fn digests_in(root: &Path) -> Vec<String> {
    use super::images::{COMPLETE, USED};
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut held: Vec<(std::time::SystemTime, String)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !construir_contract::manifest::valid_sha256(&name)
                || !e.path().join(COMPLETE).is_file()
            {
                return None;
            }
            let used = std::fs::metadata(e.path().join(USED))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            Some((used, name))
        })
        .collect();
    held.sort_by(|a, b| b.cmp(a));
    held.into_iter().take(MAX_IMAGES).map(|(_, d)| d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::JobLimits;

    fn lent() -> Lent {
        Lent {
            jobs: 2,
            memory_mib: 3072,
            vcpus: 4,
            timeout_s: 3600,
            job_size: 1 << 30,
            output_size: 512 << 20,
        }
    }

    #[test]
    fn what_is_free_is_what_is_lent_less_what_runs() {
        let lent = lent();
        let mut b = Budget::default();
        assert_eq!(b.free(&lent), (2, 3072));
        assert!(b.reserve(&lent, 2048));
        assert_eq!(b.free(&lent), (1, 1024));
        assert!(!b.reserve(&lent, 1025), "not more memory than is free");
        assert!(b.reserve(&lent, 1024));
        assert!(!b.reserve(&lent, 0), "no slot left");
        b.release(2048);
        b.release(1024);
        assert_eq!(b, Budget::default());
        b.release(1);
        assert_eq!(b, Budget::default(), "never below nothing");
    }

    #[test]
    fn capabilities_say_the_limits_and_what_is_free() {
        let lent = lent();
        let busy = Budget {
            running: 1,
            memory_mib: 1024,
        };
        let caps = capabilities(&lent, &busy, "qemu", "none", vec!["t0".into()], vec![], 0);
        caps.validate().unwrap();
        assert_eq!(caps.arch, std::env::consts::ARCH);
        assert_eq!((caps.free_slots, caps.free_memory_mib), (1, 2048));
        assert_eq!(
            (caps.max_memory_mib, caps.max_vcpus, caps.max_timeout_s),
            (3072, 4, 3600)
        );
        assert_eq!(
            (caps.max_job_size, caps.max_output_size),
            (1 << 30, 512 << 20)
        );
        // Offers are checked against them: a server cannot make the runner take more.
        let offer = |limits: JobLimits, size| ClaimResponse {
            attempt_id: construir_api::types::AttemptId(1),
            attempt_token: "t".into(),
            job_id: construir_api::types::JobId(1),
            job_name: "a_t0.tar.xz".into(),
            image: "t0".into(),
            image_digest: None,
            sha256: "0".repeat(64),
            size,
            limits,
            accept_by_ms: 0,
            lease_until_ms: 0,
            heartbeat_interval_s: 30,
            lease_s: 90,
            clock_s: None,
        };
        let small = JobLimits {
            memory_mib: 512,
            vcpus: 1,
            timeout_s: 60,
            output_size: 1 << 20,
            console_cap: 1 << 20,
        };
        check_offer(&offer(small, 1 << 20), &caps).unwrap();
        let greedy = JobLimits {
            memory_mib: 4096,
            ..small
        };
        assert!(check_offer(&offer(greedy, 1 << 20), &caps).is_err());
        assert!(check_offer(&offer(small, 2 << 30), &caps).is_err());
        let long = JobLimits {
            timeout_s: 7200,
            ..small
        };
        assert!(check_offer(&offer(long, 1), &caps).is_err());
    }

    #[test]
    fn a_runner_that_fetches_offers_pinned_images_with_no_local_one() {
        let d = "ab".repeat(32);
        let caps = capabilities(
            &lent(),
            &Budget::default(),
            "qemu",
            "none",
            vec![],
            vec![],
            1 << 30,
        );
        caps.validate().unwrap();
        assert!(caps.fetch_images && caps.image_cache_bytes == 1 << 30);
        let offer = |digest: Option<String>| ClaimResponse {
            attempt_id: construir_api::types::AttemptId(1),
            attempt_token: "t".into(),
            job_id: construir_api::types::JobId(1),
            job_name: "a_t0.tar.xz".into(),
            image: "t0".into(),
            image_digest: digest,
            sha256: "0".repeat(64),
            size: 1,
            limits: JobLimits {
                output_size: 1 << 20,
                console_cap: 1 << 20,
                ..JobLimits::DEFAULT
            },
            accept_by_ms: 0,
            lease_until_ms: 0,
            heartbeat_interval_s: 30,
            lease_s: 90,
            clock_s: None,
        };
        check_offer(&offer(Some(d.clone())), &caps).unwrap();
        assert!(check_offer(&offer(None), &caps).is_err(), "no local t0");
        // --cache-size 0: only what it holds by digest.
        let holds = capabilities(
            &lent(),
            &Budget::default(),
            "qemu",
            "none",
            vec![],
            vec![d.clone()],
            0,
        );
        assert!(!holds.fetch_images);
        check_offer(&offer(Some(d)), &holds).unwrap();
        assert!(check_offer(&offer(Some("cd".repeat(32))), &holds).is_err());
    }

    #[test]
    fn the_cache_offers_its_complete_digests_newest_first() {
        use crate::remote::images::{COMPLETE, USED};
        let d = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        for (digest, complete, used) in [
            ("a".repeat(64), true, Some(old)),
            ("b".repeat(64), true, None),
            ("c".repeat(64), false, None),
            ("not-a-digest".to_string(), true, None),
        ] {
            let dir = d.path().join(&digest);
            std::fs::create_dir(&dir).unwrap();
            if complete {
                std::fs::write(dir.join(COMPLETE), "t0").unwrap();
            }
            let f = std::fs::File::create(dir.join(USED)).unwrap();
            f.set_modified(used.unwrap_or_else(std::time::SystemTime::now))
                .unwrap();
        }
        assert_eq!(digests_in(d.path()), ["b".repeat(64), "a".repeat(64)]);
        assert!(digests_in(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn only_complete_images_are_offered() {
        let d = tempfile::tempdir().unwrap();
        let manifest = |index: &str| {
            serde_json::json!({
                "index": index, "description": "test", "disk": format!("{index}.qcow2"),
                "disk_format": "qcow2", "disk_sha256": "a".repeat(64), "virtual_size": 1 << 20,
                "kernel": "kernels/vmlinux-k", "kernel_sha256": "b".repeat(64), "memory_mib": 128,
                "vcpus": 1, "init_sha256": "c".repeat(64), "installed": [], "build_key": "k"
            })
            .to_string()
        };
        std::fs::create_dir(d.path().join("kernels")).unwrap();
        std::fs::write(d.path().join("kernels/vmlinux-k"), b"elf").unwrap();
        for index in ["t0", "i0", "i1"] {
            std::fs::write(d.path().join(format!("{index}.json")), manifest(index)).unwrap();
        }
        std::fs::write(d.path().join("t0.qcow2"), b"disk").unwrap();
        std::fs::write(d.path().join("i0.qcow2"), b"disk").unwrap();
        // i1 has no disk; a manifest under the wrong name, and junk, are not images.
        std::fs::write(d.path().join("x9.json"), manifest("t0")).unwrap();
        std::fs::write(d.path().join("README.json"), b"{}").unwrap();
        assert_eq!(images_in(d.path()), ["i0", "t0"]);
        assert!(images_in(&d.path().join("missing")).is_empty());
    }
}
