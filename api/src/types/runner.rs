//! The runner's side: claiming work, heartbeats, reports, aborts, log pieces.
//!
//! A runner's life with one attempt: claim (a long poll) → start (before `accept_by_ms`) →
//! download the job → heartbeats while it boots and runs the job, log pieces alongside →
//! upload-begun → output and console uploads → report. At any point before the report it may
//! abort instead (an infrastructure failure: the job is not blamed and is tried again).

use super::{AttemptId, InvalidField, JobId, JobLimits, valid_image_index};
use serde::{Deserialize, Serialize};

/// The longest a claim may wait for work, in seconds (a long poll held open longer is cut by
/// proxies).
pub const MAX_CLAIM_WAIT_S: u32 = 30;

/// The longest reason a runner may send (an abort's, a report's), in bytes.
pub const MAX_REASON_BYTES: usize = 2048;

/// The most images a runner may offer in one claim.
pub const MAX_IMAGES: usize = 64;

/// The backends a runner may name (construir-runner's `--backend`, and its test program).
pub const BACKENDS: &[&str] = &["vmm", "qemu", "program"];

/// The host kinds a runner may name: what its guests run on (construir-contract's host kinds as
/// speed classes).
pub const HOST_KINDS: &[&str] = &["hardware", "emulated", "none"];

/// The longest name (arch, backend, host kind) a runner may send, in bytes.
const MAX_NAME_BYTES: usize = 32;

/// What a runner can run, sent with every claim so that a changed runner (an image added, a
/// slot taken by a local job) never gets work it cannot do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RunnerCapabilities {
    /// The host's architecture, as Rust spells it (`x86_64`).
    pub arch: String,
    /// The backend its jobs run on: `vmm` or `qemu`.
    pub backend: String,
    /// `hardware`, `emulated` or `none` (construir-contract's host kinds).
    pub host_kind: String,
    /// The build images it holds (`i0`, `t0`).
    pub images: Vec<String>,
    /// The largest guest it runs: memory in MiB, vCPUs, time limit in seconds.
    pub max_memory_mib: u32,
    pub max_vcpus: u32,
    pub max_timeout_s: u64,
    /// The largest job file it takes, and the most output it will upload, in bytes.
    pub max_job_size: u64,
    pub max_output_size: u64,
    /// Jobs it can start now, and the host memory it has free for them, in MiB.
    pub free_slots: u32,
    pub free_memory_mib: u32,
    /// The published images it holds complete, by digest (64 lower-case hex digits; at most
    /// [`MAX_IMAGES`]): it runs a job pinned to one of them without fetching anything.
    #[serde(default)]
    pub image_digests: Vec<String>,
    /// Whether it fetches published images it lacks from the server, by digest.
    #[serde(default)]
    pub fetch_images: bool,
    /// The bytes its image cache holds at most (its `--cache-size`): an image larger than this
    /// it cannot fetch.
    #[serde(default)]
    pub image_cache_bytes: u64,
}

