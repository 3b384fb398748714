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
//! replicated job, its quorum to reach. A run alone that ends without a vote leaves the job as
//! if it had not been claimed; the next claim is offered (and drawn) afresh.

use super::{Ballot, JobSnapshot, Run, Vote};
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

    /// Whether an attempt holding the job alone keeps others from it: while it runs or waits
    /// for its index, and after an unaudited vote (which ends the job).
    pub(super) fn held_alone(&self) -> bool {
        self.alone_attempt().is_some_and(|(i, alone)| {
            let a = &self.attempts[i];
            !alone.audit || a.state.is_live() || matches!(a.ballot(&self.policy), Ballot::Pending)
        })
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
    /// Whether a claim now may take the job alone: the job allows it and nothing else holds
    /// or has voted on it.
    pub(super) fn may_run_alone(&self) -> bool {
        let t = self.job.tally();
        self.job.policy.adaptive && self.job.policy.quorum >= 2 && t.votes + t.pending + t.live == 0
    }

    /// After a vote was cast: if it is an unaudited run alone's, the job ends with it.
    /// Returns false when the count goes on as for any replicated job.
    pub(super) fn count_alone(&mut self) -> bool {
        let Some((index, alone)) = self.job.alone_attempt() else {
            return false;
        };
        if alone.audit {
            return false;
        }
        let Ballot::Vote(vote) = self.job.attempts[index].ballot(&self.job.policy) else {
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
