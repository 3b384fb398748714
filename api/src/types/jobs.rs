//! The submitter's side: submitting a job, and what a job and its attempts look like.

use super::{AttemptId, InvalidField, JobId, JobLimits, Phase, ReportStatus, RunnerId, UserId};
use serde::{Deserialize, Serialize};

/// The lowest [`SubmitParams::priority`].
pub const MIN_PRIORITY: i32 = -100;
/// The highest [`SubmitParams::priority`].
pub const MAX_PRIORITY: i32 = 100;

/// A job's state. See docs/api.md for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for a runner (also between tries, until `retry_not_before_ms`).
    Queued,
    /// An attempt holds it (leased, running or uploading).
    Running,
    /// An attempt reported that the job succeeded.
    Succeeded,
    /// An attempt reported that the job itself failed: a non-zero exit, an invalid job, a
    /// timeout, a failed guest. Not retried: another run would fail the same way.
    Failed,
    /// Canceled by its submitter or an admin.
    Canceled,
    /// Its tries ran out, each ended by something that is not the job's fault (a lapsed lease, a
    /// runner's abort, a runner-side failure).
    Errored,
    /// No runner took it within its time-to-live (see `reason` for why none could).
    Expired,
    /// Its replicas did not agree: no `quorum` of them reported the same outcome before the
    /// job's most attempts with an outcome had run (each attempt's vote is in `attempts`).
    Inconclusive,
}

impl JobState {
    /// Whether the job has ended: nothing changes its state any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::Errored => "errored",
            JobState::Expired => "expired",
            JobState::Inconclusive => "inconclusive",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attempt's state. See docs/api.md for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum AttemptState {
    /// A runner claimed it and must start it before `accept_by_ms`.
    Leased,
    /// The runner started it (downloading, booting, running the job).
    Running,
    /// The job has run; the runner is uploading its output and console.
    Uploading,
    /// The runner reported a job outcome (success or the job's own failure).
    Reported,
    /// Its lease lapsed, or it was not started within the accept window.
    Expired,
    /// The runner gave it up for a reason of its own (an infrastructure failure), or reported a
    /// runner-side failure.
    Aborted,
    /// The job was canceled while this attempt held it.
    Canceled,
}

impl AttemptState {
    /// Whether the attempt still holds its job (its runner may work on it).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            AttemptState::Leased | AttemptState::Running | AttemptState::Uploading
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Leased => "leased",
            AttemptState::Running => "running",
            AttemptState::Uploading => "uploading",
            AttemptState::Reported => "reported",
            AttemptState::Expired => "expired",
            AttemptState::Aborted => "aborted",
            AttemptState::Canceled => "canceled",
        }
    }
}

impl std::fmt::Display for AttemptState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The query of a submission (`POST /api/v1/jobs?…`); the job file itself is the raw request
/// body, and its name comes with it. Every field may be left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitParams {
    /// The build image (`i0`); default: the index in the job file's name (`NAME_i0.tar.xz`).
    #[serde(default)]
    pub image: Option<String>,
    /// Overrides [`JobLimits::timeout_s`].
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Overrides [`JobLimits::output_size`].
    #[serde(default)]
    pub output_size: Option<u64>,
    /// Overrides [`JobLimits::console_cap`].
    #[serde(default)]
    pub console_cap: Option<u64>,
    /// Overrides [`JobLimits::memory_mib`].
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Overrides [`JobLimits::vcpus`].
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Order among the submitter's own jobs, [`MIN_PRIORITY`] to [`MAX_PRIORITY`] (default 0;
    /// higher first). It never puts a job ahead of other submitters' fair share.
    #[serde(default)]
    pub priority: i32,
    /// How many runners, of distinct owners, run the job (1 to [`MAX_REPLICAS`], default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// How many of them must agree on the outcome (status, exit status, output tree) for it to
    /// stand (1 to `replicas`, default `replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<u32>,
    /// Let the submitter's own runners take replicas of a replicated job (by default they take
    /// none: a result the submitter's machine vouches for is no check on it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_runners: bool,
    /// Let replicas run on runners of different host classes (a TCG runner and a KVM one); by
    /// default all run on the first one's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_class: bool,
    /// Let one runner of good standing run the replicated job alone, where the server allows it
    /// (`--adaptive-after`; BOINC's adaptive replication): the result is then `on-standing`,
    /// not `verified`, unless the server's random audit asks for the other replicas. Needs a
    /// quorum of 2 or more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adaptive: bool,
    /// `true`: show the job, its console and its output only to its owner and admins (anyone
    /// else is told there is no such job); `false`: a public job, its page, console, output and
    /// receipt anyone's to see (what `construir submit` and the website send unless asked for
    /// private). Left out, the job is private: that is what a client of a release before public
    /// jobs meant. Private or not, it runs on a stranger's machine: a job must carry no
    /// secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private: Option<bool>,
}

