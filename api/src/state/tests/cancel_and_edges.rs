//! Cancels, expiry, lease caps, refusals, back-off and views.

use super::*;

#[test]
fn canceling_a_queued_job_ends_it() {
    let t = ok(&submitted(), T0 + S, Event::Cancel);
    assert_eq!(semantic(&t.effects), [Effect::JobEnded(JobState::Canceled)]);
    assert_eq!(
        (t.job.state, t.job.reason.as_str()),
        (JobState::Canceled, "canceled while queued")
    );
    assert_eq!(
        refused(&t.job, T0 + 2 * S, Event::Cancel),
        Refusal::JobEnded(JobState::Canceled)
    );
    // Also while it waits out a back-off.
    let job = running(&submitted(), A1, R1, T0);
    let job = ok(&job, T0 + 5 * S, abort(A1, "oops")).job;
    let t = ok(&job, T0 + 6 * S, Event::Cancel);
    assert_eq!(
        (t.job.state, t.job.retry_not_before_ms),
        (JobState::Canceled, None)
    );
}

#[test]
fn canceling_a_running_job_waits_for_its_runner() {
    let job = running(&submitted(), A1, R1, T0);
    let t = ok(&job, T0 + 10 * S, Event::Cancel);
    assert_eq!(semantic(&t.effects), [Effect::CancelRunner(A1)]);
    let job = t.job;
    assert_eq!(job.state, JobState::Running);
    assert!(job.cancel_requested && job.attempts[0].cancel_requested);
    assert_eq!(
        refused(&job, T0 + 11 * S, Event::Cancel),
        Refusal::AlreadyCanceling
    );
    // The heartbeat still extends the lease; the server answers it with cancel = true.
    let job = ok(&job, T0 + 12 * S, heartbeat(A1)).job;

    // The runner stops and reports, or aborts, or goes silent: the job is canceled each way.
    let reported = ok(
        &job,
        T0 + 13 * S,
        report(A1, ReportStatus::Success, Some(0)),
    );
    assert_eq!(reported.job.state, JobState::Canceled);
    assert_eq!(reported.job.result_attempt, None);
    assert_eq!(reported.job.attempts[0].state, AttemptState::Canceled);
    assert!(!reported.effects.contains(&Effect::TakeResult(A1)));
    assert_eq!(
        semantic(&reported.effects),
        [
            Effect::AttemptEnded(A1, AttemptState::Canceled),
            Effect::JobEnded(JobState::Canceled)
        ]
    );
    let aborted = ok(&job, T0 + 13 * S, abort(A1, "stopped"));
    assert_eq!(aborted.job.state, JobState::Canceled);
    assert_eq!(
        aborted.job.attempts[0].why,
        "canceled; runner aborted: stopped"
    );
    let lease_end = job.attempts[0].lease_until_ms;
    let lapsed = ok(&job, lease_end, Event::Tick);
    assert_eq!(lapsed.job.state, JobState::Canceled);
    assert_eq!(lapsed.job.attempts[0].state, AttemptState::Canceled);
    assert!(
        !lapsed
            .effects
            .iter()
            .any(|e| matches!(e, Effect::RequeueAt(_)))
    );
}

#[test]
fn canceling_a_claimed_but_unstarted_job_ends_it_at_once() {
    let job = ok(&submitted(), T0, claim(A1, R1, T0)).job;
    let t = ok(&job, T0 + S, Event::Cancel);
    assert_eq!(
        semantic(&t.effects),
        [
            Effect::AttemptEnded(A1, AttemptState::Canceled),
            Effect::JobEnded(JobState::Canceled)
        ]
    );
    let e = refused(&t.job, T0 + 2 * S, Event::Start { attempt: A1 });
    assert_eq!(e.code(), crate::codes::LEASE_LOST);
}

