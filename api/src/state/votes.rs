//! Replicas and their votes (BOINC's quorum, on construir's terms).
//!
//! A replicated job runs on several runners of distinct owners. Each attempt that reports a job
//! outcome votes for it: the status, the job's exit status and the output's tree digest as the
//! server's own index gives it ([`Vote`]). When `quorum` votes of distinct owners are equal the
//! job ends with that outcome; votes that differ from it cost their runners standing. Votes that
//! cannot reach a quorum within the job's [`JobPolicy::vote_cap`] make it `inconclusive`.
//!
//! A job of one replica and a quorum of 1 is the same machine: its first vote stands at once
//! (its tree is not waited for).

use super::{AttemptSnapshot, Effect, JobPolicy, JobSnapshot, Refusal, Run};
use crate::types::{AttemptId, AttemptState, JobState, ReportStatus, RunnerId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// What the server's index made of an attempt's output.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputTree {
    /// Its tree digest (`construir_contract::archive::tree_digest`).
    Digest(String),
    /// The output is no archive the server could read; it votes by its sha256 instead.
    Unreadable,
}

/// What one attempt says the job did. Two votes agree when they are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vote {
    pub status: ReportStatus,
    pub job_exit_status: Option<u16>,
    pub output: VoteOutput,
}

/// The output part of a [`Vote`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VoteOutput {
    None,
    Tree(String),
    /// An unreadable output, by its sha256.
    Unreadable(String),
    /// The runner said its output's tree was another than the server's index of the bytes it
    /// sent: the vote agrees with nothing.
    Disowned(AttemptId),
}

impl std::fmt::Display for Vote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.status)?;
        if let Some(s) = self.job_exit_status {
            write!(f, " {s}")?;
        }
        match &self.output {
            VoteOutput::None => write!(f, ", no output"),
            VoteOutput::Tree(t) => write!(f, ", tree {}", short(t)),
            VoteOutput::Unreadable(sha) => write!(f, ", unreadable output {}", short(sha)),
            VoteOutput::Disowned(_) => write!(f, ", an output whose tree its runner misstated"),
        }
    }
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}

/// Where an attempt stands in the count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ballot {
    /// No report of a job outcome that counts (live, late, a runner's failure, a replica's
    /// time-out, canceled).
    NotAVote,
    /// A job outcome whose output has not been indexed yet.
    Pending,
    Vote(Vote),
}

impl AttemptSnapshot {
    /// Where this attempt stands in its job's count, under `policy`.
    pub fn ballot(&self, policy: &JobPolicy) -> Ballot {
        let Some(report) = self.report.as_ref() else {
            return Ballot::NotAVote;
        };
        if self.late
            || self.voided
            || self.state != AttemptState::Reported
            || !counts(report.status, policy)
        {
            return Ballot::NotAVote;
        }
        let output = match (&report.output_sha256, &self.output_tree) {
            (None, _) => VoteOutput::None,
            (Some(_), None) if policy.quorum > 1 => return Ballot::Pending,
            // The first vote stands: its tree is not waited for.
            (Some(sha), None) => VoteOutput::Unreadable(sha.clone()),
            (Some(_), Some(OutputTree::Digest(tree))) => match &report.output_tree_sha256 {
                Some(said) if said != tree => VoteOutput::Disowned(self.id),
                _ => VoteOutput::Tree(tree.clone()),
            },
            (Some(sha), Some(OutputTree::Unreadable)) => VoteOutput::Unreadable(sha.clone()),
        };
        Ballot::Vote(Vote {
            status: report.status,
            job_exit_status: report.job_exit_status,
            output,
        })
    }
}

/// Whether a report of `status` is a vote: a job outcome, but for a replica's time-out (a
/// runner of a slower class timing out is that runner's failure, not the job's).
pub(super) fn counts(status: ReportStatus, policy: &JobPolicy) -> bool {
    status.is_job_outcome() && !(policy.replicated() && status == ReportStatus::TimedOut)
}

/// The count of a job's votes.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub votes: u32,
    pub pending: u32,
    pub live: u32,
    /// The vote with the most distinct owners behind it (the earliest on a tie), with its
    /// attempts (indices, oldest first) and their owners.
    pub best: Option<(Vote, Vec<usize>)>,
    pub best_owners: u32,
}

