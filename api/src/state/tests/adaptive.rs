//! Adaptive replication: one runner of good standing runs a replicated job alone, unless the
//! audit drawn at its claim asks for the other replicas after its vote.

use super::replicas::{SUBMITTER, claim_by, indexed, replicated, vote, voted};
use super::*;
use crate::trust::{Attestation, attestation_of};
use crate::types::RanAlone;

const TERMS: RanAlone = RanAlone {
    agreed_in_row: 12,
    after: 10,
    audit_percent: 10,
};

fn adaptive(replicas: u32, quorum: u32) -> JobSnapshot {
    JobSnapshot::submitted(
        JobPolicy {
            adaptive: true,
            ..replicated(replicas, quorum).policy
        },
        T0,
    )
    .job
}

/// A claim by `runner` (of the user of its number) that the server lets run the job alone.
fn alone(attempt: AttemptId, runner: RunnerId, audit: bool, now: u64) -> Event {
    let mut e = claim_by(attempt, runner, UserId(runner.0), now);
    if let Event::Claim { alone, .. } = &mut e {
        *alone = Some(Alone {
            audit,
            terms: TERMS,
        });
    }
    e
}

/// `attempt` on `runner` claimed alone, started, reported with output `tree`.
fn reported_alone(
    job: &JobSnapshot,
    attempt: AttemptId,
    runner: RunnerId,
    audit: bool,
) -> JobSnapshot {
    let job = ok(job, T0, alone(attempt, runner, audit, T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt }).job;
    ok(
        &job,
        T0 + 2 * S,
        vote(attempt, ReportStatus::Success, 0, "a"),
    )
    .job
}

#[test]
fn a_run_alone_unaudited_ends_the_job_on_its_runners_standing() {
    let job = adaptive(2, 2);
    let job = ok(&job, T0, alone(A1, R1, false, T0)).job;
    // Alone, it holds the job: no other replica is wanted or taken.
    assert_eq!((job.state, job.wanted()), (JobState::Running, 0));
    assert_eq!(
        refused(&job, T0, claim_by(A2, R2, UserId(20), T0)),
        Refusal::NotQueued(JobState::Running)
    );
    assert!(
        job.reason.contains("alone on its standing"),
        "{}",
        job.reason
    );
    let job = ok(&job, T0 + S, Event::Start { attempt: A1 }).job;
    let job = ok(&job, T0 + 2 * S, vote(A1, ReportStatus::Success, 0, "a")).job;
    // Its vote waits for the server's index of its output, like any replica's.
    assert_eq!((job.state, job.wanted()), (JobState::Queued, 0));
    assert_eq!(job.ran_alone(), None);
    let t = ok(&job, T0 + 3 * S, indexed(A1, "a"));
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(
        (t.job.agreeing.clone(), t.job.result_attempt),
        (vec![A1], Some(A1))
    );
    assert_eq!(t.job.ran_alone(), Some(TERMS));
    assert!(t.effects.contains(&Effect::TakeResult(A1)));
    // Nothing was compared: no standing is won.
    assert!(
        !t.effects
            .iter()
            .any(|e| matches!(e, Effect::Standing { .. })),
        "{:?}",
        t.effects
    );
    assert!(t.job.reason.contains("ran alone"), "{}", t.job.reason);
    assert!(t.job.reason.contains("no audit drawn"), "{}", t.job.reason);
    let owners = [t.job.attempts[0].runner_owner];
    assert_eq!(
        attestation_of(2, &owners, SUBMITTER, t.job.ran_alone().is_some()),
        Attestation::OnStanding
    );
}

