//! The job and attempt state machines, as one pure function: [`step`] takes a job's snapshot
//! (the job with all its attempts), the server's [`Settings`], the time and an [`Event`], and
//! returns the new snapshot with the [`Effect`]s the storage persists or carries out. It never
//! reads a clock, so every rule is tested in milliseconds without sleeping, and a refused event
//! is an error value ([`Refusal`]) that changes nothing.
//!
//! Deadlines are decided by the clock, not by when the sweeper runs: an event for a live
//! attempt whose deadline has passed at `now_ms` is answered as if a [`Event::Tick`] had come
//! first. For a start, heartbeat, upload or abort that is a refusal (the sweeper's tick will
//! expire the attempt); a report is taken, kept aside as late.
//!
//! The transition tables are in docs/api.md; `state/job.rs` holds the job-level events (claim,
//! cancel, tick, the unschedulable note), `state/attempt.rs` the attempt-level ones.

mod adaptive;
mod attempt;
mod job;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
mod view;
mod votes;

pub use adaptive::{Alone, AloneStage};
pub use view::{AttemptBlobs, JobFacts};
pub use votes::{Ballot, OutputTree, Vote, VoteOutput};

use crate::ApiError;
use crate::codes;
use crate::types::{
    AttemptId, AttemptState, HeartbeatRequest, InvalidField, JobState, Phase, ReportRequest,
    RunnerId, UserId,
};
use serde::{Deserialize, Serialize};

/// The server's timing rules, the same for every job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// How far a start or a heartbeat extends the lease (the runner sends heartbeats well
    /// within it: a third of it is a good interval).
    pub lease_ms: u64,
    /// How long after a claim the runner has to start the attempt.
    pub accept_window_ms: u64,
    /// How far past start + the job's time limit the lease may reach: downloading, booting
    /// (up to 600 s on emulated KVM) and uploading all happen in it.
    pub lease_margin_ms: u64,
    /// The wait before try n + 1 after n failed tries: `backoff_base_ms × backoff_factor^(n−1)`,
    /// at most `backoff_cap_ms`.
    pub backoff_base_ms: u64,
    pub backoff_factor: u32,
    pub backoff_cap_ms: u64,
    /// How many attempts of one job may end without having been started (not started within
    /// the accept window, or given up by the runner before its start) before the job is
    /// `errored`, whoever's they were. Such an attempt is not a try: nothing ran, so it neither
    /// uses one of the job's `max_tries` nor delays its next claim by other runners. Its runner
    /// waits out a cool-down before it may claim the job again
    /// ([`Settings::unstarted_cooldown_ms`]), so one runner that claims and gives up in a loop
    /// errors a job this way only after hours, never in a burst.
    pub max_unstarted: u32,
    /// How long a runner whose attempt of a job ended unstarted is refused that job
    /// ([`Refusal::RunnerDidNotStart`]); other runners may claim it at once. It doubles with
    /// each further unstarted end of that runner on the job, up to `unstarted_cooldown_cap_ms`
    /// ([`Settings::cooldown_after`]). A runner whose claim answer was lost, whose start failed
    /// on the network or that was stopped just as it claimed gets the job again after it.
    pub unstarted_cooldown_ms: u64,
    pub unstarted_cooldown_cap_ms: u64,
}

impl Settings {
    pub const DEFAULT: Settings = Settings {
        lease_ms: 90_000,
        accept_window_ms: 30_000,
        lease_margin_ms: 20 * 60_000,
        backoff_base_ms: 10_000,
        backoff_factor: 3,
        backoff_cap_ms: 15 * 60_000,
        max_unstarted: 10,
        unstarted_cooldown_ms: 5 * 60_000,
        unstarted_cooldown_cap_ms: 60 * 60_000,
    };

