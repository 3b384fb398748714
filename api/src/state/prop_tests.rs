//! Random event sequences (a small deterministic PRNG: the same failures every run) against the
//! invariants every snapshot must keep, whatever happens in whatever order.

use super::*;
use crate::types::{PhaseTimes, RanAlone, ReportStatus, UserId};

/// splitmix64: tiny, good enough to shuffle events, and needs no dependency.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

const STATUSES: [ReportStatus; 10] = [
    ReportStatus::Success,
    ReportStatus::Failed,
    ReportStatus::InvalidJob,
    ReportStatus::TimedOut,
    ReportStatus::GuestFailed,
    ReportStatus::Interrupted,
    ReportStatus::UnknownImage,
    ReportStatus::BackendFailed,
    ReportStatus::VmmFault,
    ReportStatus::CrashedRunner,
];

/// An event, biased towards ones that apply (so sequences get deep) but with plenty that do not.
fn random_event(rng: &mut Prng, job: &JobSnapshot, settings: &Settings, now: u64) -> Event {
    // Mostly an attempt of this job (often the latest), sometimes one it does not have.
    let attempt = match (rng.below(10), job.attempts.last()) {
        (0, _) | (_, None) => AttemptId(rng.below(8)),
        (1..=2, Some(_)) => job.attempts[rng.below(job.attempts.len() as u64) as usize].id,
        (_, Some(last)) => last.id,
    };
    match rng.below(20) {
        0..=2 => {
            let (lease_until_ms, accept_by_ms) = settings.claim_deadlines(now);
            // Mostly a runner that had the job before (one that did not start it is refused
            // during its cool-down, taken after it), sometimes a new one.
            let runner = match rng.below(4) {
                0 => 3 + rng.below(12),
                _ => rng.below(3),
            };
            Event::Claim {
                // Mostly new ids, sometimes a reused one.
                attempt: AttemptId(rng.below(8)),
                runner: RunnerId(runner),
                // A few owners (a runner has one), so that replicas meet the distinct-owner
                // rule and break it.
                owner: UserId(runner % 4),
                // Two classes: replicas meet the one-class rule and break it.
                class: if runner % 5 == 0 {
                    "vmm/hardware"
                } else {
                    "qemu/none"
                }
                .into(),
                lease_until_ms,
                accept_by_ms,
                // Sometimes a runner the server lets run the job alone, audited or not.
                alone: (rng.below(3) == 0).then(|| Alone {
                    audit: rng.below(2) == 0,
                    terms: RanAlone {
                        agreed_in_row: 5 + rng.below(5),
                        after: 5,
                        audit_percent: 10,
                    },
                }),
            }
        }
        3..=4 => Event::Start { attempt },
        5..=7 => Event::Heartbeat {
            attempt,
            progress: HeartbeatRequest {
                phase: rng.pick(&[
                    Phase::Downloading,
                    Phase::Booting,
                    Phase::Running,
                    Phase::Uploading,
                ]),
                console_bytes: rng.below(1 << 20),
            },
        },
        8 => Event::UploadBegun { attempt },
        9..=10 => {
            let status = rng.pick(&STATUSES);
            let job_exit_status = match status {
                ReportStatus::Success => Some(0),
                ReportStatus::Failed => Some(1 + rng.below(255) as u16),
                _ => None,
            };
            Event::Report {
                attempt,
                report: ReportRequest {
                    status,
                    exit_code: None,
                    job_exit_status,
                    reason: "r".into(),
                    times: PhaseTimes::default(),
                    // One of two outputs, or none: replicas agree and disagree.
                    output_sha256: match rng.below(3) {
                        0 => None,
                        n => Some(format!("{n:x}").repeat(64)),
                    },
                    output_tree_sha256: None,
                    statement: None,
                },
            }
        }
        19 => Event::Indexed {
            attempt,
            tree: match rng.below(4) {
                0 => OutputTree::Unreadable,
                n => OutputTree::Digest(format!("{}", n % 3).repeat(64)),
            },
        },
        11 => Event::Abort {
            attempt,
            reason: if rng.below(8) == 0 {
                String::new()
            } else {
                "infra".into()
            },
        },
        12..=16 => Event::Tick,
        17 => Event::Cancel,
        _ if rng.below(4) == 0 => Event::RunnerRevoked {
            runner: RunnerId(rng.below(4)),
        },
        _ => Event::Unschedulable {
            why: format!("reason {}", rng.below(3)),
        },
    }
}