#[test]
fn an_audited_run_alone_looks_the_same_until_its_vote_then_wants_the_other_replicas() {
    let plain = ok(&adaptive(2, 2), T0, alone(A1, R1, false, T0)).job;
    let audited = ok(&adaptive(2, 2), T0, alone(A1, R1, true, T0)).job;
    // Nothing the runner (or anyone) can see tells the two apart while it could still lie.
    assert_eq!(plain.reason, audited.reason);
    assert_eq!(
        (plain.state, plain.wanted()),
        (audited.state, audited.wanted())
    );
    let facts = |j: &JobSnapshot| {
        j.view(
            view::JobFacts {
                id: crate::types::JobId(1),
                owner: SUBMITTER,
                name: "a_i0.tar.xz".into(),
                image: "i0".into(),
                image_digest: None,
                sha256: "0".repeat(64),
                size: 1,
                limits: crate::types::JobLimits::DEFAULT,
                priority: 0,
                private: false,
            },
            |_| AttemptBlobs::default(),
        )
    };
    assert_eq!(facts(&plain), facts(&audited));

    let job = reported_alone(&adaptive(2, 2), A1, R1, true);
    assert_eq!(job.wanted(), 0, "the vote is not in before its index");
    let t = ok(&job, T0 + 3 * S, indexed(A1, "a"));
    // The vote is in: the audit asks for the job's other replica.
    assert_eq!((t.job.state, t.job.wanted()), (JobState::Queued, 1));
    assert!(t.effects.contains(&Effect::WakeRunners));
    assert!(
        t.job.reason.contains("checked by other replicas"),
        "{}",
        t.job.reason
    );
    // Another owner's replica agrees: verified, and both gain standing.
    let t = voted(&t.job, A2, R2, "a", T0 + 4 * S);
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.agreeing, [A1, A2]);
    assert_eq!(t.job.ran_alone(), None);
    assert!(t.effects.contains(&Effect::Standing {
        agreed: vec![R1, R2],
        disagreed: vec![]
    }));
}

#[test]
fn an_audit_that_disagrees_costs_the_runner_alone_its_standing() {
    let job = reported_alone(&adaptive(2, 2), A1, R1, true);
    let job = ok(&job, T0 + 3 * S, indexed(A1, "a")).job;
    // The auditor says otherwise: no quorum yet, a third replica is wanted.
    let job = voted(&job, A2, R2, "b", T0 + 4 * S).job;
    assert_eq!((job.state, job.wanted()), (JobState::Queued, 1));
    // It sides with the auditor: the runner that ran alone lost.
    let t = voted(&job, A3, RunnerId(30), "b", T0 + 8 * S);
    assert_eq!(t.job.state, JobState::Succeeded);
    assert_eq!(t.job.agreeing, [A2, A3]);
    assert!(t.effects.contains(&Effect::Standing {
        agreed: vec![R2, RunnerId(30)],
        disagreed: vec![R1]
    }));
}

#[test]
fn a_run_alone_that_ends_without_a_vote_leaves_the_job_as_if_unclaimed() {
    let job = ok(&adaptive(2, 2), T0, alone(A1, R1, false, T0)).job;
    let job = ok(&job, T0 + S, Event::Start { attempt: A1 }).job;
    let job = ok(&job, T0 + 2 * S, abort(A1, "the runner stopped")).job;
    assert_eq!(job.alone_attempt(), None);
    // After the back-off, both replicas are wanted again, and a runner short of the standing
    // takes one as usual.
    let later = T0 + 3600 * S;
    let job = ok(&job, later, Event::Tick).job;
    assert_eq!(job.wanted(), 2);
    let job = ok(&job, later, claim_by(A2, R2, UserId(20), later)).job;
    assert_eq!(job.wanted(), 1);
    // Once a replica runs, no claim may take the job alone: the offer is not taken up.
    let job = ok(&job, later, alone(A3, RunnerId(30), false, later)).job;
    assert_eq!(job.attempts[2].alone, None);
    assert_eq!(job.wanted(), 0);
}