#[test]
fn an_unschedulable_job_expires_at_its_ttl_with_its_reason() {
    let job = submitted();
    let job = ok(
        &job,
        T0 + S,
        Event::Unschedulable {
            why: "no runner offers image i9".into(),
        },
    )
    .job;
    assert_eq!(job.reason, "no runner offers image i9");
    let same = ok(
        &job,
        T0 + 2 * S,
        Event::Unschedulable {
            why: "no runner offers image i9".into(),
        },
    );
    assert_eq!(same.effects, [], "an unchanged reason is not stored again");
    let t = ok(&job, job.expires_at_ms - 1, Event::Tick);
    assert_eq!(t.effects, []);
    assert_eq!(
        refused(&job, job.expires_at_ms, claim(A1, R1, job.expires_at_ms)),
        Refusal::TtlPassed
    );
    let t = ok(&job, job.expires_at_ms, Event::Tick);
    assert_eq!(semantic(&t.effects), [Effect::JobEnded(JobState::Expired)]);
    assert_eq!(t.job.state, JobState::Expired);
    assert_eq!(
        t.job.reason,
        "no runner took it within its time-to-live (3600 s): no runner offers image i9"
    );
    // A tick on an ended job changes nothing.
    assert_eq!(ok(&t.job, job.expires_at_ms + S, Event::Tick).effects, []);
}

#[test]
fn heartbeats_cannot_hold_a_lease_past_start_plus_timeout_plus_margin() {
    let job = running(&submitted(), A1, R1, T0);
    let started = T0 + S;
    let cap = started + POLICY.timeout_ms + SETTINGS.lease_margin_ms;
    let mut job = job;
    let mut now = started;
    while now < cap {
        now += 30 * S;
        match step(&job, &SETTINGS, now, &heartbeat(A1)) {
            Ok(t) => job = t.job,
            Err(e) => {
                assert_eq!(e, Refusal::LeaseLapsed(A1));
                break;
            }
        }
        assert!(job.attempts[0].lease_until_ms <= cap);
    }
    assert_eq!(job.attempts[0].lease_until_ms, cap);
    let t = ok(&job, cap, Event::Tick);
    assert_eq!(
        t.job.attempts[0].why,
        "lease lapsed at its cap (start + time limit + margin)"
    );
}

#[test]
fn events_that_do_not_apply_are_refused_and_change_nothing() {
    let queued = submitted();
    let leased = ok(&queued, T0, claim(A1, R1, T0)).job;
    let running_job = running(&queued, A1, R1, T0);
    let done = ok(
        &running_job,
        T0 + 5 * S,
        report(A1, ReportStatus::Success, Some(0)),
    )
    .job;
    let lease_end = running_job.attempts[0].lease_until_ms;
    let bad_report = Event::Report {
        attempt: A1,
        report: ReportRequest {
            status: ReportStatus::Success,
            exit_code: None,
            job_exit_status: Some(3),
            reason: String::new(),
            times: PhaseTimes::default(),
            output_sha256: None,
            output_tree_sha256: None,
            statement: None,
        },
    };
    let cases: Vec<(&JobSnapshot, u64, Event, &str)> = vec![
        (&queued, T0, Event::Start { attempt: A1 }, "not-found"),
        (&queued, T0, heartbeat(A1), "not-found"),
        (
            &queued,
            T0,
            report(A1, ReportStatus::Success, Some(0)),
            "not-found",
        ),
        (&queued, T0, claim(A1, R1, T0 - 100 * S), "wrong-state"),
        (&leased, T0, claim(A2, R2, T0), "wrong-state"),
        (&leased, T0 + S, heartbeat(A1), "wrong-state"),
        (
            &leased,
            T0 + S,
            Event::UploadBegun { attempt: A1 },
            "wrong-state",
        ),
        (
            &leased,
            T0 + S,
            report(A1, ReportStatus::Success, Some(0)),
            "wrong-state",
        ),
        (
            &leased,
            T0 + S,
            Event::Unschedulable { why: "x".into() },
            "wrong-state",
        ),
        (
            &running_job,
            T0 + 2 * S,
            Event::Start { attempt: A1 },
            "wrong-state",
        ),
        (&running_job, lease_end, heartbeat(A1), "lease-lost"),
        (&running_job, lease_end, abort(A1, "late"), "lease-lost"),
        (&running_job, T0 + 2 * S, abort(A1, "  "), "invalid-params"),
        (&running_job, T0 + 2 * S, bad_report, "invalid-params"),
        (&running_job, T0 + 2 * S, heartbeat(A2), "not-found"),
        (
            &done,
            T0 + 6 * S,
            report(A1, ReportStatus::Success, Some(0)),
            "already-reported",
        ),
        (&done, T0 + 6 * S, heartbeat(A1), "lease-lost"),
        (&done, T0 + 6 * S, Event::Cancel, "job-finished"),
        (&done, T0 + 6 * S, claim(A2, R1, T0 + 6 * S), "job-finished"),
        (
            &done,
            T0 + 6 * S,
            Event::Unschedulable { why: "x".into() },
            "job-finished",
        ),
    ];
    for (job, now, event, code) in cases {
        let e = refused(job, now, event.clone());
        assert_eq!(e.code(), code, "{event:?}: {e}");
        let body = ApiError::from(&e);
        assert_eq!(body.error, code);
        assert!(!body.message.is_empty());
    }
    // A claim that reuses an attempt id of this job.
    let requeued = ok(&running_job, lease_end, Event::Tick).job;
    let at = requeued.retry_not_before_ms.unwrap();
    assert_eq!(
        refused(&requeued, at, claim(A1, R2, at)),
        Refusal::DuplicateAttempt(A1)
    );
}