/// The most replicas a job may ask for.
pub const MAX_REPLICAS: u32 = 8;

impl SubmitParams {
    /// The replicas and quorum asked for, checked: 1 ≤ quorum ≤ replicas ≤ [`MAX_REPLICAS`].
    pub fn replication(&self) -> Result<(u32, u32), InvalidField> {
        let replicas = self.replicas.unwrap_or(1);
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(InvalidField::new(
                "replicas",
                format!("{replicas} is outside 1..={MAX_REPLICAS}"),
            ));
        }
        let quorum = self.quorum.unwrap_or(replicas);
        if !(1..=replicas).contains(&quorum) {
            return Err(InvalidField::new(
                "quorum",
                format!("{quorum} is outside 1..={replicas} (the replicas)"),
            ));
        }
        if self.adaptive && quorum < 2 {
            return Err(InvalidField::new(
                "adaptive",
                format!(
                    "a quorum of {quorum} has no replicas to spare: adaptive replication lets \
                     one runner stand in for a quorum of 2 or more"
                ),
            ));
        }
        Ok((replicas, quorum))
    }

    /// The job's limits: `defaults` with this submission's overrides, checked against
    /// `server_max`; also checks the priority and the image's spelling.
    pub fn resolve(
        &self,
        defaults: &JobLimits,
        server_max: &JobLimits,
    ) -> Result<JobLimits, InvalidField> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(InvalidField::new(
                "priority",
                format!(
                    "{} is outside {MIN_PRIORITY}..={MAX_PRIORITY}",
                    self.priority
                ),
            ));
        }
        let bad_image = self.image.as_ref().filter(|i| !super::valid_image_index(i));
        if let Some(image) = bad_image {
            return Err(InvalidField::new(
                "image",
                format!(
                    "{:?} is not an image index (a letter and digits, like i0)",
                    image.chars().take(40).collect::<String>()
                ),
            ));
        }
        let limits = JobLimits {
            timeout_s: self.timeout_s.unwrap_or(defaults.timeout_s),
            output_size: self.output_size.unwrap_or(defaults.output_size),
            console_cap: self.console_cap.unwrap_or(defaults.console_cap),
            memory_mib: self.memory_mib.unwrap_or(defaults.memory_mib),
            vcpus: self.vcpus.unwrap_or(defaults.vcpus),
        };
        limits.validate(server_max)?;
        self.replication()?;
        Ok(limits)
    }
}

/// A job as its submitter sees it (`GET /api/v1/jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobView {
    pub id: JobId,
    /// Who submitted it.
    pub owner: UserId,
    /// The job file's name as submitted (`hello_i0.tar.xz`).
    pub name: String,
    /// The build image it runs in (`i0`).
    pub image: String,
    /// The published image digest the job is pinned to (see `GET /api/v1/images`), if its image
    /// index had one when it was submitted; none: runners use their own image of that index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// sha256 of the job file as submitted (lower-case hex).
    pub sha256: String,
    /// The job file's size in bytes (it is the job's disk).
    pub size: u64,
    pub limits: JobLimits,
    pub priority: i32,
    pub state: JobState,
    /// When it was submitted.
    pub created_ms: u64,
    /// When it reached its terminal state.
    pub ended_ms: Option<u64>,
    /// Why it is in its state, for a person: which attempt holds it, why it waits, why it
    /// ended; for a job that no runner can take, why not (`no runner offers image i9`).
    pub reason: String,
    /// A cancel was asked for and the attempt holding the job has not stopped yet.
    pub cancel_requested: bool,
    /// While queued after a failed try: no runner gets it before this time.
    pub retry_not_before_ms: Option<u64>,
    /// Every attempt, oldest first, including the ones that did not count.
    pub attempts: Vec<AttemptView>,
    /// The attempt whose result stands (its output is the job's output), once there is one.
    pub result_attempt: Option<AttemptId>,
    /// How many runners run it, and how many must agree.
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default = "one")]
    pub quorum: u32,
    /// The attempts whose agreeing outcome stands (the quorum), once it is reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agreeing: Vec<AttemptId>,
    /// How far the result is vouched for, once there is one: `verified` (a quorum of 2 or more
    /// owners agreed), `on-standing` (one runner of good standing ran it alone, unaudited),
    /// `unverified` (one runner's word), `self-attested` (only the submitter's own runners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<crate::trust::Attestation>,
    /// Runners of the agreeing attempts whose tokens have been revoked since: the result stands
    /// on their word, which their owners or an admin have withdrawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_runners: Vec<RunnerId>,
    /// The job was submitted with `adaptive` (one runner of good standing may run it alone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adaptive: bool,
    /// Seen only by its owner and admins.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    /// The result stands on one runner's standing (attestation `on-standing`): what let it run
    /// alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_alone: Option<super::RanAlone>,
}