    /// The wait before the next try, after `failed_tries` (≥ 1) tries that were not the job's
    /// fault.
    pub fn backoff_ms(&self, failed_tries: u32) -> u64 {
        let growth = u64::from(self.backoff_factor)
            .checked_pow(failed_tries.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.backoff_base_ms
            .saturating_mul(growth)
            .min(self.backoff_cap_ms)
    }

    /// How long after an attempt lapsed its runner may still deliver its output and report,
    /// kept aside as late: one lease. A runner learns of the lapse at its next heartbeat (a
    /// third of a lease later) or when it delivers; past this its token is good for nothing.
    pub fn late_window_ms(&self) -> u64 {
        self.lease_ms
    }

    /// The unstarted-attempt cap in force (a job gets at least one).
    pub fn unstarted_cap(&self) -> u32 {
        self.max_unstarted.max(1)
    }

    /// The cool-down after the `unstarted_ends`-th (≥ 1) unstarted end of a runner on a job:
    /// `unstarted_cooldown_ms × 2^(n−1)`, at most `unstarted_cooldown_cap_ms` (5, 10, 20, 40
    /// min, then 1 h by default).
    pub fn cooldown_after(&self, unstarted_ends: u32) -> u64 {
        let growth = 2u64
            .checked_pow(unstarted_ends.saturating_sub(1))
            .unwrap_or(u64::MAX);
        self.unstarted_cooldown_ms
            .saturating_mul(growth)
            .min(self.unstarted_cooldown_cap_ms)
    }

    /// The lease end and the accept-by time of an attempt claimed at `now_ms`: what
    /// [`Event::Claim`] normally carries.
    pub fn claim_deadlines(&self, now_ms: u64) -> (u64, u64) {
        (
            now_ms.saturating_add(self.lease_ms),
            now_ms.saturating_add(self.accept_window_ms),
        )
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::DEFAULT
    }
}

/// A job's own rules, fixed at submission and stored with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPolicy {
    /// How many tries the job gets: attempts that started and ended without a job outcome
    /// (lapsed, aborted, a runner-side failure); when that many have, it is `errored`. An
    /// attempt that never started is not a try ([`Settings::max_unstarted`] bounds those).
    pub max_tries: u32,
    /// How long the job may wait, claimable, for a runner before it is `expired`; counted again
    /// from each time it becomes claimable (its submission, the end of each back-off).
    pub ttl_ms: u64,
    /// The job's time limit ([`crate::types::JobLimits::timeout_s`] in milliseconds).
    pub timeout_ms: u64,
    /// How many attempts run the job, each on a runner of another owner, and how many of their
    /// outcomes must agree ([`Vote`]) for the job to end with it. 1 and 1: the first outcome
    /// stands, as for a job of one replica.
    #[serde(default = "one")]
    pub replicas: u32,
    #[serde(default = "one")]
    pub quorum: u32,
    /// The most attempts whose outcome is a vote before the job is `inconclusive`; 0: twice
    /// the replicas (one for a job of one replica).
    #[serde(default)]
    pub max_votes: u32,
    /// The submitter: its runners take no replica of a replicated job unless `own_runners`.
    #[serde(default)]
    pub owner: UserId,
    #[serde(default)]
    pub own_runners: bool,
    /// Let replicas run on runners of different host classes (backend and host kind: a TCG
    /// runner and a KVM one); by default every replica runs on the class of the first, so that
    /// their CPU models and speeds match.
    #[serde(default)]
    pub any_class: bool,
    /// One runner of good standing may run the job alone ([`Alone`]); only with a quorum of 2
    /// or more.
    #[serde(default)]
    pub adaptive: bool,
}

fn one() -> u32 {
    1
}

impl JobPolicy {
    /// Three tries (the queue runner's `--max-attempts`), a day to find a runner, the default
    /// time limit, one replica.
    pub const DEFAULT: JobPolicy = JobPolicy {
        max_tries: 3,
        ttl_ms: 24 * 3600 * 1000,
        timeout_ms: crate::types::JobLimits::DEFAULT.timeout_s * 1000,
        replicas: 1,
        quorum: 1,
        max_votes: 0,
        owner: UserId(0),
        own_runners: false,
        any_class: false,
        adaptive: false,
    };

