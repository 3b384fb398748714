//! The result record written next to every finished job (`done/NAME.json`, `failed/NAME.json`).

use serde::{Deserialize, Serialize};

/// What the runner knows about a finished job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The job's file name as it was queued.
    pub job: String,
    /// Where the job file is now, relative to the runner's directory.
    pub job_file: String,
    /// success, failed, invalid-job, timed-out, guest-failed, interrupted, bad-name,
    /// unknown-image, backend-failed, vmm-fault (the VMM process was killed: seccomp, limits,
    /// crash), crashed-runner.
    pub status: String,
    /// The backend's exit code (construir_abi::outcome), if it ran.
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
            job_file: "done/a_t0.tar.xz".into(),
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
            console_log: Some("logs/a_t0.tar.xz.log".into()),
            job_bytes: 1024,
            console_bytes: Some(10),
            attempts: 1,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }
}
