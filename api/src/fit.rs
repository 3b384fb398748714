//! Whether a runner can take a job, and if not, why: the server's dispatcher filters claims
//! with it and records the reason on jobs that no runner can take; a runner may check an offer
//! with it too.
//!
//! A job pinned to a published image (a digest) runs on those bits only: it fits a runner that
//! holds that digest, or that fetches images and whose cache can hold this one, whatever local
//! images of the same index it has (they may be other builds). A job of an index never
//! published fits by index, as before.

use crate::types::{JobLimits, RunnerCapabilities};

/// The published image a job is pinned to, as [`fits`] weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned<'a> {
    /// The image's digest (the sha256 of its manifest).
    pub digest: &'a str,
    /// Its kernel, qcow2 and manifest together, in bytes: what a fetching runner's cache must
    /// hold. 0 when not known (a runner checking an offer: its fetch checks the real sizes).
    pub bytes: u64,
}

/// Why a runner cannot take a job, for the job's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Misfit {
    #[error("no runner offers image {0}")]
    NoImage(String),
    #[error(
        "runners hold no image {image}@{}, and none fetches images of {}",
        short_digest(.digest),
        mib(*.bytes)
    )]
    NoPinnedImage {
        image: String,
        digest: String,
        bytes: u64,
    },
    #[error("the job file is {size} bytes; runners take at most {max}")]
    JobTooBig { size: u64, max: u64 },
    #[error("the job asks for {wanted} MiB of memory; runners give at most {max}")]
    Memory { wanted: u32, max: u32 },
    #[error("the job asks for {wanted} vCPUs; runners give at most {max}")]
    Vcpus { wanted: u32, max: u32 },
    #[error("the job's time limit is {wanted} s; runners allow at most {max}")]
    Timeout { wanted: u64, max: u64 },
    #[error("the job may write {wanted} bytes of output; runners upload at most {max}")]
    Output { wanted: u64, max: u64 },
    #[error("runners are busy (no free slot)")]
    NoFreeSlot,
    #[error("runners are busy (the job needs {wanted} MiB, {free} MiB free)")]
    NoFreeMemory { wanted: u32, free: u32 },
}

impl Misfit {
    /// Whether the runner could take the job later, once it has finished other work (as opposed
    /// to never, as it is now).
    pub fn is_temporary(&self) -> bool {
        matches!(self, Misfit::NoFreeSlot | Misfit::NoFreeMemory { .. })
    }
}

/// A digest's first 12 hex digits, for a message.
fn short_digest(digest: &str) -> String {
    let head: String = digest.chars().take(12).collect();
    if head.len() < digest.len() {
        format!("{head}…")
    } else {
        head
    }
}