    /// Whether more than one attempt must run: then replicas go to distinct owners, a
    /// replica's time-out is its runner's failure, and reports must be signed.
    pub fn replicated(&self) -> bool {
        self.replicas > 1 || self.quorum > 1
    }

    /// The most attempts whose outcome is a vote ([`JobPolicy::max_votes`]).
    pub fn vote_cap(&self) -> u32 {
        match self.max_votes {
            0 if self.replicas <= 1 => 1,
            0 => self.replicas.saturating_mul(2),
            n => n.max(self.quorum),
        }
    }

    /// The most started attempts that may end without a vote before the job is `errored`:
    /// `max_tries` for each replica.
    pub fn try_cap(&self) -> u32 {
        self.max_tries.max(1).saturating_mul(self.replicas.max(1))
    }
}

impl Default for JobPolicy {
    fn default() -> Self {
        JobPolicy::DEFAULT
    }
}

/// A job as the state machines see it: its state, its rules and all its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSnapshot {
    pub state: JobState,
    /// Why it is in its state, for a person ([`crate::types::JobView::reason`]).
    pub reason: String,
    pub policy: JobPolicy,
    pub created_ms: u64,
    pub ended_ms: Option<u64>,
    /// While queued after a failed try: not claimable before this time.
    pub retry_not_before_ms: Option<u64>,
    /// While queued: expired if still unclaimed at this time (claimable-since + TTL).
    pub expires_at_ms: u64,
    /// A cancel is under way: the live attempt has been told to stop.
    pub cancel_requested: bool,
    /// Every attempt, oldest first; none is ever removed.
    pub attempts: Vec<AttemptSnapshot>,
    /// The attempt whose report stands as the job's result.
    pub result_attempt: Option<AttemptId>,
    /// The attempts whose agreeing votes made the result (the quorum; the result attempt is
    /// the first), once it was reached.
    #[serde(default)]
    pub agreeing: Vec<AttemptId>,
}

/// One attempt as the state machines see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptSnapshot {
    pub id: AttemptId,
    pub runner: RunnerId,
    pub state: AttemptState,
    /// What it is doing or what ended it ([`crate::types::AttemptView::why`]).
    pub why: String,
    /// It reported after it had stopped being live; its report is kept, never the result.
    pub late: bool,
    pub claimed_ms: u64,
    /// It must be started before this time.
    pub accept_by_ms: u64,
    /// It holds its job until this time unless extended.
    pub lease_until_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// Its runner has been told to stop (the heartbeat answers `cancel: true`).
    pub cancel_requested: bool,
    pub phase: Option<Phase>,
    pub console_bytes: u64,
    /// The runner's report, live or late, once it came (without its signed statement, which
    /// the storage keeps beside the attempt).
    pub report: Option<ReportRequest>,
    /// The owner of the runner.
    #[serde(default)]
    pub runner_owner: UserId,
    /// What the server's index made of the attempt's output, once it was indexed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tree: Option<OutputTree>,
    /// The runner's host class when it claimed (`qemu/none`, `vmm/hardware`).
    #[serde(default)]
    pub runner_class: String,
    /// Its runner was revoked before the job ended: its vote does not count.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub voided: bool,
    /// It holds the job alone, on its runner's standing ([`Alone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alone: Option<Alone>,
}

impl JobSnapshot {
    /// A job just submitted at `now_ms`, with the effects that go with it (store it, wake the
    /// runners' long polls). A policy of 0 tries is taken as 1: a job gets at least one; so
    /// for replicas, and a quorum is 1 to the replicas.
    pub fn submitted(policy: JobPolicy, now_ms: u64) -> Transition {
        let replicas = policy.replicas.max(1);
        let policy = JobPolicy {
            max_tries: policy.max_tries.max(1),
            replicas,
            quorum: policy.quorum.clamp(1, replicas),
            ..policy
        };
        let policy = JobPolicy {
            adaptive: policy.adaptive && policy.quorum >= 2,
            ..policy
        };
        let job = JobSnapshot {
            state: JobState::Queued,
            reason: "waiting for a runner".into(),
            policy,
            created_ms: now_ms,
            ended_ms: None,
            retry_not_before_ms: None,
            expires_at_ms: now_ms.saturating_add(policy.ttl_ms),
            cancel_requested: false,
            attempts: Vec::new(),
            result_attempt: None,
            agreeing: Vec::new(),
        };
        Transition {
            job,
            effects: vec![Effect::StoreJob, Effect::WakeRunners],
        }
    }