impl RunnerCapabilities {
    /// Checks what a runner may get wrong: names (lower-case letters, digits, `_`, `-`, at most
    /// 32 bytes), the image list (at most 64 valid indices, and at least one unless it holds or
    /// fetches published images), the digests (at most 64 sha256s).
    pub fn validate(&self) -> Result<(), InvalidField> {
        for (field, value) in [
            ("capabilities.arch", &self.arch),
            ("capabilities.backend", &self.backend),
            ("capabilities.host_kind", &self.host_kind),
        ] {
            let plain = value
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
            if value.is_empty() || value.len() > MAX_NAME_BYTES || !plain {
                return Err(InvalidField::new(
                    field,
                    format!("expected 1 to {MAX_NAME_BYTES} lower-case letters, digits, _ or -"),
                ));
            }
        }
        // A closed set: the host class (backend/host kind) decides which runners a job's
        // replicas may share, so a runner cannot invent one.
        if !BACKENDS.contains(&self.backend.as_str()) {
            return Err(InvalidField::new(
                "capabilities.backend",
                format!("expected one of {}", BACKENDS.join(", ")),
            ));
        }
        if !HOST_KINDS.contains(&self.host_kind.as_str()) {
            return Err(InvalidField::new(
                "capabilities.host_kind",
                format!("expected one of {}", HOST_KINDS.join(", ")),
            ));
        }
        // A runner with no local image may still run pinned jobs: the ones it holds by digest,
        // or any it fetches.
        let by_digest = self.fetch_images || !self.image_digests.is_empty();
        if (self.images.is_empty() && !by_digest) || self.images.len() > MAX_IMAGES {
            return Err(InvalidField::new(
                "capabilities.images",
                format!(
                    "expected 1 to {MAX_IMAGES} images (or none, from a runner that holds or \
                     fetches images by digest)"
                ),
            ));
        }
        if self.image_digests.len() > MAX_IMAGES {
            return Err(InvalidField::new(
                "capabilities.image_digests",
                format!("expected at most {MAX_IMAGES} digests"),
            ));
        }
        if let Some(bad) = self.image_digests.iter().find(|d| !super::valid_sha256(d)) {
            return Err(InvalidField::new(
                "capabilities.image_digests",
                format!(
                    "{:?} is not an image digest (64 lower-case hex digits)",
                    bad.chars().take(80).collect::<String>()
                ),
            ));
        }
        if let Some(bad) = self.images.iter().find(|i| !valid_image_index(i)) {
            return Err(InvalidField::new(
                "capabilities.images",
                format!(
                    "{:?} is not an image index (a letter and digits, like i0)",
                    bad.chars().take(40).collect::<String>()
                ),
            ));
        }
        Ok(())
    }
}

/// `POST /api/v1/runner/claim`: asks for one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub capabilities: RunnerCapabilities,
    /// How long the server may hold the request open waiting for work, 0 to
    /// [`MAX_CLAIM_WAIT_S`] seconds (default 0: answer at once).
    #[serde(default)]
    pub wait_s: u32,
}

impl ClaimRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        if self.wait_s > MAX_CLAIM_WAIT_S {
            return Err(InvalidField::new(
                "wait_s",
                format!("{} is above {MAX_CLAIM_WAIT_S}", self.wait_s),
            ));
        }
        self.capabilities.validate()
    }
}

/// The answer to a claim that got work (a claim that got none is answered 204, no body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimResponse {
    pub attempt_id: AttemptId,
    /// The bearer token for this attempt's calls; it dies with the attempt.
    pub attempt_token: String,
    pub job_id: JobId,
    /// The job file's name (`hello_i0.tar.xz`).
    pub job_name: String,
    pub image: String,
    /// The published image digest the job is pinned to, if any (its signed statement names
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// sha256 and size of the job file: the runner checks what it downloads against them.
    pub sha256: String,
    pub size: u64,
    pub limits: JobLimits,
    /// The attempt must be started before this time, else it expires (and the job goes to
    /// another runner, unblamed).
    pub accept_by_ms: u64,
    /// The lease holds until this time unless a heartbeat extends it.
    pub lease_until_ms: u64,
    /// How often to send a heartbeat, in seconds.
    pub heartbeat_interval_s: u64,
    /// How far each heartbeat extends the lease, in seconds.
    pub lease_s: u64,
    /// The time (Unix seconds) the job's guest clock starts at, fixed by the server for the job
    /// (its submission), so that every replica sees the same time; the guest gets it as
    /// `SOURCE_DATE_EPOCH` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_s: Option<u64>,
}

/// What a runner is doing with an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Downloading,
    Booting,
    Running,
    Uploading,
}

/// `POST /api/v1/runner/attempts/{id}/heartbeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub phase: Phase,
    /// Console bytes the runner has seen so far (shown while the log is being sent).
    pub console_bytes: u64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// The lease now holds until this time. It stops growing at start + timeout + margin: a
    /// job cannot hold a runner's slot past its limit by heartbeats.
    pub lease_until_ms: u64,
    /// The job was canceled: stop the VM, then report or abort.
    pub cancel: bool,
}

/// How a run ended, as the runner's record says (`status`). The first five are the job's
/// outcome; the rest are the runner's own failures, never counted against the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ReportStatus {
    /// The job exited with status 0.
    Success,
    /// The job exited with another status or was killed by a signal.
    Failed,
    /// The job file holds no readable archive or no `opt/job/construir`.
    InvalidJob,
    /// The job ran past its time limit.
    TimedOut,
    /// The guest failed: a panic, a crash, an end without a report.
    GuestFailed,
    /// The runner was stopped (SIGINT/SIGTERM) while the job ran.
    Interrupted,
    /// The runner does not have the image after all.
    UnknownImage,
    /// The backend could not run guests or set the VM up.
    BackendFailed,
    /// The VMM process was killed (seccomp, a resource limit, a crash).
    VmmFault,
    /// The runner died during this run too often.
    CrashedRunner,
}

