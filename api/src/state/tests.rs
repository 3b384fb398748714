//! The state machines' rules, one scenario per test, in milliseconds.

use super::*;
use crate::types::{JobLimits, PhaseTimes, ReportStatus, UserId};

mod adaptive;
mod cancel_and_edges;
mod replicas;

/// A time far from 0, so that "0" never passes for a real time by accident.
const T0: u64 = 1_000_000_000;
const S: u64 = 1000;
const A1: AttemptId = AttemptId(1);
const A2: AttemptId = AttemptId(2);
const A3: AttemptId = AttemptId(3);
const R1: RunnerId = RunnerId(10);
const R2: RunnerId = RunnerId(20);

const SETTINGS: Settings = Settings::DEFAULT;
const POLICY: JobPolicy = JobPolicy {
    max_tries: 3,
    ttl_ms: 3600 * S,
    timeout_ms: 600 * S,
    ..JobPolicy::DEFAULT
};

fn submitted() -> JobSnapshot {
    JobSnapshot::submitted(POLICY, T0).job
}

/// Applies an event that must be taken, and checks the invariants of the result.
fn ok(job: &JobSnapshot, now: u64, event: Event) -> Transition {
    let t = step(job, &SETTINGS, now, &event)
        .unwrap_or_else(|e| panic!("{event:?} at {now} refused: {e}\n{job:#?}"));
    if let Some(broken) = t.job.invariant_violation(&SETTINGS) {
        panic!("{event:?} broke an invariant: {broken}\n{:#?}", t.job);
    }
    t
}

/// Applies an event that must be refused, and checks that nothing changed.
fn refused(job: &JobSnapshot, now: u64, event: Event) -> Refusal {
    let before = job.clone();
    let e = step(job, &SETTINGS, now, &event).expect_err(&format!("{event:?} at {now} taken"));
    assert_eq!(job, &before);
    e
}

fn claim(attempt: AttemptId, runner: RunnerId, now: u64) -> Event {
    let (lease_until_ms, accept_by_ms) = SETTINGS.claim_deadlines(now);
    Event::Claim {
        attempt,
        runner,
        owner: UserId(runner.0),
        class: "qemu/none".into(),
        lease_until_ms,
        accept_by_ms,
        alone: None,
    }
}

fn heartbeat(attempt: AttemptId) -> Event {
    Event::Heartbeat {
        attempt,
        progress: HeartbeatRequest {
            phase: Phase::Running,
            console_bytes: 100,
        },
    }
}

fn report(attempt: AttemptId, status: ReportStatus, job_exit_status: Option<u16>) -> Event {
    Event::Report {
        attempt,
        report: ReportRequest {
            status,
            exit_code: None,
            job_exit_status,
            reason: String::new(),
            times: PhaseTimes::default(),
            output_sha256: None,
            output_tree_sha256: None,
            statement: None,
        },
    }
}

fn abort(attempt: AttemptId, reason: &str) -> Event {
    Event::Abort {
        attempt,
        reason: reason.into(),
    }
}

/// A job with attempt `attempt` claimed at `now` and started 1 s later.
fn running(job: &JobSnapshot, attempt: AttemptId, runner: RunnerId, now: u64) -> JobSnapshot {
    let job = ok(job, now, claim(attempt, runner, now)).job;
    ok(&job, now + S, Event::Start { attempt }).job
}

fn semantic(effects: &[Effect]) -> Vec<Effect> {
    effects
        .iter()
        .filter(|e| !matches!(e, Effect::StoreJob | Effect::StoreAttempt(_)))
        .cloned()
        .collect()
}