    /// The attempts that hold the job (one at most but for a replicated job).
    pub fn live_attempts(&self) -> impl Iterator<Item = &AttemptSnapshot> {
        self.attempts.iter().filter(|a| a.state.is_live())
    }

    /// How many attempts hold the job.
    pub fn live_count(&self) -> u32 {
        u32::try_from(self.live_attempts().count()).unwrap_or(u32::MAX)
    }

    pub fn attempt(&self, id: AttemptId) -> Option<&AttemptSnapshot> {
        self.attempts.iter().find(|a| a.id == id)
    }

    /// The tries so far: attempts that were started (live or ended).
    pub fn tries(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|a| a.started_ms.is_some())
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The failed tries: attempts that started and ended without a vote, but for those a
    /// cancel or the job's end stopped ([`JobPolicy::try_cap`] bounds them).
    pub fn failed_tries(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|a| a.started_ms.is_some() && !a.state.is_live())
            .filter(|a| a.state != AttemptState::Canceled)
            .filter(|a| matches!(a.ballot(&self.policy), Ballot::NotAVote))
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Attempts that were claimed and ended without having started, whoever's (but for those
    /// a cancel or the job's end stopped).
    pub fn unstarted(&self) -> u32 {
        let n = self
            .attempts
            .iter()
            .filter(|a| a.started_ms.is_none() && !a.state.is_live())
            .filter(|a| a.state != AttemptState::Canceled)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The cool-down that runners `of` are in for this job after their unstarted ends (whether
    /// or not it is over: compare [`Cooldown::until_ms`] with the time): from the latest of
    /// their ended, never started attempts, as long as [`Settings::cooldown_after`] the number
    /// of those. `of` is one runner for the state machine; the server passes all of a user's
    /// runners, so that its other names wait too. `None` if they have no unstarted end.
    pub fn unstarted_cooldown(
        &self,
        settings: &Settings,
        of: impl Fn(RunnerId) -> bool,
    ) -> Option<Cooldown> {
        cooldown_in(&self.attempts, settings, of)
    }

    /// What attempt `id`'s token may still do at `now_ms`, judged as if a [`Event::Tick`] came
    /// first (a lapse the sweeper has not stored yet counts): everything its state allows while
    /// it is live ([`Access::Live`]); only its output upload and its report, kept aside, while
    /// it is [`Access::Late`]; else nothing, and the refusal says why.
    pub fn attempt_access(
        &self,
        id: AttemptId,
        settings: &Settings,
        now_ms: u64,
    ) -> Result<Access, Refusal> {
        let ticked;
        let job = match step(self, settings, now_ms, &Event::Tick) {
            Ok(t) => {
                ticked = t.job;
                &ticked
            }
            Err(_) => self,
        };
        let a = job.attempt(id).ok_or(Refusal::UnknownAttempt(id))?;
        if a.state.is_live() {
            return Ok(Access::Live);
        }
        if a.report.is_some() {
            return Err(Refusal::AlreadyReported(id));
        }
        late_window(a, settings, now_ms).map(|()| Access::Late)
    }

    /// The first broken invariant, if any: what every snapshot that [`step`] returns under
    /// `settings` satisfies. The server may check it on a snapshot read back from storage.
    pub fn invariant_violation(&self, settings: &Settings) -> Option<String> {
        let live = self.live_count();
        let most_live = self.policy.replicas.max(self.policy.quorum).max(1);
        if live > most_live {
            return Some(format!("{live} live attempts of {most_live} replicas"));
        }
        if (self.state == JobState::Running) != (live >= 1) {
            return Some(format!("job {} with {live} live attempts", self.state));
        }
        let votes = self.tally().votes;
        if votes > self.policy.vote_cap() {
            return Some(format!("{votes} votes of {}", self.policy.vote_cap()));
        }
        if self.policy.replicated() {
            // Replicas go to distinct owners: no owner holds two live or voting attempts.
            let mut owners = std::collections::HashSet::new();
            for a in &self.attempts {
                let holds =
                    a.state.is_live() || !matches!(a.ballot(&self.policy), Ballot::NotAVote);
                if holds && !owners.insert(a.runner_owner) {
                    return Some(format!("owner {} holds two replicas", a.runner_owner));
                }
                if holds && a.runner_owner == self.policy.owner && !self.policy.own_runners {
                    return Some(format!(
                        "the submitter's runner {} holds a replica",
                        a.runner
                    ));
                }
            }
        }
        if self.state.is_terminal() != self.ended_ms.is_some() {
            return Some(format!(
                "job {} with ended_ms {:?}",
                self.state, self.ended_ms
            ));
        }
        // Failed tries, votes and unstarted attempts are bounded apart, so the attempts are
        // bounded in all.
        if self.failed_tries() > self.policy.try_cap() {
            return Some(format!(
                "{} failed tries of {}",
                self.failed_tries(),
                self.policy.try_cap()
            ));
        }
        if self.unstarted() > settings.unstarted_cap() {
            return Some(format!(
                "{} unstarted attempts of {}",
                self.unstarted(),
                settings.unstarted_cap()
            ));
        }
        for (i, a) in self.attempts.iter().enumerate() {
            if self.attempts[..i].iter().any(|b| b.id == a.id) {
                return Some(format!("attempt {} twice", a.id));
            }
            // A runner that did not start the job claims it again only after its cool-down.
            let cooldown = cooldown_in(&self.attempts[..i], settings, |r| r == a.runner);
            if let Some(c) = cooldown.filter(|c| a.claimed_ms < c.until_ms) {
                return Some(format!(
                    "runner {} claimed the job again at {} after not starting attempt {}, \
                     within its cool-down (until {})",
                    a.runner, a.claimed_ms, c.attempt, c.until_ms
                ));
            }
            if a.state.is_live() == a.ended_ms.is_some() {
                return Some(format!(
                    "attempt {} {} with ended_ms {:?}",
                    a.id, a.state, a.ended_ms
                ));
            }
            if a.late && a.state.is_live() {
                return Some(format!("live attempt {} marked late", a.id));
            }
            // Only a lapsed attempt that had started has anything to deliver late.
            if a.late && (a.state != AttemptState::Expired || a.started_ms.is_none()) {
                return Some(format!(
                    "late attempt {} {} ({:?})",
                    a.id, a.state, a.started_ms
                ));
            }
        }
        if let Some(&first) = self.agreeing.first()
            && self.result_attempt != Some(first)
        {
            return Some(format!(
                "agreeing attempts {:?} without their result",
                self.agreeing
            ));
        }
        if let Some(broken) = self.alone_violation() {
            return Some(broken);
        }
        if self.agreeing.len() > 1 && self.agreeing.len() < self.policy.quorum as usize {
            return Some(format!(
                "{} agreeing attempts of a quorum of {}",
                self.agreeing.len(),
                self.policy.quorum
            ));
        }
        match self.result_attempt {
            None if matches!(self.state, JobState::Succeeded | JobState::Failed) => {
                Some(format!("job {} without a result", self.state))
            }
            None => None,
            Some(id) => match self.attempt(id) {
                Some(a) if a.state == AttemptState::Reported && !a.late => {
                    let ok = matches!(self.state, JobState::Succeeded | JobState::Failed);
                    (!ok).then(|| format!("job {} with a result", self.state))
                }
                _ => Some(format!("result attempt {id} is not a reported attempt")),
            },
        }
    }
}

/// What an attempt's token may still do ([`JobSnapshot::attempt_access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The attempt is live: whatever its state allows.
    Live,
    /// It lapsed after it started, has not reported, and is within its late window: its output
    /// and its report are still taken, kept aside as late (never the result).
    Late,
}

/// Whether the ended attempt `a` may still deliver late at `now`: it lapsed (expired) after it
/// started, and its late window ([`Settings::late_window_ms`] from its end) is still open. An
/// attempt the runner gave up, or that was canceled, or that never started, has nothing to
/// deliver.
fn late_window(a: &AttemptSnapshot, settings: &Settings, now: u64) -> Result<(), Refusal> {
    if a.state != AttemptState::Expired || a.started_ms.is_none() {
        return Err(Refusal::AttemptNotLive {
            attempt: a.id,
            state: a.state,
        });
    }
    let ended = a.ended_ms.unwrap_or(0);
    if now >= ended.saturating_add(settings.late_window_ms()) {
        return Err(Refusal::LateWindowClosed {
            attempt: a.id,
            ended_ms: ended,
        });
    }
    Ok(())
}

/// Something that happens to a job. The time is [`step`]'s `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A runner claims the queued job for a new attempt. The deadlines normally come from
    /// [`Settings::claim_deadlines`].
    Claim {
        attempt: AttemptId,
        runner: RunnerId,
        /// The runner's owner: replicas go to distinct owners.
        owner: UserId,
        /// The runner's host class (backend and host kind): replicas run on one class unless the
        /// job allows any.
        class: String,
        lease_until_ms: u64,
        accept_by_ms: u64,
        /// The server lets this runner run the job alone, if the job allows it and nothing else
        /// holds it ([`Alone`]); none for a runner short of the standing, or a server that
        /// never does.
        alone: Option<Alone>,
    },
    /// The runner starts the attempt (it must, before `accept_by_ms`).
    Start { attempt: AttemptId },
    /// The runner is alive and working on the attempt: the lease is extended.
    Heartbeat {
        attempt: AttemptId,
        progress: HeartbeatRequest,
    },
    /// The job has run; the runner uploads its output and console.
    UploadBegun { attempt: AttemptId },
    /// The runner's report: the job's outcome, or a runner-side failure.
    Report {
        attempt: AttemptId,
        report: ReportRequest,
    },
    /// The runner gives the attempt up for a reason of its own.
    Abort { attempt: AttemptId, reason: String },
    /// The sweeper: lapses leases and accept windows, ends back-offs, expires a queued job past
    /// its time-to-live.
    Tick,
    /// The submitter or an admin cancels the job.
    Cancel,
    /// The dispatcher found that no runner can take the queued job, and says why (it becomes the
    /// job's reason, and the expiry's if it stays so).
    Unschedulable { why: String },
    /// The server indexed the attempt's output (after its upload; before or after its report):
    /// what the attempt votes for in a replicated job. Recorded once; never refused but for an
    /// unknown attempt or a different second index.
    Indexed {
        attempt: AttemptId,
        tree: OutputTree,
    },
    /// The runner was revoked: its live attempts end (as its failures), and its votes no longer
    /// count towards a quorum not yet reached. Never refused; a no-op for a job it has no part
    /// in, or that has ended.
    RunnerRevoked { runner: RunnerId },
}

