//! Adaptive replication (BOINC's): a replicated job submitted with
//! [`JobPolicy::adaptive`](super::JobPolicy::adaptive) may run on one runner of good standing
//! alone instead of on all its replicas.
//!
//! The server offers it with a claim ([`Alone`] in [`super::Event::Claim`]) when the runner's
//! votes agreed with a quorum enough times in a row, and draws then whether the run is audited.
//! The draw is kept from everyone until the attempt's vote is in: a runner cannot tell an
//! audited run from another while it could still lie. After the vote, an unaudited run ends the
//! job with that vote (attestation `on-standing`, and no standing gained: nothing was
//! compared); an audited one is the first of the job's replicas, and the job goes on as any
//! replicated job, its quorum to reach (counted as ever: its vote is one of them, and the others
//! may outvote it). So is a vote whose runner misstated its output's tree (it agrees with no one,
//! audited or not). A run alone that ends without a vote is a replica's failed try like any
//! (a try used, a back-off); the next claim is offered alone, and drawn, afresh. Once any attempt
//! of the job has reported a job outcome (a vote, voided or late ones too), no claim takes it
//! alone again: a revoked liar cannot throw an audit away and try its luck with a new draw.

use super::{Ballot, JobSnapshot, Run, Vote, VoteOutput};
use crate::types::{JobState, RanAlone, ReportStatus};
use serde::{Deserialize, Serialize};

/// What the server offers with a claim: run the job alone, on these terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alone {
    /// Drawn at the claim with the terms' chance: after its vote, the job wants its other
    /// replicas as if it had not run alone, and this vote counts among them.
    pub audit: bool,
    pub terms: RanAlone,
}

/// Where a job's run alone stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AloneStage {
    /// Live, or its vote waits for its output's index: it holds the job.
    Running,
    /// Its vote, unaudited and about the output the server indexed: the job ends with it.
    Stands(Vote),
    /// Its vote is one of the job's replicas' (audited, or its runner misstated its tree).
    Checked,
}

impl JobSnapshot {
    /// The attempt that holds the job alone, with its terms: live, waiting for its output's
    /// index, or voted. None once it ended without a vote (or its vote was voided).
    pub fn alone_attempt(&self) -> Option<(usize, Alone)> {
        self.attempts.iter().enumerate().find_map(|(i, a)| {
            let alone = a.alone?;
            let holds = a.state.is_live() || !matches!(a.ballot(&self.policy), Ballot::NotAVote);
            holds.then_some((i, alone))
        })
    }

    /// Where the attempt holding the job alone stands, if one does.
    pub fn alone_stage(&self) -> Option<(usize, AloneStage)> {
        let (i, alone) = self.alone_attempt()?;
        let stage = match self.attempts[i].ballot(&self.policy) {
            Ballot::Vote(v) if !alone.audit && !matches!(v.output, VoteOutput::Disowned(_)) => {
                AloneStage::Stands(v)
            }
            Ballot::Vote(_) => AloneStage::Checked,
            _ => AloneStage::Running,
        };
        Some((i, stage))
    }

    /// Whether an attempt holding the job alone keeps others from it: while it runs or waits
    /// for its index, and after a vote that stands (which ends the job).
    pub(super) fn held_alone(&self) -> bool {
        matches!(
            self.alone_stage(),
            Some((_, AloneStage::Running | AloneStage::Stands(_)))
        )
    }

    /// The attempt ran alone and its vote is now checked as a replica's: the class its other
    /// replicas must share (BOINC's homogeneous redundancy holds for audits too).
    pub(super) fn checked_alone_class(&self) -> Option<&str> {
        match self.alone_stage()? {
            (i, AloneStage::Checked) => Some(&self.attempts[i].runner_class),
            _ => None,
        }
    }

    /// The terms its result stands on, when one runner ran it alone and no audit was drawn.
    pub fn ran_alone(&self) -> Option<RanAlone> {
        if self.agreeing.len() != 1 || self.policy.quorum < 2 {
            return None;
        }
        let a = self.attempt(self.agreeing[0])?;
        a.alone
            .filter(|alone| !alone.audit)
            .map(|alone| alone.terms)
    }
}

impl JobSnapshot {
    /// The first broken rule of runs alone, if any (part of
    /// [`JobSnapshot::invariant_violation`]).
    pub(super) fn alone_violation(&self) -> Option<String> {
        let alone: Vec<_> = self.attempts.iter().filter(|a| a.alone.is_some()).collect();
        if !alone.is_empty() && !self.policy.adaptive {
            return Some(format!(
                "attempt {} ran alone in a job that does not allow it",
                alone[0].id
            ));
        }
        let live_alone = alone.iter().find(|a| a.state.is_live());
        if let Some(a) = live_alone
            && self.live_count() > 1
        {
            return Some(format!(
                "attempt {} holds the job alone beside {} other live attempt(s)",
                a.id,
                self.live_count() - 1
            ));
        }
        let holding = alone
            .iter()
            .filter(|a| a.state.is_live() || !matches!(a.ballot(&self.policy), Ballot::NotAVote))
            .count();
        if holding > 1 {
            return Some(format!("{holding} attempts hold the job alone"));
        }
        if self.agreeing.len() == 1 && self.policy.quorum >= 2 && self.ran_alone().is_none() {
            return Some(format!(
                "one agreeing attempt of a quorum of {}, which did not run alone unaudited",
                self.policy.quorum
            ));
        }
        None
    }
}

impl Run<'_> {
    /// Whether a claim now may take the job alone: the job allows it, nothing holds it, and no
    /// attempt of it ever reported a job outcome (counted, voided or late).
    pub(super) fn may_run_alone(&self) -> bool {
        let untouched = self.job.attempts.iter().all(|a| {
            !a.state.is_live() && a.report.as_ref().is_none_or(|r| !r.status.is_job_outcome())
        });
        self.job.policy.adaptive && untouched
    }

    /// After a vote was cast: if it is an unaudited run alone's, the job ends with it.
    /// Returns false when the count goes on as for any replicated job.
    pub(super) fn count_alone(&mut self) -> bool {
        let Some((index, AloneStage::Stands(vote))) = self.job.alone_stage() else {
            return false;
        };
        let Some(alone) = self.job.attempts[index].alone else {
            return false;
        };
        self.conclude_alone(index, &vote, alone.terms);
        true
    }

    fn conclude_alone(&mut self, index: usize, vote: &Vote, terms: RanAlone) {
        let a = self.job.attempts[index].clone();
        self.stop_live("not needed: the job ran alone");
        self.job.result_attempt = Some(a.id);
        self.job.agreeing = vec![a.id];
        self.effects.push(super::Effect::TakeResult(a.id));
        let state = if vote.status == ReportStatus::Success {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        // No standing changes: no one's vote was compared with it.
        self.end_job(
            state,
            format!(
                "attempt {} on runner {} ran alone on its standing ({} votes agreed in a row, {} \
                 asked; no audit drawn, {}% of such runs are): {vote}",
                a.id, a.runner, terms.agreed_in_row, terms.after, terms.audit_percent
            ),
        );
    }
}