#[test]
fn only_a_job_that_allows_it_runs_alone() {
    // Not asked for: the offer is ignored and the claim is a replica's like any.
    let job = ok(&replicated(2, 2), T0, alone(A1, R1, false, T0)).job;
    assert_eq!((job.attempts[0].alone, job.wanted()), (None, 1));
    // A quorum of 1 has nothing to spare: the submission drops the ask.
    assert!(!adaptive(2, 1).policy.adaptive);
    // Revoked before its index: its vote is void, and the job wants both replicas again.
    let job = reported_alone(&adaptive(2, 2), A1, R1, false);
    let job = ok(&job, T0 + 3 * S, Event::RunnerRevoked { runner: R1 }).job;
    assert_eq!((job.alone_attempt(), job.wanted()), (None, 2));
    let job = ok(&job, T0 + 4 * S, indexed(A1, "a")).job;
    assert!(!job.state.is_terminal());
}

#[test]
fn a_run_alone_that_misstates_its_tree_does_not_stand_and_is_checked() {
    // It said tree "a"; the server's index of its bytes says "b".
    let job = reported_alone(&adaptive(2, 2), A1, R1, false);
    let t = ok(&job, T0 + 3 * S, indexed(A1, "b"));
    assert_eq!((t.job.state, t.job.wanted()), (JobState::Queued, 1));
    assert_eq!(t.job.ran_alone(), None);
    assert!(matches!(
        t.job.alone_stage(),
        Some((0, AloneStage::Checked))
    ));
    // Two honest replicas settle it; the runner alone is outvoted.
    let job = voted(&t.job, A2, R2, "b", T0 + 4 * S).job;
    let t = voted(&job, A3, RunnerId(30), "b", T0 + 8 * S);
    assert_eq!(t.job.state, JobState::Succeeded);
    assert!(t.effects.contains(&Effect::Standing {
        agreed: vec![R2, RunnerId(30)],
        disagreed: vec![R1]
    }));
}

#[test]
fn once_a_job_had_a_vote_no_claim_takes_it_alone_again() {
    // Audited, then its runner revoked (the vote void): the job wants both replicas again,
    // but a new run alone (a fresh draw) is not on offer.
    let job = reported_alone(&adaptive(2, 2), A1, R1, true);
    let job = ok(&job, T0 + 3 * S, indexed(A1, "a")).job;
    let job = ok(&job, T0 + 4 * S, Event::RunnerRevoked { runner: R1 }).job;
    assert_eq!(job.wanted(), 2);
    let job = ok(&job, T0 + 5 * S, alone(A2, R2, false, T0 + 5 * S)).job;
    assert_eq!(job.attempts[1].alone, None);
    assert_eq!(job.wanted(), 1, "a replica's claim like any");
}

#[test]
fn the_replicas_that_check_a_run_alone_share_its_host_class() {
    let job = reported_alone(&adaptive(2, 2), A1, R1, true);
    let job = ok(&job, T0 + 3 * S, indexed(A1, "a")).job;
    let mut other = claim_by(A2, R2, UserId(20), T0 + 4 * S);
    if let Event::Claim { class, .. } = &mut other {
        *class = "vmm/hardware".into();
    }
    assert!(matches!(
        refused(&job, T0 + 4 * S, other),
        Refusal::OtherClass { .. }
    ));
    let job = ok(&job, T0 + 4 * S, claim_by(A2, R2, UserId(20), T0 + 4 * S)).job;
    assert_eq!(job.wanted(), 0);
}

#[test]
fn the_draw_shows_in_the_attempts_view_only_once_its_vote_is_in() {
    let view = |j: &JobSnapshot| j.attempts[0].view(AttemptBlobs::default(), &j.policy).alone;
    for audit in [false, true] {
        let job = reported_alone(&adaptive(2, 2), A1, R1, audit);
        assert_eq!(view(&job).as_deref(), Some("alone"));
        let job = ok(&job, T0 + 3 * S, indexed(A1, "a")).job;
        let after = if audit {
            "alone, audited"
        } else {
            "alone, not audited"
        };
        assert_eq!(view(&job).as_deref(), Some(after));
    }
}