/// What the storage persists or carries out after a step, in this order: the store effects
/// first (each at most once), then the rest in the order they arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The job's own fields changed: write them.
    StoreJob,
    /// This attempt is new or changed: write it.
    StoreAttempt(AttemptId),
    /// The job is queued again, claimable from this time: arrange a tick then.
    RequeueAt(u64),
    /// The job is claimable now: wake the runners' long polls.
    WakeRunners,
    /// This attempt's report is the job's result: its output becomes the job's output.
    TakeResult(AttemptId),
    /// This attempt reported late: keep its report and uploads aside, marked late.
    KeepLate(AttemptId),
    /// Tell this attempt's runner to stop (its heartbeats now answer `cancel: true`).
    CancelRunner(AttemptId),
    /// This attempt stopped being live: its token dies; uploads of an attempt that did not
    /// report may be dropped.
    AttemptEnded(AttemptId, AttemptState),
    /// The job reached this terminal state: answer waiting clients, notify its owner.
    JobEnded(JobState),
    /// A quorum was reached: these runners' votes agreed with it, these runners' disagreed
    /// (their standing goes up and down).
    Standing {
        agreed: Vec<RunnerId>,
        disagreed: Vec<RunnerId>,
    },
}

/// A step's result: the new snapshot and its effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub job: JobSnapshot,
    pub effects: Vec<Effect>,
}