impl ReportStatus {
    /// Whether this is the job's own outcome (it stands as the result) rather than a failure
    /// of the runner (the job is tried again elsewhere).
    pub fn is_job_outcome(self) -> bool {
        matches!(
            self,
            ReportStatus::Success
                | ReportStatus::Failed
                | ReportStatus::InvalidJob
                | ReportStatus::TimedOut
                | ReportStatus::GuestFailed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReportStatus::Success => "success",
            ReportStatus::Failed => "failed",
            ReportStatus::InvalidJob => "invalid-job",
            ReportStatus::TimedOut => "timed-out",
            ReportStatus::GuestFailed => "guest-failed",
            ReportStatus::Interrupted => "interrupted",
            ReportStatus::UnknownImage => "unknown-image",
            ReportStatus::BackendFailed => "backend-failed",
            ReportStatus::VmmFault => "vmm-fault",
            ReportStatus::CrashedRunner => "crashed-runner",
        }
    }
}

impl std::fmt::Display for ReportStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long each phase took on the runner, in milliseconds (by the runner's clock: shown, never
/// used for decisions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PhaseTimes {
    #[serde(default)]
    pub download_ms: Option<u64>,
    #[serde(default)]
    pub boot_ms: Option<u64>,
    #[serde(default)]
    pub run_ms: Option<u64>,
    #[serde(default)]
    pub upload_ms: Option<u64>,
}

/// `POST /api/v1/runner/attempts/{id}/report`: the run's outcome, after the uploads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    pub status: ReportStatus,
    /// The launcher's exit code (construir-contract's outcome codes, 0 to 255), if it ran.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The job's own exit status, if it ran to its end (a signal as 128 + signal).
    #[serde(default)]
    pub job_exit_status: Option<u16>,
    /// The record's reason, for a person (at most [`MAX_REASON_BYTES`]).
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub times: PhaseTimes,
    /// The sha256 of the output the runner uploaded, as the runner computed it (64 lower-case
    /// hex digits), or none if it uploaded none. The server refuses a report whose output is
    /// not the one it received and hashed itself, so a result never stands on an output its
    /// runner did not send. Optional so that runners from before it are still understood.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_sha256: Option<String>,
    /// The output's tree digest as the runner computed it
    /// (`construir_contract::archive::tree_digest`): the server's own index of the output must
    /// give the same, else the attempt's vote is disowned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tree_sha256: Option<String>,
    /// The report as a statement signed with the runner's key ([`crate::trust::Statement`]):
    /// the server checks it against the report and its own records. Required for a replicated
    /// job; kept with the attempt, and put in the job's receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<crate::trust::SignedStatement>,
}

impl ReportRequest {
    /// Checks the sizes, the output's digest, and that the status and the job's exit status
    /// agree.
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_reason("reason", &self.reason, true)?;
        for (field, sha) in [
            ("output_sha256", &self.output_sha256),
            ("output_tree_sha256", &self.output_tree_sha256),
        ] {
            if let Some(sha) = sha
                && !super::valid_sha256(sha)
            {
                return Err(InvalidField::new(
                    field,
                    "expected 64 lower-case hex digits",
                ));
            }
        }
        if self.output_tree_sha256.is_some() && self.output_sha256.is_none() {
            return Err(InvalidField::new(
                "output_tree_sha256",
                "a tree digest without an output",
            ));
        }
        if let Some(code) = self.exit_code.filter(|c| !(0..=255).contains(c)) {
            return Err(InvalidField::new(
                "exit_code",
                format!("{code} is not 0 to 255"),
            ));
        }
        let agrees = match (self.status, self.job_exit_status) {
            (ReportStatus::Success, Some(s)) => s == 0,
            (ReportStatus::Failed, Some(s)) => s != 0,
            _ => true,
        };
        if !agrees {
            return Err(InvalidField::new(
                "job_exit_status",
                format!(
                    "{} does not agree with status {}",
                    self.job_exit_status.unwrap_or_default(),
                    self.status
                ),
            ));
        }
        Ok(())
    }
}

