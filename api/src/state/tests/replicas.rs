//! Replicated jobs: distinct owners, votes, quorum, inconclusive, standing.

use super::*;

pub(super) const SUBMITTER: UserId = UserId(1);
const A4: AttemptId = AttemptId(4);
const R3: RunnerId = RunnerId(30);
const R4: RunnerId = RunnerId(40);

pub(super) fn replicated(replicas: u32, quorum: u32) -> JobSnapshot {
    JobSnapshot::submitted(
        JobPolicy {
            replicas,
            quorum,
            owner: SUBMITTER,
            ..POLICY
        },
        T0,
    )
    .job
}

/// A claim by `runner`, whose owner is the user of the same number (runner 10: user 10).
pub(super) fn claim_by(attempt: AttemptId, runner: RunnerId, owner: UserId, now: u64) -> Event {
    let (lease_until_ms, accept_by_ms) = SETTINGS.claim_deadlines(now);
    Event::Claim {
        attempt,
        runner,
        owner,
        class: "qemu/none".into(),
        lease_until_ms,
        accept_by_ms,
        alone: None,
    }
}

pub(super) fn vote(attempt: AttemptId, status: ReportStatus, exit: u16, output: &str) -> Event {
    Event::Report {
        attempt,
        report: ReportRequest {
            status,
            exit_code: Some(i32::from(exit)),
            job_exit_status: Some(exit),
            reason: String::new(),
            times: PhaseTimes::default(),
            output_sha256: Some(output.repeat(64)),
            output_tree_sha256: Some(output.repeat(64)),
            statement: None,
        },
    }
}

pub(super) fn indexed(attempt: AttemptId, tree: &str) -> Event {
    Event::Indexed {
        attempt,
        tree: OutputTree::Digest(tree.repeat(64)),
    }
}

/// Attempt `attempt` claimed, started, reported with output `tree`, and indexed.
pub(super) fn voted(
    job: &JobSnapshot,
    attempt: AttemptId,
    runner: RunnerId,
    tree: &str,
    at: u64,
) -> Transition {
    let job = ok(job, at, claim_by(attempt, runner, UserId(runner.0), at)).job;
    let job = ok(&job, at + S, Event::Start { attempt }).job;
    let job = ok(
        &job,
        at + 2 * S,
        vote(attempt, ReportStatus::Success, 0, tree),
    )
    .job;
    ok(&job, at + 3 * S, indexed(attempt, tree))
}

#[test]
fn two_owners_that_agree_make_the_job_succeed_with_both_as_its_quorum() {
    let job = replicated(2, 2);
    assert_eq!(job.wanted(), 2);
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    // The first replica runs; the second is still wanted, so the job stays claimable.
    assert_eq!((job.state, job.wanted()), (JobState::Running, 1));
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    assert_eq!(job.wanted(), 0);
    assert_eq!(
        refused(&job, T0, claim_by(AttemptId(9), R3, UserId(30), T0)),
        Refusal::NotQueued(JobState::Running)
    );
    let job = ok(&job, T0 + S, Event::Start { attempt: A1 }).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A2 }).job;
    // A report alone is no vote yet: its output's tree is not known.
    let job = ok(&job, T0 + 5 * S, vote(A1, ReportStatus::Success, 0, "a")).job;
    assert_eq!(job.attempts[0].ballot(&job.policy), Ballot::Pending);
    assert_eq!((job.state, job.wanted()), (JobState::Running, 0));
    let job = ok(&job, T0 + 6 * S, indexed(A1, "a")).job;
    assert_eq!(job.state, JobState::Running);
    // The other replica's index may come before its report.
    let job = ok(&job, T0 + 7 * S, indexed(A2, "a")).job;
    let t = ok(&job, T0 + 8 * S, vote(A2, ReportStatus::Success, 0, "a"));
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.agreeing, [A1, A2]);
    assert_eq!(t.job.result_attempt, Some(A1));
    assert!(t.effects.contains(&Effect::Standing {
        agreed: vec![R1, R2],
        disagreed: vec![]
    }));
    assert!(
        t.job.reason.contains("attempts 1, 2 agreed"),
        "{}",
        t.job.reason
    );
}

