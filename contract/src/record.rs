//! The result record of every finished run (`done/RUN/record.json`, `failed/RUN/record.json`).

use serde::{Deserialize, Serialize};

/// What the runner knows about a finished job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job's file name as it was queued (lossily decoded and escaped if it was not UTF-8).
    pub job: String,
    /// This run's id: the name of its directory in done/ or failed/.
    #[serde(default)]
    pub run_id: String,
    /// Where the job file is now, relative to the runner's directory.
    pub job_file: String,
    /// success, failed, invalid-job, timed-out, guest-failed, interrupted, bad-name,
    /// not-a-job (a symbolic link, directory, FIFO, … or a file with several links), too-big,
    /// unknown-image, backend-failed, vmm-fault (the VMM process was killed: seccomp, limits,
    /// crash), crashed-runner.
    pub status: String,
    /// The backend's exit code (construir_contract::outcome), if it ran.
    pub exit_code: Option<i32>,
    /// The job's own exit status, if it ran to its end.
    pub job_exit_status: Option<u16>,
    pub reason: String,
    pub image: Option<String>,
    pub backend: Option<String>,
    pub accel: Option<String>,
    pub host_kind: Option<String>,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub ended_ms: u64,
    /// Wall time of the runner's handling, and of the VM process alone.
    pub runner_ms: u64,
    pub vm_ms: Option<u64>,
    /// The console log, relative to the runner's directory.
    pub console_log: Option<String>,
    /// The backend's own messages (capped), relative to the runner's directory.
    #[serde(default)]
    pub backend_log: Option<String>,
    pub job_bytes: u64,
    pub console_bytes: Option<u64>,
    pub attempts: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record {
            job: "a_t0.tar.xz".into(),
            run_id: "20261201-194012-1a2b3c4d".into(),
            job_file: "done/20261201-194012-1a2b3c4d/a_t0.tar.xz".into(),
            status: "success".into(),
            exit_code: Some(0),
            job_exit_status: Some(0),
            reason: "job succeeded".into(),
            image: Some("t0".into()),
            backend: Some("qemu".into()),
            accel: Some("tcg".into()),
            host_kind: Some("emulated-kvm".into()),
            started_ms: 1,
            ended_ms: 2,
            runner_ms: 1,
            vm_ms: Some(1),
            console_log: Some("done/20261201-194012-1a2b3c4d/console.log".into()),
            backend_log: None,
            job_bytes: 1024,
            console_bytes: Some(10),
            attempts: 1,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
