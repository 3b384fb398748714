//! A job's attempts as a timeline: one row per attempt, its phases as bars on a shared time
//! axis (the job's submission to its end, or now), drawn by the job page as a small SVG with no
//! script. The phases are what the records and the runner's report say: queued (the job's
//! submission, or the previous attempt's end, to the claim), claimed (to the start), then the
//! runner's own phase times (download, boot, run, upload) and, while the attempt runs, its
//! current phase up to now.

use construir_api::types::{AttemptView, Phase};

/// One bar: where it starts and how long it is, in per mille of the axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// `queued`, `claimed`, `download`, `boot`, `run`, `upload` (also its CSS class).
    pub phase: &'static str,
    pub x: f64,
    pub width: f64,
    pub ms: u64,
}

/// One attempt's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Where the row is drawn (SVG units from the top).
    pub y: usize,
    pub attempt: u64,
    pub runner: u64,
    pub bars: Vec<Bar>,
}

/// The rows of a job created at `created_ms`, seen at `now_ms`.
pub fn rows(
    created_ms: u64,
    ended_ms: Option<u64>,
    attempts: &[AttemptView],
    now_ms: u64,
) -> Vec<Row> {
    let end = ended_ms
        .unwrap_or(now_ms)
        .max(
            attempts
                .iter()
                .filter_map(|a| a.ended_ms)
                .max()
                .unwrap_or(0),
        )
        .max(created_ms + 1);
    let axis = (end - created_ms) as f64;
    let at = |t: u64| (t.clamp(created_ms, end) - created_ms) as f64 * 1000.0 / axis;
    let mut out = Vec::new();
    let mut ready = created_ms;
    for a in attempts {
        let mut bars = Vec::new();
        let mut push = |phase: &'static str, from: u64, to: u64| {
            if to > from {
                bars.push(Bar {
                    phase,
                    x: at(from),
                    width: (at(to) - at(from)).max(2.0),
                    ms: to - from,
                });
            }
        };
        push("queued", ready.min(a.claimed_ms), a.claimed_ms);
        let stop = a.ended_ms.unwrap_or(now_ms);
        match a.started_ms {
            None => push("claimed", a.claimed_ms, stop),
            Some(started) => {
                push("claimed", a.claimed_ms, started);
                let mut t = started;
                let times = a.times.unwrap_or_default();
                for (phase, ms) in [
                    ("download", times.download_ms),
                    ("boot", times.boot_ms),
                    ("run", times.run_ms),
                    ("upload", times.upload_ms),
                ] {
                    if let Some(ms) = ms {
                        let to = t.saturating_add(ms).min(stop);
                        push(phase, t, to);
                        t = to;
                    }
                }
                // A live attempt's current phase, to now.
                if a.ended_ms.is_none() {
                    let phase = match a.phase {
                        Some(Phase::Downloading) => "download",
                        Some(Phase::Booting) | None => "boot",
                        Some(Phase::Running) => "run",
                        Some(Phase::Uploading) => "upload",
                    };
                    push(phase, t, stop);
                }
            }
        }
        ready = stop;
        out.push(Row {
            y: out.len() * 26,
            attempt: a.id.0,
            runner: a.runner.0,
            bars,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::{AttemptId, AttemptState, PhaseTimes, RunnerId, UserId};

    fn attempt(claimed: u64, started: Option<u64>, ended: Option<u64>) -> AttemptView {
        AttemptView {
            id: AttemptId(1),
            runner: RunnerId(2),
            runner_owner: UserId(3),
            state: AttemptState::Reported,
            why: String::new(),
            late: false,
            claimed_ms: claimed,
            started_ms: started,
            ended_ms: ended,
            phase: Some(Phase::Running),
            status: None,
            exit_code: None,
            job_exit_status: None,
            output_sha256: None,
            output_size: None,
            console_size: 0,
            output_index: None,
            vote: None,
            signed: false,
            alone: None,
            times: None,
        }
    }

    #[test]
    fn phases_line_up_on_one_axis() {
        let mut a = attempt(1_000, Some(2_000), Some(10_000));
        a.times = Some(PhaseTimes {
            download_ms: Some(1_000),
            boot_ms: Some(2_000),
            run_ms: Some(4_000),
            upload_ms: Some(1_000),
        });
        let rows = rows(0, Some(10_000), &[a], 99_999);
        let bars: Vec<(&str, u64, u64)> = rows[0]
            .bars
            .iter()
            .map(|b| (b.phase, b.x as u64, b.ms))
            .collect();
        assert_eq!(
            bars,
            [
                ("queued", 0, 1_000),
                ("claimed", 100, 1_000),
                ("download", 200, 1_000),
                ("boot", 300, 2_000),
                ("run", 500, 4_000),
                ("upload", 900, 1_000),
            ]
        );
    }

    #[test]
    fn a_live_attempt_runs_to_now_and_times_past_its_end_are_cut() {
        let live = attempt(1_000, Some(2_000), None);
        let rows1 = rows(0, None, &[live], 4_000);
        let last = rows1[0].bars.last().unwrap();
        assert_eq!((last.phase, last.ms), ("run", 2_000));
        // A report claiming more time than the attempt took is drawn within its end.
        let mut liar = attempt(0, Some(0), Some(1_000));
        liar.times = Some(PhaseTimes {
            run_ms: Some(u64::MAX / 2),
            ..PhaseTimes::default()
        });
        let rows2 = rows(0, Some(1_000), &[liar], 5_000);
        assert!(rows2[0].bars.iter().all(|b| b.x + b.width <= 1_002.0));
        assert_eq!(rows2[0].bars.last().unwrap().ms, 1_000);
    }
}
