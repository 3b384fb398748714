//! Job-level events: claim, cancel, tick, the unschedulable note; and how a job goes on after
//! an attempt that ended without a job outcome (requeue with a back-off, or errored).

use super::{AttemptSnapshot, Ballot, Effect, Refusal, Run};
use crate::types::{AttemptId, AttemptState, JobState, RunnerId, UserId};

impl Run<'_> {
    /// Refuses anything for a job that has ended.
    pub(super) fn unfinished(&self) -> Result<(), Refusal> {
        if self.job.state.is_terminal() {
            return Err(Refusal::JobEnded(self.job.state));
        }
        Ok(())
    }

    pub(super) fn claim(
        &mut self,
        attempt: AttemptId,
        (runner, owner, class): (RunnerId, UserId, &str),
        (lease_until_ms, accept_by_ms): (u64, u64),
        alone: Option<super::Alone>,
    ) -> Result<(), Refusal> {
        self.unfinished()?;
        if self.job.wanted() == 0 {
            return Err(Refusal::NotQueued(self.job.state));
        }
        let policy = self.job.policy;
        if policy.replicated() {
            if owner == policy.owner && !policy.own_runners {
                return Err(Refusal::OwnRunner);
            }
            // BOINC's one result per user per work unit: an owner's runners could agree with
            // each other whatever the job does.
            let holds = |a: &AttemptSnapshot| {
                a.runner_owner == owner
                    && (a.state.is_live() || !matches!(a.ballot(&policy), Ballot::NotAVote))
            };
            if self.job.attempts.iter().any(holds) {
                return Err(Refusal::OwnerHasReplica(owner));
            }
            // Replicas in flight together run on one host class (BOINC's homogeneous
            // redundancy): the class of the one running. Votes cast do not hold it, so a runner
            // that declared a class no one else has cannot keep a job from its other replicas
            // past its own run.
            // A run alone whose vote is being checked holds its class for the replicas that
            // check it.
            let held = self
                .job
                .attempts
                .iter()
                .find(|a| a.state.is_live())
                .map(|a| a.runner_class.as_str())
                .or_else(|| self.job.checked_alone_class());
            if let Some(held) = held
                && !policy.any_class
                && held != class
            {
                return Err(Refusal::OtherClass {
                    held: held.to_string(),
                    offered: class.to_string(),
                });
            }
        }
        if let Some(t) = self.job.retry_not_before_ms.filter(|t| self.now < *t) {
            return Err(Refusal::RetryNotYet(t));
        }
        // The sweeper expires it; until then it is not handed out either.
        if self.now >= self.job.expires_at_ms {
            return Err(Refusal::TtlPassed);
        }
        if lease_until_ms <= self.now || accept_by_ms <= self.now {
            return Err(Refusal::DeadlineInPast);
        }
        if self.job.attempt(attempt).is_some() {
            return Err(Refusal::DuplicateAttempt(attempt));
        }
        // A runner that claimed the job and did not start it waits out a cool-down before it
        // gets it again (other runners may take it at once): one whose claim answer or start
        // was lost gets it back, one that claims and gives up in a loop cannot hurry the job
        // to the unstarted cap. (The job is queued: none of its attempts is live.)
        if let Some(c) = self
            .job
            .unstarted_cooldown(self.settings, |r| r == runner)
            .filter(|c| self.now < c.until_ms)
        {
            return Err(Refusal::RunnerDidNotStart {
                runner,
                attempt: c.attempt,
                until_ms: c.until_ms,
            });
        }
        let alone = alone.filter(|_| self.may_run_alone());
        self.job.attempts.push(AttemptSnapshot {
            id: attempt,
            runner,
            state: AttemptState::Leased,
            why: "claimed; waiting for the runner to start it".into(),
            late: false,
            claimed_ms: self.now,
            accept_by_ms,
            lease_until_ms,
            started_ms: None,
            ended_ms: None,
            cancel_requested: false,
            phase: None,
            console_bytes: 0,
            report: None,
            runner_owner: owner,
            output_tree: None,
            runner_class: class.to_string(),
            voided: false,
            alone,
        });
        self.job.state = JobState::Running;
        self.job.retry_not_before_ms = None;
        if let Some(alone) = alone {
            // The same words whether or not the run is audited: the draw stays unseen.
            self.job.reason = format!(
                "attempt {attempt} on runner {runner}, alone on its standing ({} votes agreed \
                 in a row; {}% of such runs are audited by other replicas after it reports)",
                alone.terms.agreed_in_row, alone.terms.audit_percent
            );
            return Ok(());
        }
        if policy.replicated() {
            let live = self.job.live_count();
            self.job.reason = format!(
                "attempt {attempt} on runner {runner}: {live} replica(s) running of {}, {} \
                 must agree",
                policy.replicas, policy.quorum
            );
            return Ok(());
        }
        // The try it becomes if it starts (one that never starts is not a try).
        self.job.reason = format!(
            "attempt {attempt} on runner {runner} (try {} of {})",
            self.job.tries() + 1,
            self.job.policy.max_tries
        );
        Ok(())
    }

    pub(super) fn cancel(&mut self) -> Result<(), Refusal> {
        self.unfinished()?;
        if self.job.cancel_requested {
            return Err(Refusal::AlreadyCanceling);
        }
        let live: Vec<usize> = (0..self.job.attempts.len())
            .filter(|&i| self.job.attempts[i].state.is_live())
            .collect();
        if live.is_empty() {
            self.end_job(JobState::Canceled, "canceled while queued".into());
            return Ok(());
        }
        let mut asked = Vec::new();
        let mut ended = None;
        for index in live {
            let a = &mut self.job.attempts[index];
            let (id, runner) = (a.id, a.runner);
            if a.state == AttemptState::Leased {
                // Nothing runs yet: the attempt ends now, and the runner learns it when it
                // tries to start (lease-lost).
                self.end_attempt(
                    index,
                    AttemptState::Canceled,
                    "canceled before the runner started it".into(),
                );
                ended = Some((id, runner));
            } else {
                a.cancel_requested = true;
                self.effects.push(Effect::CancelRunner(id));
                asked.push((id, runner));
            }
        }
        if asked.is_empty() {
            let (id, runner) = ended.expect("a live attempt ended");
            self.end_job(
                JobState::Canceled,
                format!("canceled before runner {runner} started attempt {id}"),
            );
            return Ok(());
        }
        self.job.cancel_requested = true;
        let waiting: Vec<String> = asked
            .iter()
            .map(|(id, runner)| format!("runner {runner} to stop attempt {id}"))
            .collect();
        self.job.reason = format!("cancel requested; waiting for {}", waiting.join(", "));
        Ok(())
    }

    /// After the canceled attempt at `index` ended (the runner stopped, or its lease lapsed):
    /// the job is canceled once no attempt is live.
    pub(super) fn canceled_attempt_ended(
        &mut self,
        index: usize,
        attempt_why: String,
        job_why: String,
    ) {
        self.end_attempt(index, AttemptState::Canceled, attempt_why);
        if self.job.live_count() == 0 {
            self.end_job(JobState::Canceled, job_why);
        }
    }

    /// The sweeper: never refused, and a no-op when nothing is due.
    pub(super) fn tick(&mut self) {
        if self.job.state.is_terminal() {
            return;
        }
        for index in 0..self.job.attempts.len() {
            if !self.job.state.is_terminal() && self.lapsed(index) {
                self.lapse(index);
            }
        }
        if self.job.state.is_terminal() || self.job.wanted() == 0 {
            return;
        }
        if self.now >= self.job.expires_at_ms && self.job.expirable() {
            let reason = format!(
                "no runner took it within its time-to-live ({} s): {}",
                self.job.policy.ttl_ms / 1000,
                self.job.reason
            );
            self.stop_live("the job expired: no runner took its other replicas in time");
            self.end_job(JobState::Expired, reason);
        } else if self.job.retry_not_before_ms.is_some_and(|t| self.now >= t) {
            self.job.retry_not_before_ms = None;
            self.effects.push(Effect::WakeRunners);
        }
    }

    pub(super) fn unschedulable(&mut self, why: &str) -> Result<(), Refusal> {
        self.unfinished()?;
        if self.job.wanted() == 0 {
            return Err(Refusal::NotQueued(self.job.state));
        }
        self.job.reason = why.to_string();
        Ok(())
    }

    /// After the attempt at `index` ended without a job outcome and without a cancel: another
    /// try after a back-off, or `errored` when the tries are used up. An attempt that never
    /// started was no try: the job is claimable again at once, unless too many never started.
    pub(super) fn retry_or_error(&mut self, index: usize) {
        let a = &self.job.attempts[index];
        let (id, why) = (a.id, a.why.clone());
        if a.started_ms.is_none() {
            return self.requeue_unstarted(id, &why);
        }
        let tries = self.job.failed_tries();
        let max = self.job.policy.try_cap();
        if tries >= max {
            self.stop_live("not needed: the job errored");
            self.end_job(
                JobState::Errored,
                format!(
                    "{tries} of {max} tries ended without a job outcome; the last, attempt {id}: {why}"
                ),
            );
            return;
        }
        let wait = self.settings.backoff_ms(tries);
        let at = self.now.saturating_add(wait);
        self.job.state = self.unended_state();
        self.job.expires_at_ms = at.saturating_add(self.job.policy.ttl_ms);
        self.job.reason = format!(
            "attempt {id} ended ({why}); try {} of {max} after a {} s back-off",
            tries + 1,
            wait / 1000
        );
        // A back-off of nothing (a setting of 0) makes the job claimable at once.
        if at > self.now {
            self.job.retry_not_before_ms = Some(at);
            // One requeue per step: another replica's, earlier in the same tick, is replaced.
            self.effects.retain(|e| !matches!(e, Effect::RequeueAt(_)));
            self.effects.push(Effect::RequeueAt(at));
        } else {
            self.effects.push(Effect::WakeRunners);
        }
    }

    /// After attempt `id` ended before it started: nothing ran, so the job is not blamed, keeps
    /// its tries and is claimable at once by other runners; its own runner gets it again after
    /// a cool-down (see [`Run::claim`], [`super::Settings::cooldown_after`]). When the job's
    /// unstarted attempts, whoever's, reach [`super::Settings::unstarted_cap`], it is
    /// `errored`; the cool-downs keep one runner from getting there in a burst.
    fn requeue_unstarted(&mut self, id: AttemptId, why: &str) {
        let unstarted = self.job.unstarted();
        let cap = self.settings.unstarted_cap();
        if unstarted >= cap {
            self.stop_live("not needed: the job errored");
            let runners: std::collections::HashSet<_> = self
                .job
                .attempts
                .iter()
                .filter(|a| a.started_ms.is_none())
                .map(|a| a.runner)
                .collect();
            self.end_job(
                JobState::Errored,
                format!(
                    "runners kept not starting it: {unstarted} attempts (of {} runners) were \
                     claimed and never started; the last, attempt {id}: {why}",
                    runners.len()
                ),
            );
            return;
        }
        // A back-off after another replica's failed try (in the same tick) still holds.
        self.job.state = self.unended_state();
        self.job.expires_at_ms = self.now.saturating_add(self.job.policy.ttl_ms);
        let runner = self.job.attempt(id).map(|a| a.runner);
        let cooldown = runner.and_then(|r| self.job.unstarted_cooldown(self.settings, |x| x == r));
        let again = match cooldown {
            Some(c) if c.until_ms > self.now => format!(
                "runner {} claimed it and did not start it; other runners may take it now, {} \
                 again after a {} s cool-down (at {} Unix ms)",
                c.runner,
                c.runner,
                (c.until_ms - self.now).div_ceil(1000),
                c.until_ms
            ),
            _ => "any runner may take it now".into(),
        };
        self.job.reason = format!(
            "attempt {id} ended before it started ({why}), not counted as a try ({unstarted} of \
             {cap} unstarted attempts allowed): {again}"
        );
        self.effects.push(Effect::WakeRunners);
    }

    /// Running while an attempt holds the job, else queued.
    pub(super) fn unended_state(&self) -> JobState {
        if self.job.live_count() > 0 {
            JobState::Running
        } else {
            JobState::Queued
        }
    }

    pub(super) fn end_job(&mut self, state: JobState, reason: String) {
        // A requeue earlier in the same step (another replica's lapse in one tick) is moot.
        self.effects
            .retain(|e| !matches!(e, Effect::RequeueAt(_) | Effect::WakeRunners));
        self.job.state = state;
        self.job.reason = reason;
        self.job.ended_ms = Some(self.now);
        self.job.retry_not_before_ms = None;
        self.job.cancel_requested = false;
        self.effects.push(Effect::JobEnded(state));
    }
}