#[test]
fn back_off_grows_by_the_factor_up_to_its_cap() {
    let waits: Vec<u64> = (1..=6).map(|n| SETTINGS.backoff_ms(n) / S).collect();
    assert_eq!(waits, [10, 30, 90, 270, 810, 900]);
    assert_eq!(SETTINGS.backoff_ms(u32::MAX), SETTINGS.backoff_cap_ms);
    assert_eq!(SETTINGS.backoff_ms(0), SETTINGS.backoff_base_ms);
}

#[test]
fn a_policy_of_no_tries_still_gets_one() {
    let job = JobSnapshot::submitted(
        JobPolicy {
            max_tries: 0,
            ..POLICY
        },
        T0,
    )
    .job;
    assert_eq!(job.policy.max_tries, 1);
    let job = running(&job, A1, R1, T0);
    let job = ok(&job, T0 + 2 * S, abort(A1, "no")).job;
    assert_eq!(job.state, JobState::Errored);
}

#[test]
fn snapshots_become_the_documented_views() {
    let job = running(&submitted(), A1, R1, T0);
    let job = ok(&job, T0 + 9 * S, report(A1, ReportStatus::Failed, Some(2))).job;
    let facts = JobFacts {
        id: crate::types::JobId(7),
        owner: crate::types::UserId(1),
        name: "hello_i0.tar.xz".into(),
        image: "i0".into(),
        image_digest: None,
        sha256: "0".repeat(64),
        size: 64 << 20,
        limits: JobLimits::DEFAULT,
        priority: 0,
        private: false,
    };
    let view = job.view(facts, |_| AttemptBlobs {
        output_sha256: Some("1".repeat(64)),
        output_size: Some(10),
        console_size: 5,
        output_index: None,
        signed: false,
        runner_revoked: false,
    });
    assert_eq!(
        (view.state, view.result_attempt),
        (JobState::Failed, Some(A1))
    );
    let a = &view.attempts[0];
    assert_eq!(
        (a.status, a.job_exit_status, a.console_size),
        (Some(ReportStatus::Failed), Some(2), 5)
    );
    assert_eq!(a.why, "job failed with exit status 2");
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["attempts"][0]["state"], "reported");
    assert_eq!(json["state"], "failed");
}
