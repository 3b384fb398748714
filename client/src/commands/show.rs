//! `show`, `list` and `cancel`: a job or the jobs as they stand.

use super::get_job;
use crate::escape::{json_for_terminal, printable};
use crate::format::{duration, size, utc};
use crate::http::{Api, JSON_LIMIT, parse_json};
use crate::{exit, paths};
use construir_api::types::{AttemptView, JobId, JobView};
use std::fmt::Write as _;
use std::io::Write;

/// `show ID [--json]`.
pub fn show(api: &Api, id: JobId, json: bool) -> anyhow::Result<u8> {
    let (job, text) = get_job(api, id)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", json_for_terminal(text.trim_end()))?;
    } else {
        out.write_all(summary(&job).as_bytes())?;
    }
    out.flush()?;
    Ok(0)
}

/// `list [--json]`.
pub fn list(api: &Api, json: bool) -> anyhow::Result<u8> {
    let path = paths::jobs();
    let (_, body) = api.get_bytes(&path, JSON_LIMIT)?;
    // Checked as a list of jobs either way: --json passes on only what parsed.
    let jobs: Vec<JobView> = parse_json(&format!("GET {path}"), &body)?;
    let mut out = std::io::stdout().lock();
    if json {
        let text = String::from_utf8_lossy(&body);
        writeln!(out, "{}", json_for_terminal(text.trim_end()))?;
    } else {
        out.write_all(table(&jobs).as_bytes())?;
    }
    out.flush()?;
    Ok(0)
}

/// `cancel ID`.
pub fn cancel(api: &Api, id: JobId) -> anyhow::Result<u8> {
    let job: JobView = api.post_empty(&paths::cancel(id))?;
    let line = if job.state.is_terminal() {
        format!("job {} {}", job.id, job.state)
    } else {
        format!(
            "job {} {}: cancel requested; its runner stops it at its next heartbeat",
            job.id, job.state
        )
    };
    writeln!(std::io::stdout().lock(), "{line}")?;
    Ok(0)
}

/// The jobs as a table: id, state, name, image, created. Names are the submitters' own text,
/// shown escaped.
pub fn table(jobs: &[JobView]) -> String {
    let names: Vec<String> = jobs
        .iter()
        .map(|j| printable(&j.name).into_owned())
        .collect();
    let width = names
        .iter()
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, 48);
    let mut out = format!(
        "{:>6}  {:<9}  {:<width$}  {:<5}  CREATED (UTC)\n",
        "ID", "STATE", "NAME", "IMAGE"
    );
    for (job, name) in jobs.iter().zip(&names) {
        let _ = writeln!(
            out,
            "{:>6}  {:<9}  {:<width$}  {:<5}  {}",
            // Ids print through Display, which ignores widths.
            job.id.to_string(),
            job.state.as_str(),
            name,
            printable(&job.image),
            utc(job.created_ms)
        );
    }
    out
}