/// A runner's (or a user's runners') cool-down on one job after attempts of it that ended
/// unstarted ([`JobSnapshot::unstarted_cooldown`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    /// The runner of the latest such attempt.
    pub runner: RunnerId,
    /// The latest such attempt.
    pub attempt: AttemptId,
    /// Until when (Unix ms, exclusive) the runners are refused the job.
    pub until_ms: u64,
    /// How many attempts of those runners ended unstarted.
    pub unstarted_ends: u32,
}

fn cooldown_in(
    attempts: &[AttemptSnapshot],
    settings: &Settings,
    of: impl Fn(RunnerId) -> bool,
) -> Option<Cooldown> {
    let mut ends = attempts
        .iter()
        .filter(|a| a.started_ms.is_none() && of(a.runner))
        .filter_map(|a| Some((a.ended_ms?, a)));
    let first = ends.next()?;
    let (mut n, (mut last_ms, mut last)) = (1u32, first);
    for (ended, a) in ends {
        n = n.saturating_add(1);
        if ended >= last_ms {
            (last_ms, last) = (ended, a);
        }
    }
    Some(Cooldown {
        runner: last.runner,
        attempt: last.id,
        until_ms: last_ms.saturating_add(settings.cooldown_after(n)),
        unstarted_ends: n,
    })
}