/// `POST /api/v1/runner/attempts/{id}/abort`: the runner gives the attempt up for a reason of
/// its own (it lost its disk, it is shutting down, the download failed). The job is not blamed:
/// it is tried again, with a back-off, until its tries run out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {
    /// Why, for a person (1 to [`MAX_REASON_BYTES`] bytes).
    pub reason: String,
}

impl AbortRequest {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_reason("reason", &self.reason, false)
    }
}

fn check_reason(field: &'static str, text: &str, may_be_empty: bool) -> Result<(), InvalidField> {
    if text.len() > MAX_REASON_BYTES {
        return Err(InvalidField::new(
            field,
            format!("{} bytes; at most {MAX_REASON_BYTES}", text.len()),
        ));
    }
    if !may_be_empty && text.trim().is_empty() {
        return Err(InvalidField::new(field, "must say why"));
    }
    Ok(())
}

/// The answer to a log piece (`PATCH /api/v1/runner/attempts/{id}/log?offset=N`, the piece as
/// the body), whether it was stored, already held, or not adjacent. The runner always goes on
/// from `next_offset`, which makes appends resumable after any lost answer:
///
/// - a piece at `offset == next_offset` is appended;
/// - a piece, or the part of one, at offsets already stored is stored once: the stored bytes
///   win and only the new tail is appended (a resent piece is harmless);
/// - a piece past `next_offset` (a gap) is not stored and answered with 416 and this body:
///   resend from `next_offset`.
///
/// Bytes past the job's `console_cap` are counted but not kept. [`crate::log::plan_append`]
/// is the rule as a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogOffsetResponse {
    /// Every console byte before this offset has been received.
    pub next_offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> RunnerCapabilities {
        RunnerCapabilities {
            arch: "x86_64".into(),
            backend: "vmm".into(),
            host_kind: "hardware".into(),
            images: vec!["i0".into(), "t0".into()],
            max_memory_mib: 4096,
            max_vcpus: 4,
            max_timeout_s: 3600,
            max_job_size: 8 << 30,
            max_output_size: 8 << 30,
            free_slots: 2,
            free_memory_mib: 3072,
            image_digests: Vec::new(),
            fetch_images: false,
            image_cache_bytes: 0,
        }
    }

    #[test]
    fn claims_are_checked() {
        let mut claim = ClaimRequest {
            capabilities: caps(),
            wait_s: 30,
        };
        claim.validate().unwrap();
        claim.wait_s = 31;
        assert_eq!(claim.validate().unwrap_err().field, "wait_s");
        claim.wait_s = 0;
        claim.capabilities.images = vec!["i0".into(), "I1".into()];
        assert_eq!(claim.validate().unwrap_err().field, "capabilities.images");
        claim.capabilities.images.clear();
        assert_eq!(claim.validate().unwrap_err().field, "capabilities.images");
        claim.capabilities = caps();
        claim.capabilities.arch = "x86 64".into();
        assert_eq!(claim.validate().unwrap_err().field, "capabilities.arch");
        claim.capabilities = caps();
        claim.capabilities.backend = "zzz".into();
        assert_eq!(claim.validate().unwrap_err().field, "capabilities.backend");
        claim.capabilities = caps();
        claim.capabilities.host_kind = "quantum".into();
        assert_eq!(
            claim.validate().unwrap_err().field,
            "capabilities.host_kind"
        );
        let text = serde_json::json!({"capabilities": caps(), "wait_s": 5, "slots": 1}).to_string();
        assert!(serde_json::from_str::<ClaimRequest>(&text).is_err());
    }

    #[test]
    fn digests_are_sha256s_and_a_runner_that_fetches_needs_no_local_image() {
        let mut c = caps();
        c.image_digests = vec!["ab".repeat(32)];
        c.validate().unwrap();
        c.image_digests = vec!["AB".repeat(32)];
        assert_eq!(
            c.validate().unwrap_err().field,
            "capabilities.image_digests"
        );
        c.image_digests = vec!["ab".repeat(33)];
        assert_eq!(
            c.validate().unwrap_err().field,
            "capabilities.image_digests"
        );
        c.image_digests = vec!["0".repeat(64); MAX_IMAGES + 1];
        assert_eq!(
            c.validate().unwrap_err().field,
            "capabilities.image_digests"
        );
        // No local image: fine for a runner that fetches, or holds digests; not otherwise.
        c.image_digests.clear();
        c.images.clear();
        assert_eq!(c.validate().unwrap_err().field, "capabilities.images");
        c.fetch_images = true;
        c.image_cache_bytes = 20 << 30;
        c.validate().unwrap();
        c.fetch_images = false;
        c.image_digests = vec!["0".repeat(64)];
        c.validate().unwrap();
        // Older runners send none of the three fields.
        let mut old = serde_json::to_value(caps()).unwrap();
        for f in ["image_digests", "fetch_images", "image_cache_bytes"] {
            old.as_object_mut().unwrap().remove(f);
        }
        let c: RunnerCapabilities = serde_json::from_value(old).unwrap();
        assert!(c.image_digests.is_empty() && !c.fetch_images && c.image_cache_bytes == 0);
        c.validate().unwrap();
    }

    #[test]
    fn reports_use_the_records_status_strings() {
        let r: ReportRequest = serde_json::from_str(
            r#"{"status": "failed", "exit_code": 2, "job_exit_status": 2, "reason": "job failed with exit status 2",
                "times": {"boot_ms": 900, "run_ms": 1200}}"#,
        )
        .unwrap();
        r.validate().unwrap();
        assert_eq!(r.times.boot_ms, Some(900));
        for s in [
            "vmm-fault",
            "crashed-runner",
            "backend-failed",
            "timed-out",
            "invalid-job",
        ] {
            let r: ReportRequest =
                serde_json::from_str(&format!(r#"{{"status": "{s}"}}"#)).unwrap();
            assert_eq!(r.status.as_str(), s);
        }
        assert!(serde_json::from_str::<ReportRequest>(r#"{"status": "too-big"}"#).is_err());
        // The output's digest is optional (older runners), and sent as given.
        assert_eq!(r.output_sha256, None);
        let sha = "0f".repeat(32);
        let r: ReportRequest = serde_json::from_str(&format!(
            r#"{{"status": "success", "output_sha256": "{sha}"}}"#
        ))
        .unwrap();
        assert_eq!(r.output_sha256.as_deref(), Some(sha.as_str()));
        let text = serde_json::to_string(&ReportRequest {
            output_sha256: None,
            ..r
        })
        .unwrap();
        assert!(!text.contains("output_sha256"), "{text}");
        assert!(ReportStatus::GuestFailed.is_job_outcome());
        assert!(!ReportStatus::VmmFault.is_job_outcome());
        assert!(!ReportStatus::Interrupted.is_job_outcome());
    }

    #[test]
    fn inconsistent_or_oversized_reports_are_refused() {
        let ok = ReportRequest {
            status: ReportStatus::Success,
            exit_code: Some(0),
            job_exit_status: Some(0),
            reason: String::new(),
            times: PhaseTimes::default(),
            output_sha256: Some("ab".repeat(32)),
            output_tree_sha256: None,
            statement: None,
        };
        ok.validate().unwrap();
        for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            let r = ReportRequest {
                output_sha256: Some(bad),
                ..ok.clone()
            };
            assert_eq!(r.validate().unwrap_err().field, "output_sha256");
        }
        let bad_status = ReportRequest {
            job_exit_status: Some(1),
            ..ok.clone()
        };
        assert_eq!(bad_status.validate().unwrap_err().field, "job_exit_status");
        let failed_zero = ReportRequest {
            status: ReportStatus::Failed,
            job_exit_status: Some(0),
            ..ok.clone()
        };
        assert_eq!(failed_zero.validate().unwrap_err().field, "job_exit_status");
        let bad_code = ReportRequest {
            exit_code: Some(300),
            ..ok.clone()
        };
        assert_eq!(bad_code.validate().unwrap_err().field, "exit_code");
        let long = ReportRequest {
            reason: "x".repeat(MAX_REASON_BYTES + 1),
            ..ok
        };
        assert_eq!(long.validate().unwrap_err().field, "reason");
        assert!(AbortRequest { reason: " ".into() }.validate().is_err());
        AbortRequest {
            reason: "the download failed".into(),
        }
        .validate()
        .unwrap();
    }
}