#[test]
fn the_happy_path() {
    let submitted = JobSnapshot::submitted(POLICY, T0);
    assert_eq!(submitted.effects, [Effect::StoreJob, Effect::WakeRunners]);
    let job = submitted.job;
    assert_eq!(
        (job.state, job.expires_at_ms),
        (JobState::Queued, T0 + POLICY.ttl_ms)
    );

    let t = ok(&job, T0 + S, claim(A1, R1, T0 + S));
    assert_eq!(t.effects, [Effect::StoreJob, Effect::StoreAttempt(A1)]);
    assert_eq!(t.job.state, JobState::Running);
    let a = &t.job.attempts[0];
    assert_eq!(
        (a.state, a.accept_by_ms, a.lease_until_ms),
        (AttemptState::Leased, T0 + 31 * S, T0 + 91 * S)
    );
    assert!(
        t.job.reason.contains("attempt 1 on runner 10 (try 1 of 3)"),
        "{}",
        t.job.reason
    );

    let t = ok(&t.job, T0 + 2 * S, Event::Start { attempt: A1 });
    assert_eq!(t.effects, [Effect::StoreAttempt(A1)]);
    let a = &t.job.attempts[0];
    assert_eq!(
        (a.state, a.started_ms, a.lease_until_ms),
        (AttemptState::Running, Some(T0 + 2 * S), T0 + 92 * S)
    );

    let t = ok(&t.job, T0 + 30 * S, heartbeat(A1));
    assert_eq!(t.job.attempts[0].lease_until_ms, T0 + 120 * S);
    assert_eq!(t.job.attempts[0].console_bytes, 100);
    let t = ok(&t.job, T0 + 40 * S, Event::UploadBegun { attempt: A1 });
    assert_eq!(t.job.attempts[0].state, AttemptState::Uploading);

    let t = ok(
        &t.job,
        T0 + 50 * S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(
        t.effects,
        [
            Effect::StoreJob,
            Effect::StoreAttempt(A1),
            Effect::AttemptEnded(A1, AttemptState::Reported),
            Effect::TakeResult(A1),
            Effect::JobEnded(JobState::Succeeded),
        ]
    );
    let job = t.job;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.result_attempt, Some(A1));
    assert_eq!(job.ended_ms, Some(T0 + 50 * S));
    assert_eq!(job.reason, "attempt 1 on runner 10: job succeeded");
    assert_eq!(job.attempts[0].why, "job succeeded");
}

#[test]
fn a_lapsed_lease_requeues_with_a_back_off_and_the_second_attempt_succeeds() {
    let job = running(&submitted(), A1, R1, T0);
    let lease_end = job.attempts[0].lease_until_ms;
    // Nothing is due just before the lease ends.
    let t = ok(&job, lease_end - 1, Event::Tick);
    assert_eq!((t.job.clone(), t.effects), (job.clone(), vec![]));

    let t = ok(&job, lease_end, Event::Tick);
    let retry_at = lease_end + 10 * S;
    assert_eq!(
        semantic(&t.effects),
        [
            Effect::AttemptEnded(A1, AttemptState::Expired),
            Effect::RequeueAt(retry_at)
        ]
    );
    let job = t.job;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.retry_not_before_ms, Some(retry_at));
    assert_eq!(job.expires_at_ms, retry_at + POLICY.ttl_ms);
    assert_eq!(job.attempts[0].why, "lease lapsed");
    assert!(
        job.reason.contains("try 2 of 3 after a 10 s back-off"),
        "{}",
        job.reason
    );

    assert_eq!(
        refused(&job, retry_at - 1, claim(A2, R2, retry_at - 1)),
        Refusal::RetryNotYet(retry_at)
    );
    let t = ok(&job, retry_at, Event::Tick);
    assert_eq!(semantic(&t.effects), [Effect::WakeRunners]);
    assert_eq!(t.job.retry_not_before_ms, None);

    let job = running(&t.job, A2, R2, retry_at + S);
    let job = ok(
        &job,
        retry_at + 60 * S,
        report(A2, ReportStatus::Success, Some(0)),
    )
    .job;
    assert_eq!(
        (job.state, job.result_attempt),
        (JobState::Succeeded, Some(A2))
    );
    let whys: Vec<_> = job
        .attempts
        .iter()
        .map(|a| (a.id, a.state, a.why.as_str()))
        .collect();
    assert_eq!(
        whys,
        [
            (A1, AttemptState::Expired, "lease lapsed"),
            (A2, AttemptState::Reported, "job succeeded"),
        ]
    );
}

#[test]
fn a_claim_during_the_back_off_may_also_come_without_a_tick() {
    let job = running(&submitted(), A1, R1, T0);
    let job = ok(&job, T0 + 5 * S, abort(A1, "disk full")).job;
    let at = job.retry_not_before_ms.unwrap();
    assert_eq!(at, T0 + 15 * S);
    let t = ok(&job, at, claim(A2, R2, at));
    assert_eq!(t.job.retry_not_before_ms, None);
    assert_eq!(t.job.attempts[0].why, "runner aborted: disk full");
}