/// Bytes as MiB, rounded up (an image of 1 byte is no image of 0 MiB).
fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// Whether a runner with `caps` can take a job for `image` (pinned to a published digest, or
/// not) with a job file of `size` bytes and these `limits` now. The permanent misfits are
/// checked first, so the error says what would never work before what only has to wait.
pub fn fits(
    image: &str,
    pinned: Option<Pinned<'_>>,
    size: u64,
    limits: &JobLimits,
    caps: &RunnerCapabilities,
) -> Result<(), Misfit> {
    match pinned {
        Some(p) => {
            let holds = caps.image_digests.iter().any(|d| d == p.digest);
            let fetches = caps.fetch_images && p.bytes <= caps.image_cache_bytes;
            if !holds && !fetches {
                return Err(Misfit::NoPinnedImage {
                    image: image.to_string(),
                    digest: p.digest.to_string(),
                    bytes: p.bytes,
                });
            }
        }
        None if !caps.images.iter().any(|i| i == image) => {
            return Err(Misfit::NoImage(image.to_string()));
        }
        None => {}
    }
    if size > caps.max_job_size {
        return Err(Misfit::JobTooBig {
            size,
            max: caps.max_job_size,
        });
    }
    if limits.memory_mib > caps.max_memory_mib {
        return Err(Misfit::Memory {
            wanted: limits.memory_mib,
            max: caps.max_memory_mib,
        });
    }
    if limits.vcpus > caps.max_vcpus {
        return Err(Misfit::Vcpus {
            wanted: limits.vcpus,
            max: caps.max_vcpus,
        });
    }
    if limits.timeout_s > caps.max_timeout_s {
        return Err(Misfit::Timeout {
            wanted: limits.timeout_s,
            max: caps.max_timeout_s,
        });
    }
    if limits.output_size > caps.max_output_size {
        return Err(Misfit::Output {
            wanted: limits.output_size,
            max: caps.max_output_size,
        });
    }
    if caps.free_slots == 0 {
        return Err(Misfit::NoFreeSlot);
    }
    if limits.memory_mib > caps.free_memory_mib {
        return Err(Misfit::NoFreeMemory {
            wanted: limits.memory_mib,
            free: caps.free_memory_mib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> RunnerCapabilities {
        RunnerCapabilities {
            arch: "x86_64".into(),
            backend: "qemu".into(),
            host_kind: "emulated".into(),
            images: vec!["i0".into()],
            max_memory_mib: 2048,
            max_vcpus: 2,
            max_timeout_s: 3600,
            max_job_size: 1 << 30,
            max_output_size: 1 << 30,
            free_slots: 1,
            free_memory_mib: 1024,
            image_digests: Vec::new(),
            fetch_images: false,
            image_cache_bytes: 0,
        }
    }

    #[test]
    fn a_job_within_the_runners_means_fits() {
        fits("i0", None, 64 << 20, &JobLimits::DEFAULT, &caps()).unwrap();
    }

    #[test]
    fn each_misfit_is_named_permanent_ones_first() {
        let limits = JobLimits::DEFAULT;
        let e = fits("i9", None, 1, &limits, &caps()).unwrap_err();
        assert_eq!(e.to_string(), "no runner offers image i9");
        assert!(!e.is_temporary());
        assert!(matches!(
            fits("i0", None, 2 << 30, &limits, &caps()),
            Err(Misfit::JobTooBig { .. })
        ));
        let big = JobLimits {
            memory_mib: 4096,
            ..limits
        };
        assert!(matches!(
            fits("i0", None, 1, &big, &caps()),
            Err(Misfit::Memory { .. })
        ));
        let many = JobLimits { vcpus: 3, ..limits };
        assert!(matches!(
            fits("i0", None, 1, &many, &caps()),
            Err(Misfit::Vcpus { .. })
        ));
        let long = JobLimits {
            timeout_s: 7200,
            ..limits
        };
        assert!(matches!(
            fits("i0", None, 1, &long, &caps()),
            Err(Misfit::Timeout { .. })
        ));
        let wordy = JobLimits {
            output_size: 2 << 30,
            ..limits
        };
        assert!(matches!(
            fits("i0", None, 1, &wordy, &caps()),
            Err(Misfit::Output { .. })
        ));
        let busy = RunnerCapabilities {
            free_slots: 0,
            ..caps()
        };
        let e = fits("i0", None, 1, &limits, &busy).unwrap_err();
        assert_eq!(e, Misfit::NoFreeSlot);
        assert!(e.is_temporary());
        let full = RunnerCapabilities {
            free_memory_mib: 512,
            ..caps()
        };
        assert!(
            fits("i0", None, 1, &limits, &full)
                .unwrap_err()
                .is_temporary()
        );
    }

    #[test]
    fn a_pinned_job_fits_a_runner_that_holds_its_digest_or_fetches_it() {
        let limits = JobLimits::DEFAULT;
        let d = "ab".repeat(32);
        let pinned = Some(Pinned {
            digest: &d,
            bytes: 300 << 20,
        });
        // Holding i0 by index is not enough: those may be other bits.
        let e = fits("i0", pinned, 1, &limits, &caps()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "runners hold no image i0@abababababab…, and none fetches images of 300 MiB"
        );
        assert!(!e.is_temporary());
        let holds = RunnerCapabilities {
            images: Vec::new(),
            image_digests: vec!["cd".repeat(32), d.clone()],
            ..caps()
        };
        fits("i0", pinned, 1, &limits, &holds).unwrap();
        let fetches = RunnerCapabilities {
            images: Vec::new(),
            fetch_images: true,
            image_cache_bytes: 300 << 20,
            ..caps()
        };
        fits("i0", pinned, 1, &limits, &fetches).unwrap();
        // A cache too small for it, or a cache but no fetching: no.
        let small = RunnerCapabilities {
            image_cache_bytes: (300 << 20) - 1,
            ..fetches.clone()
        };
        assert!(matches!(
            fits("i0", pinned, 1, &limits, &small),
            Err(Misfit::NoPinnedImage { .. })
        ));
        let no_fetch = RunnerCapabilities {
            fetch_images: false,
            ..fetches.clone()
        };
        assert!(fits("i0", pinned, 1, &limits, &no_fetch).is_err());
        // The other limits still hold for a pinned job.
        assert!(matches!(
            fits("i0", pinned, 2 << 30, &limits, &fetches),
            Err(Misfit::JobTooBig { .. })
        ));
        // An unpinned job still needs the index, and a runner with only digests has none.
        assert_eq!(
            fits("i0", None, 1, &limits, &holds),
            Err(Misfit::NoImage("i0".into()))
        );
    }
}