/// How far the clock moves before an event: usually a little, sometimes past a lease or a
/// back-off, rarely past the time-to-live.
fn random_gap(rng: &mut Prng) -> u64 {
    match rng.below(20) {
        0..=11 => rng.below(5_000),
        12..=17 => rng.below(120_000),
        18 => rng.below(1_000_000),
        _ => rng.below(5_000_000),
    }
}

/// What must hold between two consecutive snapshots and the effects of the step between them.
fn check_step(
    before: &JobSnapshot,
    event: &Event,
    t: &Transition,
    settings: &Settings,
    now: u64,
) -> Result<(), String> {
    let after = &t.job;
    if let Some(broken) = after.invariant_violation(settings) {
        return Err(broken);
    }
    if before.state.is_terminal()
        && (after.state, after.ended_ms) != (before.state, before.ended_ms)
    {
        return Err(format!("terminal {} became {}", before.state, after.state));
    }
    if before.result_attempt.is_some() && after.result_attempt != before.result_attempt {
        return Err("the result changed".into());
    }
    if after.attempts.len() < before.attempts.len() {
        return Err("an attempt vanished".into());
    }
    for (b, a) in before.attempts.iter().zip(&after.attempts) {
        if b.id != a.id || b.runner != a.runner || b.claimed_ms != a.claimed_ms {
            return Err(format!("attempt {} was rewritten", b.id));
        }
        // An ended attempt only ever gains a late report, and its output's index.
        if !b.state.is_live() {
            if b.output_tree.is_some() && a.output_tree != b.output_tree {
                return Err(format!("attempt {}'s index changed", b.id));
            }
            if b.voided && !a.voided {
                return Err(format!("attempt {}'s vote came back", b.id));
            }
            let only_late = AttemptSnapshot {
                late: b.late,
                report: b.report.clone(),
                output_tree: b.output_tree.clone(),
                voided: b.voided,
                ..a.clone()
            };
            let gained_late = b.report.is_none() && a.report.is_some() && a.late;
            let same_report = b.report == a.report && b.late == a.late;
            if &only_late != b || !(same_report || gained_late) {
                return Err(format!("ended attempt {} changed", b.id));
            }
        }
        if let Some(started) = a.started_ms {
            let cap = started + after.policy.timeout_ms + settings.lease_margin_ms;
            if a.lease_until_ms > cap.max(b.lease_until_ms) {
                return Err(format!("attempt {} leased past its cap", a.id));
            }
        }
    }
    let ended = !before.state.is_terminal() && after.state.is_terminal();
    // Who may end a job how: only a job outcome makes it succeeded or failed (a runner's
    // failure never does), only a cancel cancels it, only used-up tries error it.
    if ended {
        let outcome = match event {
            Event::Report { report, .. } => Some(report.status),
            _ => None,
        };
        // An index completes a vote: it may end a replicated job as the vote says.
        let indexed = matches!(event, Event::Indexed { .. });
        let agreed = after
            .result_attempt
            .and_then(|id| after.attempt(id))
            .and_then(|a| a.report.as_ref())
            .map(|r| r.status);
        let allowed = match after.state {
            JobState::Succeeded => {
                outcome == Some(ReportStatus::Success)
                    || (indexed && agreed == Some(ReportStatus::Success))
            }
            JobState::Failed => {
                outcome.is_some_and(|s| s.is_job_outcome() && s != ReportStatus::Success)
                    || (indexed && agreed.is_some_and(|s| s != ReportStatus::Success))
            }
            JobState::Canceled => before.cancel_requested || *event == Event::Cancel,
            // The tries ran out, or the unstarted attempts (whoever's) reached their cap.
            JobState::Errored => {
                after.failed_tries() == after.policy.try_cap()
                    || after.unstarted() == settings.unstarted_cap()
            }
            JobState::Expired => *event == Event::Tick && before.wanted() > 0,
            // Only votes that cannot reach a quorum.
            JobState::Inconclusive => before.policy.quorum > 1 && (outcome.is_some() || indexed),
            JobState::Queued | JobState::Running => false,
        };
        if !allowed || (before.cancel_requested && after.state != JobState::Canceled) {
            return Err(format!(
                "{event:?} ended a {} job {}",
                before.state, after.state
            ));
        }
    }
    // An attempt that ended before it started costs no try and no back-off.
    let ended_unstarted = after.attempts.iter().any(|a| {
        a.started_ms.is_none()
            && !a.state.is_live()
            && before.attempt(a.id).is_some_and(|b| b.state.is_live())
    });
    // (A replicated job's tick may end a started replica in the same step: that one costs.)
    let ended_started = after.attempts.iter().any(|a| {
        a.started_ms.is_some()
            && !a.state.is_live()
            && before.attempt(a.id).is_some_and(|b| b.state.is_live())
    });
    let new_backoff = after.retry_not_before_ms.is_some()
        && after.retry_not_before_ms != before.retry_not_before_ms;
    if ended_unstarted
        && !ended_started
        && after.state == JobState::Queued
        && (new_backoff || after.failed_tries() != before.failed_tries())
    {
        return Err("an unstarted attempt cost the job a try or a back-off".into());
    }
    // A runner that did not start the job gets it again only after its cool-down.
    if let Event::Claim { runner, .. } = event
        && let Some(c) = before.unstarted_cooldown(settings, |r| r == *runner)
        && now < c.until_ms
    {
        return Err(format!(
            "runner {runner} got the job again within its cool-down until {}",
            c.until_ms
        ));
    }
    // A claim takes the job alone only when nothing held it or voted on it; a run alone that
    // ends the job gains no one standing.
    if after.attempts.len() > before.attempts.len()
        && after.attempts.last().is_some_and(|a| a.alone.is_some())
    {
        let t = before.tally();
        if t.votes + t.pending + t.live > 0 || !before.policy.adaptive {
            return Err("a claim took the job alone beside other replicas".into());
        }
    }
    if after.ran_alone().is_some()
        && t.effects
            .iter()
            .any(|e| matches!(e, Effect::Standing { .. }))
    {
        return Err("a run alone changed standing".into());
    }
    if before.cancel_requested && !ended && after.state != JobState::Running {
        return Err("a canceling job went back to the queue".into());
    }
    let job_ended: Vec<_> = t
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::JobEnded(_)))
        .cloned()
        .collect();
    let expected = if ended {
        vec![Effect::JobEnded(after.state)]
    } else {
        vec![]
    };
    if job_ended != expected {
        return Err(format!(
            "JobEnded effects {job_ended:?} for {} → {}",
            before.state, after.state
        ));
    }
    let took = t
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::TakeResult(_)))
        .count();
    if took != usize::from(before.result_attempt != after.result_attempt) {
        return Err("TakeResult without a new result, or the reverse".into());
    }
    for e in &t.effects {
        match e {
            Effect::RequeueAt(at)
                if after.state.is_terminal()
                    || after.retry_not_before_ms != Some(*at)
                    || *at <= now =>
            {
                return Err(format!("RequeueAt({at}) for {after:?}"));
            }
            Effect::TakeResult(id) => {
                // Only an attempt that reported within its lease gives the result: live and
                // in time now, or reported so before (a vote whose index came since).
                let in_time = before.attempt(*id).is_some_and(|b| {
                    let now_in_time =
                        b.state.is_live() && now < b.lease_until_ms && b.started_ms.is_some();
                    let reported = b.state == AttemptState::Reported && !b.late;
                    now_in_time || (reported && matches!(event, Event::Indexed { .. }))
                });
                if !in_time {
                    return Err(format!("TakeResult({id}) of an attempt past its lease"));
                }
            }
            // Only a lapsed attempt that had started, within its late window from its end.
            Effect::KeepLate(id)
                if !after.attempt(*id).is_some_and(|a| {
                    a.late
                        && a.state == AttemptState::Expired
                        && a.started_ms.is_some()
                        && now < a.ended_ms.unwrap_or(0) + settings.late_window_ms()
                }) =>
            {
                return Err(format!("KeepLate({id}) of an attempt not late or too late"));
            }
            Effect::CancelRunner(id)
                if !after
                    .attempt(*id)
                    .is_some_and(|a| a.cancel_requested && a.state.is_live()) =>
            {
                return Err(format!("CancelRunner({id}) of an attempt not canceling"));
            }
            _ => {}
        }
    }
    let stores: Vec<_> = t
        .effects
        .iter()
        .take_while(|e| matches!(e, Effect::StoreJob | Effect::StoreAttempt(_)))
        .collect();
    let all_stores = t
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::StoreJob | Effect::StoreAttempt(_)))
        .count();
    if stores.len() != all_stores {
        return Err("a store effect after another kind".into());
    }
    if (all_stores > 0) != (before != after) {
        return Err("store effects disagree with the change".into());
    }
    Ok(())
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    let mut rng = Prng(0x636f_6e73_7472_7569);
    let (mut taken, mut refusals, mut ended) = (0u32, 0u32, 0u32);
    let (mut not_started, mut barred, mut again) = (0u32, 0u32, 0u32);
    let (mut on_standing, mut alone) = (0u32, 0u32);
    for sequence in 0..3000 {
        // Short timings half of the time, so that caps and back-offs are reached often.
        let settings = if rng.below(2) == 0 {
            Settings::DEFAULT
        } else {
            Settings {
                lease_ms: 1 + rng.below(120_000),
                accept_window_ms: 1 + rng.below(60_000),
                lease_margin_ms: rng.below(120_000),
                backoff_base_ms: rng.below(60_000),
                backoff_factor: rng.below(5) as u32,
                backoff_cap_ms: rng.below(600_000),
                max_unstarted: rng.below(5) as u32,
                unstarted_cooldown_ms: rng.below(120_000),
                unstarted_cooldown_cap_ms: rng.below(600_000),
            }
        };
        let replicas = 1 + rng.below(3) as u32;
        let policy = JobPolicy {
            max_tries: 1 + rng.below(4) as u32,
            ttl_ms: 1 + rng.below(3_000_000),
            timeout_ms: 1 + rng.below(600_000),
            replicas,
            quorum: 1 + rng.below(u64::from(replicas)) as u32,
            max_votes: rng.below(5) as u32,
            owner: UserId(rng.below(5)),
            own_runners: rng.below(2) == 0,
            any_class: rng.below(2) == 0,
            adaptive: rng.below(2) == 0,
        };
        let mut now = 1_000_000 + rng.below(1_000_000);
        let mut job = JobSnapshot::submitted(policy, now).job;
        let mut history = Vec::new();
        for _ in 0..80 {
            now += random_gap(&mut rng);
            let event = random_event(&mut rng, &job, &settings, now);
            history.push((now, event.clone()));
            let before = job.clone();
            match step(&job, &settings, now, &event) {
                Ok(t) => {
                    taken += 1;
                    // A runner back after the cool-down of its unstarted end(s).
                    if let Event::Claim { runner, .. } = &event {
                        let had = before.unstarted_cooldown(&settings, |r| r == *runner);
                        again += u32::from(had.is_some());
                    }
                    // Pure: the same input gives the same output.
                    assert_eq!(step(&before, &settings, now, &event).as_ref(), Ok(&t));
                    if let Err(broken) = check_step(&before, &event, &t, &settings, now) {
                        panic!(
                            "sequence {sequence}: {broken}\nhistory: {history:#?}\nbefore: {before:#?}\nafter: {:#?}",
                            t.job
                        );
                    }
                    job = t.job;
                }
                Err(refusal) => {
                    refusals += 1;
                    if let Refusal::RunnerDidNotStart { until_ms, .. } = refusal {
                        barred += 1;
                        assert!(
                            now < until_ms,
                            "sequence {sequence}: refused after its cool-down"
                        );
                    }
                    assert_eq!(
                        job, before,
                        "sequence {sequence}: {refusal} changed the snapshot"
                    );
                    assert!(crate::codes::http_status(refusal.code()).is_some());
                }
            }
        }
        ended += u32::from(job.state.is_terminal());
        on_standing += u32::from(job.ran_alone().is_some());
        alone += u32::from(job.attempts.iter().any(|a| a.alone.is_some()));
        not_started +=
            u32::from(job.state == JobState::Errored && job.tries() < job.policy.max_tries);
    }
    // The unstarted cap is reached, runners that did not start a job are refused it during
    // their cool-down, and claim it again after it.
    assert!(
        not_started > 20 && barred > 50 && again > 50,
        "errored by unstarted ends {not_started}, runners refused {barred}, back after a \
         cool-down {again}"
    );
    // The generator reaches both sides, and most jobs end.
    assert!(
        taken > 50_000 && refusals > 20_000,
        "taken {taken}, refused {refusals}"
    );
    assert!(ended > 2_000, "only {ended} of 3000 jobs ended");
    // Jobs run alone, and some end on their runner's standing (random sequences seldom get
    // two votes in: audits have their own tests, tests/adaptive.rs).
    assert!(
        alone > 100 && on_standing > 0,
        "jobs run alone {alone}, ended on standing {on_standing}"
    );
}

