//! Attempt-level events: start, heartbeat, upload-begun, report, abort; and the lapse of a
//! lease or an accept window.

use super::{Effect, Refusal, Run};
use crate::types::{AttemptId, AttemptState, HeartbeatRequest, Phase, ReportRequest, ReportStatus};

impl Run<'_> {
    fn index_of(&self, attempt: AttemptId) -> Result<usize, Refusal> {
        self.job
            .attempts
            .iter()
            .position(|a| a.id == attempt)
            .ok_or(Refusal::UnknownAttempt(attempt))
    }

    /// The attempt, if it is live and within its deadline and in one of `states`; else why not.
    fn usable(
        &self,
        attempt: AttemptId,
        states: &[AttemptState],
        event: &'static str,
    ) -> Result<usize, Refusal> {
        let index = self.index_of(attempt)?;
        let a = &self.job.attempts[index];
        if !a.state.is_live() {
            return Err(Refusal::AttemptNotLive {
                attempt,
                state: a.state,
            });
        }
        if self.lapsed(index) {
            return Err(self.lapse_refusal(index));
        }
        if !states.contains(&a.state) {
            return Err(Refusal::WrongAttemptState {
                attempt,
                state: a.state,
                event,
            });
        }
        Ok(index)
    }

    /// Whether the live attempt at `index` has passed its deadline: the accept window while it
    /// is leased, the lease in any live state.
    pub(super) fn lapsed(&self, index: usize) -> bool {
        let a = &self.job.attempts[index];
        let not_started = a.state == AttemptState::Leased && self.now >= a.accept_by_ms;
        a.state.is_live() && (not_started || self.now >= a.lease_until_ms)
    }

    fn lapse_refusal(&self, index: usize) -> Refusal {
        let a = &self.job.attempts[index];
        if a.state == AttemptState::Leased && self.now >= a.accept_by_ms {
            Refusal::AcceptWindowClosed(a.id)
        } else {
            Refusal::LeaseLapsed(a.id)
        }
    }

    /// The latest a heartbeat may extend the attempt's lease to: start + time limit + margin.
    fn lease_cap(&self, index: usize) -> u64 {
        let a = &self.job.attempts[index];
        a.started_ms
            .unwrap_or(a.claimed_ms)
            .saturating_add(self.job.policy.timeout_ms)
            .saturating_add(self.settings.lease_margin_ms)
    }

    fn extend_lease(&mut self, index: usize) {
        let wanted = self.now.saturating_add(self.settings.lease_ms);
        let until = wanted.min(self.lease_cap(index));
        let a = &mut self.job.attempts[index];
        a.lease_until_ms = a.lease_until_ms.max(until);
    }

    /// Ends the attempt at `index` as its lapsed deadline says (the tick's work).
    pub(super) fn lapse(&mut self, index: usize) {
        let a = &self.job.attempts[index];
        let why = if a.state == AttemptState::Leased && self.now >= a.accept_by_ms {
            "not started within the accept window"
        } else if a.lease_until_ms >= self.lease_cap(index) {
            "lease lapsed at its cap (start + time limit + margin)"
        } else {
            "lease lapsed"
        };
        if a.cancel_requested {
            let (id, runner) = (a.id, a.runner);
            self.canceled_attempt_ended(
                index,
                format!("canceled; {why}"),
                format!(
                    "canceled; runner {runner} did not confirm the stop of attempt {id} ({why})"
                ),
            );
        } else {
            self.end_attempt(index, AttemptState::Expired, why.into());
            self.retry_or_error(index);
        }
    }

    pub(super) fn end_attempt(&mut self, index: usize, state: AttemptState, why: String) {
        let a = &mut self.job.attempts[index];
        a.state = state;
        a.why = why;
        a.ended_ms = Some(self.now);
        self.effects.push(Effect::AttemptEnded(a.id, state));
    }

    pub(super) fn start(&mut self, attempt: AttemptId) -> Result<(), Refusal> {
        let index = self.usable(attempt, &[AttemptState::Leased], "start")?;
        let a = &mut self.job.attempts[index];
        a.state = AttemptState::Running;
        a.started_ms = Some(self.now);
        a.why = "started".into();
        self.extend_lease(index);
        Ok(())
    }

    pub(super) fn heartbeat(
        &mut self,
        attempt: AttemptId,
        progress: &HeartbeatRequest,
    ) -> Result<(), Refusal> {
        let states = [AttemptState::Running, AttemptState::Uploading];
        let index = self.usable(attempt, &states, "a heartbeat")?;
        self.extend_lease(index);
        let a = &mut self.job.attempts[index];
        a.phase = Some(progress.phase);
        a.console_bytes = progress.console_bytes;
        Ok(())
    }

    pub(super) fn upload_begun(&mut self, attempt: AttemptId) -> Result<(), Refusal> {
        let index = self.usable(attempt, &[AttemptState::Running], "upload-begun")?;
        self.extend_lease(index);
        let a = &mut self.job.attempts[index];
        a.state = AttemptState::Uploading;
        a.phase = Some(Phase::Uploading);
        a.why = "uploading".into();
        Ok(())
    }

    pub(super) fn report(
        &mut self,
        attempt: AttemptId,
        report: &ReportRequest,
    ) -> Result<(), Refusal> {
        let index = self.index_of(attempt)?;
        report.validate()?;
        let a = &self.job.attempts[index];
        if a.report.is_some() {
            return Err(Refusal::AlreadyReported(attempt));
        }
        if a.state.is_live() && self.lapsed(index) {
            // As if the sweeper had come first: the attempt expires, then its report is late.
            self.lapse(index);
        }
        let a = &mut self.job.attempts[index];
        if !a.state.is_live() {
            // Only a lapsed attempt that had started is heard, and only within its late window:
            // its token dies with it after that.
            super::late_window(a, self.settings, self.now)?;
            a.report = Some(kept(report));
            a.late = true;
            self.effects.push(Effect::KeepLate(attempt));
            return Ok(());
        }
        if a.state == AttemptState::Leased {
            return Err(Refusal::WrongAttemptState {
                attempt,
                state: a.state,
                event: "a report",
            });
        }
        a.report = Some(kept(report));
        let what = describe(report);
        let policy = self.job.policy;
        if a.cancel_requested {
            self.canceled_attempt_ended(
                index,
                format!("canceled; the runner stopped and reported: {what}"),
                format!("canceled; attempt {attempt} stopped ({what})"),
            );
        } else if super::votes::counts(report.status, &policy) {
            let wanted_before = self.job.wanted();
            self.end_attempt(index, AttemptState::Reported, what);
            if !matches!(
                self.job.attempts[index].ballot(&policy),
                super::Ballot::Pending
            ) {
                self.count(wanted_before);
            } else {
                self.job.state = self.unended_state();
                self.job.reason = format!(
                    "attempt {attempt} reported ({}); its output is being indexed",
                    self.job.attempts[index].why
                );
            }
        } else if report.status.is_job_outcome() {
            // A replica's time-out: its runner's failure, not a vote.
            self.end_attempt(
                index,
                AttemptState::Reported,
                format!("{what}: a replica's time-out is its runner's failure, not a vote"),
            );
            self.retry_or_error(index);
        } else {
            self.end_attempt(index, AttemptState::Aborted, what);
            self.retry_or_error(index);
        }
        Ok(())
    }

    pub(super) fn abort(&mut self, attempt: AttemptId, reason: &str) -> Result<(), Refusal> {
        crate::types::AbortRequest {
            reason: reason.to_string(),
        }
        .validate()?;
        let live = [
            AttemptState::Leased,
            AttemptState::Running,
            AttemptState::Uploading,
        ];
        let index = self.usable(attempt, &live, "abort")?;
        let a = &self.job.attempts[index];
        let why = format!("runner aborted: {}", reason.trim());
        if a.cancel_requested {
            self.canceled_attempt_ended(
                index,
                format!("canceled; {why}"),
                format!("canceled; attempt {attempt} stopped ({why})"),
            );
        } else {
            self.end_attempt(index, AttemptState::Aborted, why);
            self.retry_or_error(index);
        }
        Ok(())
    }
}

/// The report as the snapshot keeps it: without its signed statement, which the storage keeps
/// beside the attempt (the state machine decides nothing on it).
fn kept(report: &ReportRequest) -> ReportRequest {
    ReportRequest {
        statement: None,
        ..report.clone()
    }
}

/// A report in words (the attempt's `why`), from its status and exit status only: the runner's
/// own reason is kept with the report, not mixed into ours.
fn describe(report: &ReportRequest) -> String {
    match (report.status, report.job_exit_status) {
        (ReportStatus::Success, _) => "job succeeded".into(),
        (ReportStatus::Failed, Some(status)) => format!("job failed with exit status {status}"),
        (ReportStatus::Failed, None) => "job failed".into(),
        (ReportStatus::InvalidJob, _) => "invalid job".into(),
        (ReportStatus::TimedOut, _) => "job timed out".into(),
        (ReportStatus::GuestFailed, _) => "the guest failed".into(),
        (ReportStatus::Interrupted, _) => "runner stopped (interrupted)".into(),
        (status, _) => format!("runner failed ({status})"),
    }
}