/// A job for a person: state and why, image, limits, times, each attempt.
pub fn summary(job: &JobView) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "job {}: {}", job.id, printable(&job.name));
    let reason = printable(&job.reason);
    if reason.trim().is_empty() {
        let _ = writeln!(s, "  state     {}", job.state);
    } else {
        let _ = writeln!(s, "  state     {}: {}", job.state, reason.trim());
    }
    if job.cancel_requested {
        let _ = writeln!(s, "            cancel requested: its runner is stopping it");
    }
    if let Some(t) = job.retry_not_before_ms {
        let _ = writeln!(s, "            tried again not before {} UTC", utc(t));
    }
    if let Some(code) = exit::job_exit_code(job) {
        let _ = writeln!(s, "  exit code {code}");
    }
    let _ = writeln!(
        s,
        "  image     {}, priority {}",
        printable(&job.image),
        job.priority
    );
    if job.replicas > 1 || job.quorum > 1 {
        let _ = writeln!(
            s,
            "  replicas  {} on runners of distinct owners, {} must agree",
            job.replicas, job.quorum
        );
        if job.adaptive {
            let _ = writeln!(
                s,
                "            adaptive: one runner of good standing may run it alone, where the \
                 server allows it"
            );
        }
    }
    if let Some(att) = job.attestation {
        let by = if job.agreeing.len() > 1 {
            let ids: Vec<String> = job.agreeing.iter().map(|a| a.to_string()).collect();
            format!(" (attempts {} agreed)", ids.join(", "))
        } else {
            String::new()
        };
        let _ = writeln!(s, "  result    {att}{by}");
        if let Some(t) = job.ran_alone {
            let _ = writeln!(
                s,
                "            one runner ran it alone on its standing: {} votes agreed in a row \
                 ({} asked), no audit drawn ({}% of such runs are)",
                t.agreed_in_row, t.after, t.audit_percent
            );
        }
    }
    for r in &job.revoked_runners {
        let _ = writeln!(
            s,
            "            runner {r}, which took part in the result, has been revoked since"
        );
    }
    let _ = writeln!(
        s,
        "  job file  {}, sha256 {}",
        size(job.size),
        printable(&job.sha256)
    );
    let l = &job.limits;
    let _ = writeln!(
        s,
        "  limits    time {}, output {}, console {}, memory {} MiB, {} vCPU{}",
        duration(l.timeout_s.saturating_mul(1000)),
        size(l.output_size),
        size(l.console_cap),
        l.memory_mib,
        l.vcpus,
        if l.vcpus == 1 { "" } else { "s" }
    );
    let _ = writeln!(s, "  created   {} UTC", utc(job.created_ms));
    if let Some(end) = job.ended_ms {
        let _ = writeln!(
            s,
            "  ended     {} UTC, {} after submission",
            utc(end),
            duration(end.saturating_sub(job.created_ms))
        );
    }
    if job.attempts.is_empty() {
        let _ = writeln!(s, "  attempts  none yet");
    } else {
        let _ = writeln!(s, "  attempts");
    }
    for a in &job.attempts {
        attempt_lines(&mut s, a, job.result_attempt == Some(a.id));
    }
    s
}