impl JobSnapshot {
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        let mut groups: Vec<(Vote, Vec<usize>, HashSet<UserId>)> = Vec::new();
        for (i, a) in self.attempts.iter().enumerate() {
            if a.state.is_live() {
                t.live += 1;
            }
            match a.ballot(&self.policy) {
                Ballot::NotAVote => {}
                Ballot::Pending => t.pending += 1,
                Ballot::Vote(v) => {
                    t.votes += 1;
                    match groups.iter_mut().find(|g| g.0 == v) {
                        Some(g) => {
                            g.1.push(i);
                            g.2.insert(a.runner_owner);
                        }
                        None => groups.push((v, vec![i], HashSet::from([a.runner_owner]))),
                    }
                }
            }
        }
        // The largest group by owners; the first formed wins a tie.
        let mut best: Option<(Vote, Vec<usize>, HashSet<UserId>)> = None;
        for g in groups {
            if best.as_ref().is_none_or(|b| g.2.len() > b.2.len()) {
                best = Some(g);
            }
        }
        if let Some((v, at, owners)) = best {
            t.best_owners = u32::try_from(owners.len()).unwrap_or(u32::MAX);
            t.best = Some((v, at));
        }
        t
    }

    /// How many more attempts the job wants claimed now: enough that, with the live and the
    /// pending ones, there are `replicas` outcomes and a quorum could be reached, within the
    /// vote cap. 0 once it ended or while a cancel is under way. A job of one replica wants 1
    /// exactly when it is queued.
    pub fn wanted(&self) -> u32 {
        if self.state.is_terminal() || self.cancel_requested || self.held_alone() {
            return 0;
        }
        let t = self.tally();
        let p = &self.policy;
        let for_replicas = p.replicas.saturating_sub(t.votes + t.pending);
        let for_quorum = p.quorum.saturating_sub(t.best_owners + t.pending);
        let need = for_replicas.max(for_quorum).saturating_sub(t.live);
        let room = p.vote_cap().saturating_sub(t.votes + t.pending + t.live);
        need.min(room)
    }
}

impl JobSnapshot {
    /// Whether the job may expire now if its time-to-live has passed: it wants attempts, and
    /// the ones in flight (live, or waiting for their output's index) could not make a quorum
    /// with the votes cast even if they all agreed. A replica still running that could conclude
    /// the job is never cut off by the expiry.
    pub fn expirable(&self) -> bool {
        if self.wanted() == 0 {
            return false;
        }
        let t = self.tally();
        t.best_owners + t.pending + t.live < self.policy.quorum
    }
}