#[test]
fn every_end_state_is_reached_by_random_sequences() {
    let settings = Settings::DEFAULT;
    let mut rng = Prng(7);
    let mut seen = std::collections::HashSet::new();
    let mut attempt_states = std::collections::HashSet::new();
    for n in 0..3000 {
        // A third of them replicated (two replicas, both must agree); random sequences seldom
        // get two votes in, so inconclusive has its own tests (tests/replicas.rs).
        let replicas = if n % 3 == 0 { 2 } else { 1 };
        let policy = JobPolicy {
            max_tries: 2,
            ttl_ms: 600_000,
            timeout_ms: 60_000,
            replicas,
            quorum: replicas,
            // No extra replica after a disagreement: inconclusive comes quickly.
            max_votes: replicas,
            ..JobPolicy::DEFAULT
        };
        let mut now = 1_000_000;
        let mut job = JobSnapshot::submitted(policy, now).job;
        for _ in 0..60 {
            now += random_gap(&mut rng);
            let event = random_event(&mut rng, &job, &settings, now);
            if let Ok(t) = step(&job, &settings, now, &event) {
                job = t.job;
            }
            attempt_states.extend(job.attempts.iter().map(|a| (a.state, a.late)));
        }
        seen.insert(job.state);
    }
    for state in [
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
        JobState::Errored,
        JobState::Expired,
    ] {
        assert!(seen.contains(&state), "never reached {state}: {seen:?}");
    }
    for state in [
        AttemptState::Reported,
        AttemptState::Expired,
        AttemptState::Aborted,
        AttemptState::Canceled,
    ] {
        assert!(
            attempt_states.contains(&(state, false)),
            "never reached attempt {state}"
        );
    }
    assert!(
        attempt_states.contains(&(AttemptState::Expired, true)),
        "never a late report"
    );
}