#[test]
fn replicas_go_to_distinct_owners_never_the_submitters_unless_asked() {
    let job = replicated(2, 2);
    assert_eq!(
        refused(&job, T0, claim_by(A1, R1, SUBMITTER, T0)),
        Refusal::OwnRunner
    );
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    // Another runner of the same owner.
    assert_eq!(
        refused(&job, T0, claim_by(A2, R2, UserId(10), T0)),
        Refusal::OwnerHasReplica(UserId(10))
    );
    let mine = JobSnapshot::submitted(
        JobPolicy {
            own_runners: true,
            ..job.policy
        },
        T0,
    )
    .job;
    let mine = ok(&mine, T0, claim_by(A1, R1, SUBMITTER, T0)).job;
    assert_eq!(mine.wanted(), 1);
    // A job of one replica takes the submitter's own runners as ever.
    let single = JobSnapshot::submitted(
        JobPolicy {
            owner: SUBMITTER,
            ..POLICY
        },
        T0,
    )
    .job;
    ok(&single, T0, claim_by(A1, R1, SUBMITTER, T0));
}

#[test]
fn a_disagreement_asks_for_another_replica_and_the_loser_loses_standing() {
    let job = replicated(2, 2);
    let job = voted(&job, A1, R1, "a", T0).job;
    let job = voted(&job, A2, R2, "b", T0 + 10 * S).job;
    // One vote each: a third replica is wanted, the job claimable again.
    assert_eq!((job.state, job.wanted()), (JobState::Queued, 1));
    assert!(job.reason.contains("1 of 2 votes agree"), "{}", job.reason);
    let t = voted(&job, A3, R3, "b", T0 + 20 * S);
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.agreeing, [A2, A3]);
    assert!(t.effects.contains(&Effect::Standing {
        agreed: vec![R2, R3],
        disagreed: vec![R1]
    }));
}

#[test]
fn votes_that_cannot_agree_within_the_cap_end_inconclusive() {
    let job = replicated(2, 2);
    let mut job = voted(&job, A1, R1, "a", T0).job;
    for (i, (a, r, tree)) in [(A2, R2, "b"), (A3, R3, "c")].into_iter().enumerate() {
        job = voted(&job, a, r, tree, T0 + (i as u64 + 1) * 10 * S).job;
        assert_eq!(job.wanted(), 1, "{}", job.reason);
    }
    let t = voted(&job, A4, R4, "d", T0 + 40 * S);
    assert_eq!(t.job.state, JobState::Inconclusive);
    assert_eq!((t.job.result_attempt, t.job.agreeing.len()), (None, 0));
    assert!(
        t.job.reason.contains("attempt 4 (runner 40)"),
        "{}",
        t.job.reason
    );
    assert!(
        !t.effects
            .iter()
            .any(|e| matches!(e, Effect::Standing { .. }))
    );
    // Agreement on a failure is a result too.
    let job = replicated(2, 2);
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    let mut job = job;
    for a in [A1, A2] {
        job = ok(&job, T0 + S, Event::Start { attempt: a }).job;
        job = ok(&job, T0 + 2 * S, vote(a, ReportStatus::Failed, 2, "e")).job;
        job = ok(&job, T0 + 3 * S, indexed(a, "e")).job;
    }
    assert_eq!(job.state, JobState::Failed);
}

#[test]
fn a_runner_that_misstates_its_tree_agrees_with_no_one() {
    let job = replicated(2, 2);
    let job = voted(&job, A1, R1, "a", T0).job;
    // Its bytes index as "a" too, but it said "z": the vote is disowned.
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A2 }).job;
    let mut lie = vote(A2, ReportStatus::Success, 0, "a");
    if let Event::Report { report, .. } = &mut lie {
        report.output_tree_sha256 = Some("f".repeat(64));
    }
    let job = ok(&job, T0 + 2 * S, lie).job;
    let job = ok(&job, T0 + 3 * S, indexed(A2, "a")).job;
    assert_eq!(job.state, JobState::Queued);
    assert!(matches!(
        job.attempts[1].ballot(&job.policy),
        Ballot::Vote(Vote {
            output: VoteOutput::Disowned(A2),
            ..
        })
    ));
    let t = voted(&job, A3, R3, "a", T0 + 10 * S);
    assert_eq!(t.job.agreeing, [A1, A3]);
}