impl Run<'_> {
    /// Records what the index made of an attempt's output, and counts again if that made its
    /// report a vote.
    pub(super) fn indexed(&mut self, attempt: AttemptId, tree: &OutputTree) -> Result<(), Refusal> {
        let index = self
            .job
            .attempts
            .iter()
            .position(|a| a.id == attempt)
            .ok_or(Refusal::UnknownAttempt(attempt))?;
        match &self.job.attempts[index].output_tree {
            Some(known) if known == tree => return Ok(()),
            Some(_) => return Err(Refusal::IndexedTwice(attempt)),
            None => {}
        }
        if self.job.state.is_terminal() {
            // Nothing to decide any more; the storage keeps the index beside the attempt.
            return Ok(());
        }
        let wanted_before = self.job.wanted();
        self.job.attempts[index].output_tree = Some(tree.clone());
        if matches!(
            self.job.attempts[index].ballot(&self.job.policy),
            Ballot::Vote(_)
        ) {
            self.count(wanted_before);
        }
        Ok(())
    }

    /// After a vote was cast: the job ends with a quorum, or as inconclusive when none can be
    /// reached any more; else it goes on, claimable again if it wants more attempts.
    pub(super) fn count(&mut self, wanted_before: u32) {
        if self.count_alone() {
            return;
        }
        let t = self.job.tally();
        let p = self.job.policy;
        if let Some((vote, at)) = t.best.clone().filter(|_| t.best_owners >= p.quorum) {
            return self.conclude(&vote, &at, &t);
        }
        let room = p.vote_cap().saturating_sub(t.votes + t.pending + t.live);
        if t.best_owners + t.pending + t.live + room < p.quorum {
            return self.inconclusive(&t);
        }
        self.job.state = if t.live > 0 {
            JobState::Running
        } else {
            JobState::Queued
        };
        let wanted = self.job.wanted();
        let audited = match self.job.alone_stage() {
            Some((i, super::AloneStage::Checked)) => format!(
                "attempt {} ran alone on its runner's standing, and its vote is checked by other \
                 replicas: ",
                self.job.attempts[i].id
            ),
            _ => String::new(),
        };
        self.job.reason = format!(
            "{audited}{} of {} votes agree so far ({} needed){}{}",
            t.best_owners,
            t.votes,
            p.quorum,
            if t.pending > 0 {
                format!("; {} waiting for its output's index", t.pending)
            } else {
                String::new()
            },
            if wanted > 0 {
                format!("; {wanted} more replica(s) wanted")
            } else {
                String::new()
            }
        );
        if wanted > 0 && wanted_before == 0 {
            self.job.expires_at_ms = self.now.saturating_add(p.ttl_ms);
            self.effects.push(Effect::WakeRunners);
        }
    }

    fn conclude(&mut self, vote: &Vote, at: &[usize], t: &Tally) {
        let ids: Vec<AttemptId> = at.iter().map(|&i| self.job.attempts[i].id).collect();
        let agreed: Vec<RunnerId> = at.iter().map(|&i| self.job.attempts[i].runner).collect();
        let first = self.job.attempts[at[0]].clone();
        let p = self.job.policy;
        self.stop_live("not needed: a quorum agreed");
        self.job.result_attempt = Some(first.id);
        self.effects.push(Effect::TakeResult(first.id));
        let state = if vote.status == ReportStatus::Success {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        if p.quorum <= 1 {
            // One vote stands as it always has: no one agreed with anyone, so no standing.
            self.job.agreeing = vec![first.id];
            let what = first.why.clone();
            self.end_job(
                state,
                format!("attempt {} on runner {}: {what}", first.id, first.runner),
            );
            return;
        }
        let disagreed: Vec<RunnerId> = self
            .job
            .attempts
            .iter()
            .filter(|a| !ids.contains(&a.id))
            .filter(|a| matches!(a.ballot(&p), Ballot::Vote(_)))
            .map(|a| a.runner)
            .collect();
        self.job.agreeing = ids.clone();
        let list = |v: &[AttemptId]| {
            v.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let outvoted = if disagreed.is_empty() {
            String::new()
        } else {
            format!("; {} vote(s) disagreed", disagreed.len())
        };
        self.effects.push(Effect::Standing { agreed, disagreed });
        self.end_job(
            state,
            format!(
                "attempts {} agreed ({} of {} votes, quorum {}): {vote}{outvoted}",
                list(&ids),
                at.len(),
                t.votes,
                p.quorum
            ),
        );
    }

    fn inconclusive(&mut self, t: &Tally) {
        let votes: Vec<String> = self
            .job
            .attempts
            .iter()
            .filter_map(|a| match a.ballot(&self.job.policy) {
                Ballot::Vote(v) => Some(format!("attempt {} (runner {}): {v}", a.id, a.runner)),
                _ => None,
            })
            .collect();
        self.stop_live("not needed: the job is inconclusive");
        self.end_job(
            JobState::Inconclusive,
            format!(
                "no {} of its {} votes agree, and no more may run: {}",
                self.job.policy.quorum,
                t.votes,
                votes.join("; ")
            ),
        );
    }

    /// Runner `runner` was revoked: its live attempts end as aborted (its failures), its votes
    /// are voided, and the job goes on without them (wanting more replicas if it now does).
    pub(super) fn runner_revoked(&mut self, runner: RunnerId) {
        if self.job.state.is_terminal() {
            return;
        }
        let wanted_before = self.job.wanted();
        let mut voided = false;
        for i in 0..self.job.attempts.len() {
            if self.job.attempts[i].runner != runner || self.job.state.is_terminal() {
                continue;
            }
            if self.job.attempts[i].state.is_live() {
                if self.job.attempts[i].cancel_requested {
                    let id = self.job.attempts[i].id;
                    self.canceled_attempt_ended(
                        i,
                        "canceled; its runner was revoked".into(),
                        format!("canceled; attempt {id}'s runner was revoked"),
                    );
                } else {
                    self.end_attempt(i, AttemptState::Aborted, "its runner was revoked".into());
                    self.retry_or_error(i);
                }
            } else if !matches!(
                self.job.attempts[i].ballot(&self.job.policy),
                Ballot::NotAVote
            ) {
                self.job.attempts[i].voided = true;
                voided = true;
            }
        }
        if voided && !self.job.state.is_terminal() {
            self.job.state = self.unended_state();
            let wanted = self.job.wanted();
            self.job.reason = format!(
                "runner {runner} was revoked: its vote does not count; {wanted} more replica(s) \
                 wanted"
            );
            if wanted > 0 && wanted_before == 0 {
                self.job.expires_at_ms = self.now.saturating_add(self.job.policy.ttl_ms);
                self.effects.push(Effect::WakeRunners);
            }
        }
    }

    /// Ends every live attempt as canceled, with `why`: the job ends without them.
    pub(super) fn stop_live(&mut self, why: &str) {
        for i in 0..self.job.attempts.len() {
            if self.job.attempts[i].state.is_live() {
                self.end_attempt(i, AttemptState::Canceled, why.to_string());
            }
        }
    }
}