/// An event that does not apply to the job in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the job has ended ({0})")]
    JobEnded(JobState),
    #[error("the job is {0} and wants no further attempt")]
    NotQueued(JobState),
    #[error(
        "the submitter's own runners take no replica of this job (it was not submitted with own-runners)"
    )]
    OwnRunner,
    #[error(
        "a runner of owner {0} holds a replica of this job already: replicas go to distinct owners"
    )]
    OwnerHasReplica(UserId),
    #[error("this job's replicas run on {held} runners, not {offered} ones")]
    OtherClass { held: String, offered: String },
    #[error("attempt {0}'s output was indexed already, differently")]
    IndexedTwice(AttemptId),
    #[error("the job waits for its next try until {0} (Unix ms)")]
    RetryNotYet(u64),
    #[error("the job's time-to-live has passed")]
    TtlPassed,
    #[error("the claim's deadlines are not after now")]
    DeadlineInPast,
    #[error("attempt {0} exists already")]
    DuplicateAttempt(AttemptId),
    #[error(
        "runner {runner} claimed this job as attempt {attempt} and did not start it: other \
         runners may take it now, this one again from {until_ms} (Unix ms), after a cool-down"
    )]
    RunnerDidNotStart {
        runner: RunnerId,
        attempt: AttemptId,
        until_ms: u64,
    },
    #[error("no attempt {0} of this job")]
    UnknownAttempt(AttemptId),
    #[error("attempt {attempt} is {state}, no longer live")]
    AttemptNotLive {
        attempt: AttemptId,
        state: AttemptState,
    },
    #[error("attempt {0} was not started within its accept window")]
    AcceptWindowClosed(AttemptId),
    #[error("attempt {0}'s lease has lapsed")]
    LeaseLapsed(AttemptId),
    #[error(
        "attempt {attempt} lapsed at {ended_ms} (Unix ms) and its late window has closed: \
         nothing more is taken from it"
    )]
    LateWindowClosed { attempt: AttemptId, ended_ms: u64 },
    #[error("attempt {attempt} is {state}: {event} does not apply")]
    WrongAttemptState {
        attempt: AttemptId,
        state: AttemptState,
        event: &'static str,
    },
    #[error("attempt {0} has reported already")]
    AlreadyReported(AttemptId),
    #[error("a cancel is already under way")]
    AlreadyCanceling,
    #[error(transparent)]
    Invalid(#[from] InvalidField),
}