#[test]
fn a_replicas_time_out_is_its_runners_failure_and_a_second_index_is_refused() {
    let job = replicated(2, 2);
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A1 }).job;
    let job = ok(&job, T0 + 2 * S, report(A1, ReportStatus::TimedOut, None)).job;
    assert_eq!(job.attempts[0].ballot(&job.policy), Ballot::NotAVote);
    assert_eq!(job.failed_tries(), 1);
    assert!(job.retry_not_before_ms.is_some());
    assert!(!job.state.is_terminal());
    let job = ok(&job, T0 + 3 * S, indexed(A1, "a")).job;
    // The same index again changes nothing; another is refused.
    let again = ok(&job, T0 + 4 * S, indexed(A1, "a"));
    assert_eq!(again.job, job);
    assert_eq!(
        refused(&job, T0 + 4 * S, indexed(A1, "b")),
        Refusal::IndexedTwice(A1)
    );
}

#[test]
fn a_cancel_stops_every_replica_and_ends_when_the_last_stops() {
    let job = replicated(2, 2);
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A1 }).job;
    let t = ok(&job, T0 + 2 * S, Event::Cancel);
    // The leased one ends at once; the running one is asked to stop.
    assert_eq!(t.job.attempts[1].state, AttemptState::Canceled);
    assert!(t.effects.contains(&Effect::CancelRunner(A1)));
    assert_eq!((t.job.state, t.job.wanted()), (JobState::Running, 0));
    let t = ok(&t.job, T0 + 3 * S, abort(A1, "stopped"));
    assert_eq!(t.job.state, JobState::Canceled);
}

#[test]
fn a_quorum_reached_stops_the_replicas_still_running() {
    let job = replicated(3, 2);
    let job = voted(&job, A1, R1, "a", T0).job;
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    let job = ok(&job, T0, claim_by(A3, R3, UserId(30), T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A2 }).job;
    let job = ok(&job, T0 + 2 * S, vote(A2, ReportStatus::Success, 0, "a")).job;
    let t = ok(&job, T0 + 3 * S, indexed(A2, "a"));
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.attempts[2].state, AttemptState::Canceled);
    assert!(
        t.job.attempts[2].why.contains("quorum"),
        "{}",
        t.job.attempts[2].why
    );
}

#[test]
fn replicas_run_on_the_first_ones_host_class_unless_the_job_allows_any() {
    let job = replicated(2, 2);
    let job = ok(&job, T0, claim_by(A1, R1, UserId(10), T0)).job;
    let mut kvm = claim_by(A2, R2, UserId(20), T0);
    if let Event::Claim { class, .. } = &mut kvm {
        *class = "vmm/hardware".into();
    }
    assert_eq!(
        refused(&job, T0, kvm.clone()),
        Refusal::OtherClass {
            held: "qemu/none".into(),
            offered: "vmm/hardware".into()
        }
    );
    let any = JobSnapshot::submitted(
        JobPolicy {
            any_class: true,
            ..job.policy
        },
        T0,
    )
    .job;
    let any = ok(&any, T0, claim_by(A1, R1, UserId(10), T0)).job;
    ok(&any, T0, kvm);
}

#[test]
fn a_revoked_runners_vote_stops_counting_and_its_live_replica_ends() {
    let job = replicated(2, 2);
    let job = voted(&job, A1, R1, "a", T0).job;
    let job = ok(&job, T0, claim_by(A2, R2, UserId(20), T0)).job;
    // R1 is revoked: its vote is void, the job wants another replica again.
    let t = ok(&job, T0 + S, Event::RunnerRevoked { runner: R1 });
    assert!(t.job.attempts[0].voided);
    assert_eq!(t.job.attempts[0].ballot(&t.job.policy), Ballot::NotAVote);
    assert_eq!(t.job.wanted(), 1);
    assert!(t.job.reason.contains("revoked"), "{}", t.job.reason);
    // R2 is revoked while its replica is leased: it ends, not counted as a try.
    let t = ok(&t.job, T0 + 2 * S, Event::RunnerRevoked { runner: R2 });
    assert_eq!(t.job.attempts[1].state, AttemptState::Aborted);
    assert_eq!(t.job.wanted(), 2);
    // Honest runners still make the result.
    let job = voted(&t.job, A3, R3, "a", T0 + 10 * S).job;
    let t = voted(&job, A4, R4, "a", T0 + 20 * S);
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.agreeing, [A3, A4]);
    // Revoking a runner of an ended job changes nothing.
    let after = ok(&t.job, T0 + 30 * S, Event::RunnerRevoked { runner: R3 });
    assert_eq!(after.job, t.job);
}