fn one() -> u32 {
    1
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AttemptView {
    pub id: AttemptId,
    /// The runner that claimed it, and that runner's owner.
    pub runner: RunnerId,
    #[serde(default)]
    pub runner_owner: UserId,
    pub state: AttemptState,
    /// What it is doing, or what ended it: `lease lapsed`, `runner stopped (interrupted)`,
    /// `job failed with exit status 2`, …
    pub why: String,
    /// It reported after it had stopped being live (its lease lapsed, it was aborted): the
    /// report is kept, never taken as the job's result.
    pub late: bool,
    /// When it was claimed, started (by the server's clock) and ended.
    pub claimed_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// The phase its runner last said it was in.
    pub phase: Option<Phase>,
    /// The reported status, the launcher's exit code and the job's own exit status, as the
    /// runner's record gave them (when it reported).
    pub status: Option<ReportStatus>,
    pub exit_code: Option<i32>,
    pub job_exit_status: Option<u16>,
    /// sha256 and size of the output the server received (hashed by the server itself).
    pub output_sha256: Option<String>,
    pub output_size: Option<u64>,
    /// Console bytes the server holds.
    pub console_size: u64,
    /// The output's index, made by the server when it arrived: its tree digest (what replicas
    /// must agree on) and entries, or why it could not be indexed. Its entries are served at
    /// `GET /api/v1/jobs/{id}/output/index`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_index: Option<OutputIndexView>,
    /// What it votes for in a replicated job, once known (`success 0 tree 3fa4…`); none while
    /// its output is being indexed, or when its report is no vote (a runner's failure, late).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote: Option<String>,
    /// Its runner signed its report (an ed25519 statement, checked by the server).
    #[serde(default)]
    pub signed: bool,
    /// It ran alone on its runner's standing (adaptive replication): `alone`, and once its
    /// vote is in, `alone, audited` or `alone, not audited` (the draw is shown to no one
    /// before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone: Option<String>,
    /// How long its phases took, as its runner's report says (download, boot, run, upload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<super::PhaseTimes>,
}

/// What the server's index of an output says in brief.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputIndexView {
    /// The SHA-256 of the sorted entries' kinds, paths, permission bits, sizes and contents
    /// (`construir_contract::archive::tree_digest`): not times, owners or the compression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// Why the output is not an archive the server could read (it is kept all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_kebab_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&JobState::Queued).unwrap(),
            "\"queued\""
        );
        assert_eq!(
            serde_json::from_str::<AttemptState>("\"uploading\"").unwrap(),
            AttemptState::Uploading
        );
        for s in [JobState::Succeeded, JobState::Expired] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!(!JobState::Running.is_terminal() && JobState::Errored.is_terminal());
        assert!(AttemptState::Leased.is_live() && !AttemptState::Reported.is_live());
    }

    #[test]
    fn submissions_take_defaults_and_overrides_within_the_maxima() {
        let max = JobLimits::DEFAULT_SERVER_MAX;
        let plain = SubmitParams::default();
        assert_eq!(
            plain.resolve(&JobLimits::DEFAULT, &max),
            Ok(JobLimits::DEFAULT)
        );
        let asked: SubmitParams = serde_json::from_str(
            r#"{"image": "t0", "timeout_s": 60, "memory_mib": 128, "priority": -5}"#,
        )
        .unwrap();
        let limits = asked.resolve(&JobLimits::DEFAULT, &max).unwrap();
        assert_eq!((limits.timeout_s, limits.memory_mib), (60, 128));
        assert_eq!(limits.vcpus, JobLimits::DEFAULT.vcpus);
    }

    #[test]
    fn submissions_are_refused_naming_the_field() {
        let max = JobLimits::DEFAULT_SERVER_MAX;
        let cases = [
            (r#"{"priority": 101}"#, "priority"),
            (r#"{"priority": -101}"#, "priority"),
            (r#"{"image": "../x"}"#, "image"),
            (r#"{"vcpus": 33}"#, "vcpus"),
            (r#"{"timeout_s": 0}"#, "timeout_s"),
        ];
        for (json, field) in cases {
            let p: SubmitParams = serde_json::from_str(json).unwrap();
            let e = p.resolve(&JobLimits::DEFAULT, &max).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
        }
        let e = serde_json::from_str::<SubmitParams>(r#"{"timout_s": 5}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