impl Refusal {
    /// The [`ApiError`] code this refusal is answered with.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::JobEnded(_) => codes::JOB_FINISHED,
            Refusal::UnknownAttempt(_) => codes::NOT_FOUND,
            Refusal::AttemptNotLive { .. }
            | Refusal::AcceptWindowClosed(_)
            | Refusal::LeaseLapsed(_)
            | Refusal::LateWindowClosed { .. } => codes::LEASE_LOST,
            Refusal::AlreadyReported(_) => codes::ALREADY_REPORTED,
            Refusal::Invalid(_) => codes::INVALID_PARAMS,
            Refusal::NotQueued(_)
            | Refusal::RetryNotYet(_)
            | Refusal::TtlPassed
            | Refusal::DeadlineInPast
            | Refusal::DuplicateAttempt(_)
            | Refusal::RunnerDidNotStart { .. }
            | Refusal::OwnRunner
            | Refusal::OwnerHasReplica(_)
            | Refusal::OtherClass { .. }
            | Refusal::IndexedTwice(_)
            | Refusal::WrongAttemptState { .. }
            | Refusal::AlreadyCanceling => codes::WRONG_STATE,
        }
    }
}

impl From<&Refusal> for ApiError {
    fn from(r: &Refusal) -> Self {
        ApiError::new(r.code(), r.to_string())
    }
}

/// Applies `event` at `now_ms` to `job`: the new snapshot and its effects, or why the event does
/// not apply (then nothing changes: `job` is only read).
pub fn step(
    job: &JobSnapshot,
    settings: &Settings,
    now_ms: u64,
    event: &Event,
) -> Result<Transition, Refusal> {
    let mut run = Run {
        job: job.clone(),
        effects: Vec::new(),
        settings,
        now: now_ms,
    };
    match event {
        Event::Claim {
            attempt,
            runner,
            owner,
            class,
            lease_until_ms,
            accept_by_ms,
            alone,
        } => run.claim(
            *attempt,
            (*runner, *owner, class),
            (*lease_until_ms, *accept_by_ms),
            *alone,
        )?,
        Event::Start { attempt } => run.start(*attempt)?,
        Event::Heartbeat { attempt, progress } => run.heartbeat(*attempt, progress)?,
        Event::UploadBegun { attempt } => run.upload_begun(*attempt)?,
        Event::Report { attempt, report } => run.report(*attempt, report)?,
        Event::Abort { attempt, reason } => run.abort(*attempt, reason)?,
        Event::Tick => run.tick(),
        Event::Cancel => run.cancel()?,
        Event::Unschedulable { why } => run.unschedulable(why)?,
        Event::Indexed { attempt, tree } => run.indexed(*attempt, tree)?,
        Event::RunnerRevoked { runner } => run.runner_revoked(*runner),
    }
    let mut effects = store_effects(job, &run.job);
    effects.append(&mut run.effects);
    Ok(Transition {
        job: run.job,
        effects,
    })
}

/// One step in progress: the snapshot being changed (a copy, dropped on refusal) and the
/// effects so far.
struct Run<'a> {
    job: JobSnapshot,
    effects: Vec<Effect>,
    settings: &'a Settings,
    now: u64,
}

/// The store effects, from what differs between the two snapshots, so that no transition can
/// forget to persist what it changed.
fn store_effects(before: &JobSnapshot, after: &JobSnapshot) -> Vec<Effect> {
    let own_fields = |j: &JobSnapshot| JobSnapshot {
        attempts: Vec::new(),
        ..j.clone()
    };
    let mut effects = Vec::new();
    if own_fields(before) != own_fields(after) {
        effects.push(Effect::StoreJob);
    }
    for (i, a) in after.attempts.iter().enumerate() {
        if before.attempts.get(i) != Some(a) {
            effects.push(Effect::StoreAttempt(a.id));
        }
    }
    effects
}
