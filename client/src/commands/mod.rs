//! The subcommands, and what several of them share: reading a job, waiting for its end, saying
//! how it ended.

mod fetch;
mod logs;
mod show;
mod submit;
mod verify;

use crate::cli::{Cli, Command};
use crate::escape::printable;
use crate::http::{Api, HttpError, JSON_LIMIT, parse_json};
use crate::{config, exit, paths};
use construir_api::types::{AttemptId, JobId, JobState, JobView};
use std::time::{Duration, Instant};

/// Runs the command; the exit code it ends with.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let Cli { global, command } = cli;
    // Resolved only by the commands that talk to a server: verify is offline, and must neither
    // need a server and a token nor ask for them.
    let connect = || -> anyhow::Result<Api> {
        let config = config::resolve(
            global.server.as_deref(),
            global.token_file.as_deref(),
            global.insecure,
            &|name| std::env::var(name).ok(),
        )?;
        Ok(Api::new(&config.server, &config.token))
    };
    match command {
        Command::Submit(args) => submit::run(&connect()?, args),
        Command::Show { id, json } => show::show(&connect()?, id, json),
        Command::List { json } => show::list(&connect()?, json),
        Command::Cancel { id } => show::cancel(&connect()?, id),
        Command::Logs {
            id,
            follow,
            attempt,
            raw,
        } => logs::run(&connect()?, id, follow, attempt, raw),
        Command::Fetch(args) => fetch::run(&connect()?, args),
        Command::Verify(args) => verify::run(&args),
    }
}

/// A job as the server returns it: typed, and the JSON text it came as (which may hold fields
/// this client does not know, in the server's order: `--json` and `record.json` are that text).
pub fn get_job(api: &Api, id: JobId) -> Result<(JobView, String), HttpError> {
    let path = paths::job(id);
    let (_, body) = api.get_bytes(&path, JSON_LIMIT)?;
    let job = parse_json(&format!("GET {path}"), &body)?;
    // JSON that parsed is UTF-8.
    Ok((job, String::from_utf8_lossy(&body).into_owned()))
}

/// How long to sleep between polls of a job: every second for a minute, then every 5 s (a
/// long job need not cost the server a request a second).
pub fn poll_interval(waited: Duration) -> Duration {
    if waited < Duration::from_secs(60) {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    }
}

/// What to say on stderr when a job's state or attempt changed while waiting for it.
pub fn progress_line(job: &JobView) -> String {
    let attempt = job.attempts.last();
    let detail = match (job.state, attempt) {
        (JobState::Running, Some(a)) => format!(
            "attempt {} on runner {}: {} {}",
            a.id,
            a.runner,
            a.state,
            printable(&a.why)
        ),
        _ => printable(&job.reason).into_owned(),
    };
    let detail = detail.trim();
    if detail.is_empty() {
        format!("construir: job {} {}", job.id, job.state)
    } else {
        format!("construir: job {} {}: {detail}", job.id, job.state)
    }
}

/// Polls the job until it ends, telling each change on stderr.
pub fn wait(api: &Api, id: JobId) -> anyhow::Result<JobView> {
    let started = Instant::now();
    let mut seen: Option<(JobState, Option<AttemptId>)> = None;
    loop {
        let (job, _) = get_job(api, id)?;
        let now = (job.state, job.attempts.last().map(|a| a.id));
        if seen != Some(now) && !job.state.is_terminal() {
            eprintln!("{}", progress_line(&job));
        }
        seen = Some(now);
        if job.state.is_terminal() {
            return Ok(job);
        }
        std::thread::sleep(poll_interval(started.elapsed()));
    }
}

/// Says on stderr how the job ended; its exit code (see [`exit`]).
pub fn finish(job: &JobView) -> u8 {
    let code = exit::job_exit_code(job).unwrap_or(0);
    let reason = printable(&job.reason);
    let reason = if reason.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", reason.trim())
    };
    eprintln!(
        "construir: job {} {}{reason} (exit code {code})",
        job.id, job.state
    );
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::types::{AttemptState, AttemptView, JobLimits, RunnerId, UserId};

    #[test]
    fn progress_is_told_with_the_jobs_words_escaped() {
        let mut job = JobView {
            id: JobId(3),
            owner: UserId(1),
            name: "x_i0.tar.xz".into(),
            image: "i0".into(),
            image_digest: None,
            sha256: String::new(),
            size: 0,
            limits: JobLimits::DEFAULT,
            priority: 0,
            state: JobState::Queued,
            created_ms: 0,
            ended_ms: None,
            reason: "no runner offers image i9\x1b[2J".into(),
            cancel_requested: false,
            retry_not_before_ms: None,
            attempts: vec![],
            result_attempt: None,
            replicas: 1,
            quorum: 1,
            agreeing: vec![],
            attestation: None,
            revoked_runners: vec![],
            adaptive: false,
            private: false,
            ran_alone: None,
        };
        assert_eq!(
            progress_line(&job),
            "construir: job 3 queued: no runner offers image i9\\x1b[2J"
        );
        job.state = JobState::Running;
        job.attempts.push(AttemptView {
            id: AttemptId(8),
            runner: RunnerId(2),
            runner_owner: UserId(5),
            state: AttemptState::Running,
            why: "booting".into(),
            late: false,
            claimed_ms: 0,
            started_ms: None,
            ended_ms: None,
            phase: None,
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
        });
        assert_eq!(
            progress_line(&job),
            "construir: job 3 running: attempt 8 on runner 2: running booting"
        );
        assert_eq!(
            poll_interval(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert_eq!(
            poll_interval(Duration::from_secs(600)),
            Duration::from_secs(5)
        );
    }
}