#[test]
fn a_late_report_is_kept_aside_never_taken() {
    let job = running(&submitted(), A1, R1, T0);
    let lease_end = job.attempts[0].lease_until_ms;
    let job = ok(&job, lease_end, Event::Tick).job;
    let t = ok(
        &job,
        lease_end + S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(t.effects, [Effect::StoreAttempt(A1), Effect::KeepLate(A1)]);
    let a = &t.job.attempts[0];
    assert!(a.late && a.report.is_some());
    assert_eq!(a.state, AttemptState::Expired);
    assert_eq!(
        (t.job.state, t.job.result_attempt),
        (JobState::Queued, None)
    );
    // A second late report is one too many.
    let again = refused(
        &t.job,
        lease_end + 2 * S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(again, Refusal::AlreadyReported(A1));
    assert_eq!(again.code(), crate::codes::ALREADY_REPORTED);
}

#[test]
fn a_report_after_the_lease_is_late_even_before_the_sweeper_ran() {
    let job = running(&submitted(), A1, R1, T0);
    let lease_end = job.attempts[0].lease_until_ms;
    let t = ok(
        &job,
        lease_end + S,
        report(A1, ReportStatus::Failed, Some(1)),
    );
    assert_eq!(
        semantic(&t.effects),
        [
            Effect::AttemptEnded(A1, AttemptState::Expired),
            Effect::RequeueAt(lease_end + 11 * S),
            Effect::KeepLate(A1),
        ]
    );
    assert_eq!(t.job.state, JobState::Queued);
    assert!(t.job.attempts[0].late);
}

#[test]
fn a_late_report_after_the_job_ended_leaves_the_job_as_it_was() {
    let job = running(&submitted(), A1, R1, T0);
    let lease_end = job.attempts[0].lease_until_ms;
    let job = ok(&job, lease_end, Event::Tick).job;
    let at = job.retry_not_before_ms.unwrap();
    let job = running(&job, A2, R2, at);
    let job = ok(
        &job,
        at + 10 * S,
        report(A2, ReportStatus::Success, Some(0)),
    )
    .job;
    let t = ok(&job, at + 20 * S, report(A1, ReportStatus::Failed, Some(3)));
    assert_eq!(
        (t.job.state, t.job.result_attempt, t.job.ended_ms),
        (job.state, Some(A2), job.ended_ms)
    );
    assert!(t.job.attempts[0].late);
    assert_eq!(t.job.attempts[0].state, AttemptState::Expired);
}

#[test]
fn a_late_report_is_taken_only_within_the_late_window() {
    let job = running(&submitted(), A1, R1, T0);
    let lease_end = job.attempts[0].lease_until_ms;
    let job = ok(&job, lease_end, Event::Tick).job;
    let window = SETTINGS.late_window_ms();
    assert_eq!(window, SETTINGS.lease_ms, "one lease");
    let closes = lease_end + window;
    assert_eq!(
        job.attempt_access(A1, &SETTINGS, closes - 1),
        Ok(Access::Late)
    );
    let t = ok(&job, closes - 1, report(A1, ReportStatus::Success, Some(0)));
    assert!(t.job.attempts[0].late);
    let e = refused(&job, closes, report(A1, ReportStatus::Success, Some(0)));
    assert_eq!(
        e,
        Refusal::LateWindowClosed {
            attempt: A1,
            ended_ms: lease_end
        }
    );
    assert_eq!(e.code(), crate::codes::LEASE_LOST);
    assert_eq!(job.attempt_access(A1, &SETTINGS, closes), Err(e));
    // The window counts from the lapse even when the sweeper has not stored it: the report
    // of an attempt whose lease ended an hour ago is judged at its own late window.
    let unswept = running(&submitted(), A1, R1, T0);
    assert_eq!(
        unswept.attempt_access(A1, &SETTINGS, lease_end + 3600 * S),
        Ok(Access::Late),
        "the tick it would get first ends it now"
    );
    assert_eq!(
        unswept.attempt_access(A1, &SETTINGS, lease_end - 1),
        Ok(Access::Live)
    );
}

#[test]
fn an_attempt_that_was_given_up_canceled_or_never_started_has_nothing_to_report_late() {
    let job = running(&submitted(), A1, R1, T0);
    let aborted = ok(&job, T0 + 2 * S, abort(A1, "shutting down")).job;
    let e = refused(
        &aborted,
        T0 + 3 * S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(
        e,
        Refusal::AttemptNotLive {
            attempt: A1,
            state: AttemptState::Aborted
        }
    );
    assert_eq!(e.code(), crate::codes::LEASE_LOST);
    assert_eq!(aborted.attempt_access(A1, &SETTINGS, T0 + 3 * S), Err(e));

    let canceling = ok(&job, T0 + 2 * S, Event::Cancel).job;
    let lease_end = canceling.attempts[0].lease_until_ms;
    let canceled = ok(&canceling, lease_end, Event::Tick).job;
    assert_eq!(canceled.attempts[0].state, AttemptState::Canceled);
    let e = refused(
        &canceled,
        lease_end + S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(e.code(), crate::codes::LEASE_LOST);

    // Claimed, never started, past its accept window (swept or not): it never ran.
    let leased = ok(&submitted(), T0, claim(A1, R1, T0)).job;
    let accept_by = leased.attempts[0].accept_by_ms;
    let e = refused(
        &leased,
        accept_by + S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(e.code(), crate::codes::LEASE_LOST, "{e}");
    let swept = ok(&leased, accept_by, Event::Tick).job;
    assert!(swept.attempt_access(A1, &SETTINGS, accept_by + S).is_err());
    // A reported attempt says so to every later call.
    let done = running(&submitted(), A1, R1, T0);
    let done = ok(
        &done,
        T0 + 5 * S,
        report(A1, ReportStatus::Success, Some(0)),
    )
    .job;
    assert_eq!(
        done.attempt_access(A1, &SETTINGS, T0 + 6 * S),
        Err(Refusal::AlreadyReported(A1))
    );
    assert_eq!(
        done.attempt_access(A2, &SETTINGS, T0 + 6 * S),
        Err(Refusal::UnknownAttempt(A2))
    );
}

#[test]
fn an_attempt_not_started_within_the_accept_window_expires() {
    let job = ok(&submitted(), T0, claim(A1, R1, T0)).job;
    let accept_by = job.attempts[0].accept_by_ms;
    // Before the sweeper: the start is refused and nothing changes.
    let e = refused(&job, accept_by, Event::Start { attempt: A1 });
    assert_eq!(e, Refusal::AcceptWindowClosed(A1));
    assert_eq!(e.code(), crate::codes::LEASE_LOST);
    let t = ok(&job, accept_by, Event::Tick);
    assert_eq!(t.job.attempts[0].state, AttemptState::Expired);
    assert_eq!(
        t.job.attempts[0].why,
        "not started within the accept window"
    );
    assert_eq!(t.job.state, JobState::Queued);
    // Nothing ran: no try used, no back-off, claimable again at once.
    assert_eq!(semantic(&t.effects)[1..], [Effect::WakeRunners]);
    assert_eq!(t.job.retry_not_before_ms, None);
    assert_eq!(t.job.tries(), 0);
    assert!(
        t.job
            .reason
            .contains("not counted as a try (1 of 10 unstarted attempts allowed)"),
        "{}",
        t.job.reason
    );
    let e = refused(&t.job, accept_by + S, Event::Start { attempt: A1 });
    assert_eq!(
        e,
        Refusal::AttemptNotLive {
            attempt: A1,
            state: AttemptState::Expired
        }
    );
    assert_eq!(e.code(), crate::codes::LEASE_LOST);
}

#[test]
fn tries_not_the_jobs_fault_run_out_into_errored() {
    let job = running(&submitted(), A1, R1, T0);
    let job = ok(&job, T0 + 5 * S, abort(A1, "lost its disk")).job;
    let at = job.retry_not_before_ms.unwrap();
    assert_eq!(at, T0 + 15 * S);

    let job = running(&job, A2, R2, at);
    let t = ok(&job, at + 5 * S, report(A2, ReportStatus::VmmFault, None));
    assert_eq!(t.job.attempts[1].state, AttemptState::Aborted);
    assert_eq!(t.job.attempts[1].why, "runner failed (vmm-fault)");
    let at2 = t.job.retry_not_before_ms.unwrap();
    assert_eq!(at2, at + 35 * S, "the second back-off is 30 s");

    let job = running(&t.job, A3, R1, at2);
    let lease_end = job.attempts[2].lease_until_ms;
    let t = ok(&job, lease_end, Event::Tick);
    assert_eq!(
        semantic(&t.effects),
        [
            Effect::AttemptEnded(A3, AttemptState::Expired),
            Effect::JobEnded(JobState::Errored)
        ]
    );
    let job = t.job;
    assert_eq!(job.state, JobState::Errored);
    assert_eq!(job.result_attempt, None);
    assert_eq!(
        job.reason,
        "3 of 3 tries ended without a job outcome; the last, attempt 3: lease lapsed"
    );
    assert_eq!(
        refused(&job, lease_end + S, claim(AttemptId(4), R1, lease_end + S)),
        Refusal::JobEnded(JobState::Errored)
    );
}

#[test]
fn a_job_that_fails_itself_is_failed_and_not_retried() {
    for (status, exit, why) in [
        (
            ReportStatus::Failed,
            Some(2),
            "job failed with exit status 2",
        ),
        (ReportStatus::InvalidJob, None, "invalid job"),
        (ReportStatus::TimedOut, None, "job timed out"),
        (ReportStatus::GuestFailed, None, "the guest failed"),
    ] {
        let job = running(&submitted(), A1, R1, T0);
        let t = ok(&job, T0 + 9 * S, report(A1, status, exit));
        assert_eq!(t.job.state, JobState::Failed, "{status}");
        assert_eq!(t.job.result_attempt, Some(A1));
        assert_eq!(t.job.attempts[0].why, why);
        assert!(t.effects.contains(&Effect::TakeResult(A1)));
        assert!(!t.effects.iter().any(|e| matches!(e, Effect::RequeueAt(_))));
    }
}

#[test]
fn a_runner_stopped_by_a_signal_is_not_the_jobs_failure() {
    let job = running(&submitted(), A1, R1, T0);
    let t = ok(
        &job,
        T0 + 9 * S,
        report(A1, ReportStatus::Interrupted, None),
    );
    assert_eq!(t.job.state, JobState::Queued);
    assert_eq!(t.job.attempts[0].why, "runner stopped (interrupted)");
    assert_eq!(t.job.attempts[0].state, AttemptState::Aborted);
    assert!(!t.job.attempts[0].late);
}

#[test]
fn runners_that_claim_and_never_start_cost_the_job_no_tries() {
    // Bad runners claim the job one after the other and never start it (or give it up before
    // the start): the job keeps all its tries and waits no back-off.
    let mut job = submitted();
    let mut now = T0;
    for n in 1..SETTINGS.max_unstarted as u64 {
        let id = AttemptId(100 + n);
        job = ok(&job, now, claim(id, RunnerId(100 + n), now)).job;
        if n % 2 == 0 {
            job = ok(&job, now + S, abort(id, "never meant to")).job;
            now += S;
        } else {
            now = job.attempts.last().unwrap().accept_by_ms;
            job = ok(&job, now, Event::Tick).job;
        }
        assert_eq!(job.state, JobState::Queued, "after {n}");
        assert_eq!(job.retry_not_before_ms, None, "no back-off after {n}");
    }
    assert_eq!(job.tries(), 0);
    // A good runner then gets all three tries.
    let t = ok(&job, now, claim(A1, R2, now));
    assert!(t.job.reason.contains("(try 1 of 3)"), "{}", t.job.reason);
    let job = ok(&t.job, now + S, Event::Start { attempt: A1 }).job;
    let job = ok(&job, now + 2 * S, abort(A1, "disk full")).job;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(
        job.retry_not_before_ms,
        Some(now + 12 * S),
        "the first back-off"
    );
    assert!(job.reason.contains("try 2 of 3"), "{}", job.reason);
}

#[test]
fn a_runner_that_did_not_start_the_job_gets_it_again_after_a_cool_down() {
    // A runner claims and gives up (or its start or claim answer was lost): others may take the
    // job at once, this runner again after 5 minutes.
    const MIN: u64 = 60 * S;
    let job = ok(&submitted(), T0, claim(A1, R1, T0)).job;
    let ended = T0 + S;
    let job = ok(&job, ended, abort(A1, "never meant to")).job;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(
        job.reason,
        "attempt 1 ended before it started (runner aborted: never meant to), not \
         counted as a try (1 of 10 unstarted attempts allowed): runner 10 claimed it and did not \
         start it; other runners may take it now, 10 again after a 300 s cool-down (at \
         1000301000 Unix ms)"
    );
    let until = ended + 5 * MIN;
    for now in [ended, ended + S, until - 1] {
        let e = refused(&job, now, claim(A2, R1, now));
        assert_eq!(
            e,
            Refusal::RunnerDidNotStart {
                runner: R1,
                attempt: A1,
                until_ms: until
            }
        );
        assert_eq!(e.code(), crate::codes::WRONG_STATE);
    }
    assert_eq!(
        refused(&job, ended, claim(A2, R1, ended)).to_string(),
        "runner 10 claimed this job as attempt 1 and did not start it: other runners may take it \
         now, this one again from 1000301000 (Unix ms), after a cool-down"
    );
    // Another runner could have had it at once.
    ok(&job, ended, claim(A2, R2, ended));
    // Once the cool-down is over, the same runner gets it, and may run it.
    let t = ok(&job, until, claim(A2, R1, until));
    assert!(t.job.reason.contains("(try 1 of 3)"), "{}", t.job.reason);
    // Its second unstarted end (the accept window closed) doubles the cool-down.
    let accept_by = t.job.attempts[1].accept_by_ms;
    let job = ok(&t.job, accept_by, Event::Tick).job;
    assert_eq!(job.state, JobState::Queued);
    assert!(
        job.reason.contains("10 again after a 600 s cool-down"),
        "{}",
        job.reason
    );
    assert!(matches!(
        refused(&job, accept_by + 10 * MIN - 1, claim(A3, R1, accept_by + 10 * MIN - 1)),
        Refusal::RunnerDidNotStart { runner: R1, attempt: A2, until_ms } if until_ms == accept_by + 10 * MIN
    ));
    let job = ok(
        &job,
        accept_by + 10 * MIN,
        claim(A3, R1, accept_by + 10 * MIN),
    )
    .job;
    // A start clears nothing, but a started attempt is a try, not an unstarted end.
    let job = ok(&job, accept_by + 10 * MIN + S, Event::Start { attempt: A3 }).job;
    let job = ok(&job, accept_by + 10 * MIN + 2 * S, abort(A3, "disk full")).job;
    let at = job.retry_not_before_ms.unwrap();
    let job = running(&job, AttemptId(8), R1, at);
    assert_eq!(job.state, JobState::Running);
    assert_eq!((job.tries(), job.unstarted()), (2, 2));
}

#[test]
fn the_cool_down_doubles_up_to_its_cap() {
    let mins: Vec<u64> = (1..=8)
        .map(|n| SETTINGS.cooldown_after(n) / 60_000)
        .collect();
    assert_eq!(mins, [5, 10, 20, 40, 60, 60, 60, 60]);
    assert_eq!(SETTINGS.cooldown_after(u32::MAX), 3600 * S);
    let none = Settings {
        unstarted_cooldown_ms: 0,
        ..SETTINGS
    };
    assert_eq!(none.cooldown_after(3), 0);
}

#[test]
fn one_runner_that_never_starts_errors_the_job_only_after_hours() {
    // The cap counts every unstarted attempt, whoever's; one runner gets there only by
    // waiting out each cool-down (5 + 10 + 20 + 40 + 5 × 60 min between its ten ends).
    let mut job = JobSnapshot::submitted(JobPolicy::DEFAULT, T0).job;
    let mut now = T0;
    for n in 1..=SETTINGS.max_unstarted as u64 {
        let id = AttemptId(n);
        if n > 1 {
            let e = refused(&job, now, claim(id, R1, now));
            let Refusal::RunnerDidNotStart { until_ms, .. } = e else {
                panic!("{e}")
            };
            now = until_ms;
        }
        job = ok(&job, now, claim(id, R1, now)).job;
        now += S;
        job = ok(&job, now, abort(id, "never meant to")).job;
    }
    assert_eq!(job.state, JobState::Errored);
    assert!(now - T0 >= 375 * 60 * S, "{} min", (now - T0) / 60_000);
    assert_eq!(
        job.reason,
        "runners kept not starting it: 10 attempts (of 1 runners) were claimed and never \
         started; the last, attempt 10: runner aborted: never meant to"
    );
}

#[test]
fn past_the_unstarted_cap_the_job_is_errored_saying_why() {
    // Errored when the job's unstarted attempts reach the cap, whoever's.
    let mut job = submitted();
    let mut now = T0;
    for n in 1..=SETTINGS.max_unstarted as u64 {
        // Two runners take turns, each waiting out its cool-down.
        let runner = RunnerId(100 + n % 2);
        if let Err(Refusal::RunnerDidNotStart { until_ms, .. }) =
            step(&job, &SETTINGS, now, &claim(AttemptId(n), runner, now))
        {
            now = until_ms;
        }
        job = ok(&job, now, claim(AttemptId(n), runner, now)).job;
        now = job.attempts.last().unwrap().accept_by_ms;
        let t = ok(&job, now, Event::Tick);
        job = t.job;
        if n < SETTINGS.max_unstarted as u64 {
            assert_eq!(job.state, JobState::Queued);
        } else {
            assert_eq!(
                semantic(&t.effects),
                [
                    Effect::AttemptEnded(AttemptId(n), AttemptState::Expired),
                    Effect::JobEnded(JobState::Errored)
                ]
            );
        }
    }
    assert_eq!(job.state, JobState::Errored);
    assert_eq!(
        job.reason,
        "runners kept not starting it: 10 attempts (of 2 runners) were claimed and never \
         started; the last, attempt 10: not started within the accept window"
    );
    assert_eq!(job.attempts.len(), 10);
    // The cap is a setting.
    let strict = Settings {
        max_unstarted: 1,
        ..SETTINGS
    };
    let leased = ok(&submitted(), T0, claim(A1, R1, T0)).job;
    let t = step(&leased, &strict, T0 + S, &abort(A1, "no room")).unwrap();
    assert_eq!(t.job.state, JobState::Errored);
    assert_eq!(t.job.invariant_violation(&strict), None);
}

#[test]
fn the_invariant_bounds_tries_and_unstarted_attempts_apart() {
    let job = running(&submitted(), A1, R1, T0);
    let mut too_many = job.clone();
    for n in 0..4 {
        let mut a = job.attempts[0].clone();
        a.id = AttemptId(50 + n);
        a.state = AttemptState::Aborted;
        a.ended_ms = Some(T0 + 2 * S);
        too_many.attempts.insert(0, a);
    }
    assert_eq!(
        too_many.invariant_violation(&SETTINGS).as_deref(),
        Some("4 failed tries of 3")
    );
    let mut unstarted = submitted();
    for n in 0..11 {
        let mut a = job.attempts[0].clone();
        a.id = AttemptId(60 + n);
        a.runner = RunnerId(60 + n);
        a.state = AttemptState::Expired;
        a.started_ms = None;
        a.ended_ms = Some(T0 + 2 * S);
        unstarted.attempts.push(a);
    }
    assert_eq!(
        unstarted.invariant_violation(&SETTINGS).as_deref(),
        Some("11 unstarted attempts of 10")
    );
    // A runner that did not start the job has no later attempt of it within its cool-down.
    let mut again = submitted();
    again.attempts = unstarted.attempts[..2].to_vec();
    again.attempts[1].runner = again.attempts[0].runner;
    again.attempts[1].claimed_ms = T0 + 2 * S + 5 * 60 * S - 1;
    assert_eq!(
        again.invariant_violation(&SETTINGS).as_deref(),
        Some(
            "runner 60 claimed the job again at 1000301999 after not starting attempt 60, \
             within its cool-down (until 1000302000)"
        )
    );
    again.attempts[1].claimed_ms += 1;
    assert_eq!(again.invariant_violation(&SETTINGS), None);
    again.attempts[1].claimed_ms -= 1;
    again.attempts[0].started_ms = Some(T0 + S);
    assert_eq!(again.invariant_violation(&SETTINGS), None);
}