fn attempt_lines(s: &mut String, a: &AttemptView, is_result: bool) {
    let why = printable(&a.why);
    let mark = if is_result { "  (the result)" } else { "" };
    let _ = writeln!(
        s,
        "    {} on runner {}: {}{}{mark}",
        a.id,
        a.runner,
        a.state,
        if why.trim().is_empty() {
            String::new()
        } else {
            format!(", {}", why.trim())
        }
    );
    let mut times = format!("claimed {}", utc(a.claimed_ms));
    if let Some(t) = a.started_ms {
        let _ = write!(times, ", started {}", utc(t));
    }
    if let Some(t) = a.ended_ms {
        let _ = write!(times, ", ended {}", utc(t));
        if let Some(start) = a.started_ms {
            let _ = write!(times, " ({})", duration(t.saturating_sub(start)));
        }
    }
    if let Some(phase) = a.phase.filter(|_| a.state.is_live()) {
        // Phase has no name of its own but its wire spelling.
        let name = serde_json::to_value(phase).unwrap_or_default();
        let _ = write!(times, "; {}", name.as_str().unwrap_or("?"));
    }
    let _ = writeln!(s, "      {times}");
    let mut result = Vec::new();
    if let Some(st) = a.status {
        result.push(format!("status {st}"));
    }
    if let Some(c) = a.exit_code {
        result.push(format!("exit code {c}"));
    }
    if let Some(c) = a.job_exit_status {
        result.push(format!("job exit status {c}"));
    }
    if let Some(n) = a.output_size {
        result.push(format!("output {}", size(n)));
    }
    result.push(format!("console {}", size(a.console_size)));
    if a.late {
        result.push("a late report, kept aside".into());
    }
    if a.signed {
        result.push("signed".into());
    }
    let _ = writeln!(s, "      {}", result.join(", "));
    if let Some(v) = &a.vote {
        let _ = writeln!(s, "      votes {}", printable(v));
    }
    // The server's index of the output: what replicas of the job must agree on.
    if let Some(index) = &a.output_index {
        let line = match (&index.tree_sha256, &index.error) {
            (Some(tree), _) => format!(
                "output tree {} ({} entries)",
                printable(tree),
                index.entries.unwrap_or(0)
            ),
            (None, Some(why)) => format!("output not indexed: {}", printable(why)),
            (None, None) => String::new(),
        };
        if !line.is_empty() {
            let _ = writeln!(s, "      {line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::{
        AttemptId, AttemptState, JobLimits, JobState, ReportStatus, RunnerId, UserId,
    };

    fn job() -> JobView {
        JobView {
            id: JobId(42),
            owner: UserId(1),
            name: "hel\x1b]0;x\x07lo_i0.tar.xz".into(),
            image: "i0".into(),
            image_digest: None,
            sha256: "ab".repeat(32),
            size: 64 << 20,
            limits: JobLimits::DEFAULT,
            priority: 0,
            state: JobState::Failed,
            created_ms: 1_796_154_012_000,
            ended_ms: Some(1_796_154_075_000),
            reason: "job failed with exit status 2".into(),
            cancel_requested: false,
            retry_not_before_ms: None,
            replicas: 1,
            quorum: 1,
            agreeing: vec![],
            attestation: None,
            revoked_runners: vec![],
            adaptive: false,
            private: false,
            ran_alone: None,
            attempts: vec![AttemptView {
                id: AttemptId(7),
                runner: RunnerId(2),
                runner_owner: UserId(3),
                vote: None,
                signed: false,
                alone: None,
                times: None,
                state: AttemptState::Reported,
                why: "job failed with exit status 2\u{202e}".into(),
                late: false,
                claimed_ms: 1_796_154_013_000,
                started_ms: Some(1_796_154_014_000),
                ended_ms: Some(1_796_154_075_000),
                phase: None,
                status: Some(ReportStatus::Failed),
                exit_code: Some(2),
                job_exit_status: Some(2),
                output_sha256: Some("cd".repeat(32)),
                output_size: Some(1536),
                console_size: 100,
                output_index: Some(construir_api::types::OutputIndexView {
                    tree_sha256: Some("e".repeat(64)),
                    entries: Some(3),
                    error: None,
                }),
            }],
            result_attempt: Some(AttemptId(7)),
        }
    }

    #[test]
    fn the_summary_says_everything_and_escapes_the_jobs_words() {
        let text = summary(&job());
        for want in [
            "job 42: hel\\x1b]0;x\\x07lo_i0.tar.xz\n",
            "state     failed: job failed with exit status 2\n",
            "exit code 2\n",
            "limits    time 30m 00s, output 1 GiB, console 16 MiB, memory 1024 MiB, 2 vCPUs\n",
            "created   2026-12-01 19:40:12 UTC\n",
            "7 on runner 2: reported, job failed with exit status 2\\u{202e}  (the result)\n",
            "started 2026-12-01 19:40:14, ended 2026-12-01 19:41:15 (1m 01s)\n",
            "status failed, exit code 2, job exit status 2, output 1.5 KiB, console 100 bytes\n",
            "output tree eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee (3 entries)\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
    }

    #[test]
    fn the_table_lines_up() {
        let mut other = job();
        other.id = JobId(5);
        other.name = "b_t0.tar.xz".into();
        other.state = JobState::Queued;
        let text = table(&[job(), other]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("    ID  STATE      NAME"), "{text}");
        assert!(
            lines[1]
                .starts_with("    42  failed     hel\\x1b]0;x\\x07lo_i0.tar.xz  i0     2026-12-01"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("     5  queued     b_t0.tar.xz"),
            "{text}"
        );
        assert_eq!(lines[1].find("  i0  "), lines[2].find("  i0  "), "{text}");
    }
}
