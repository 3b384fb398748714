//! The job's disk: the job file opened the one way every launcher opens it
//! ([`construir_launcher::jobfile`]: no symbolic link, a regular file with one link, at most
//! `--max-job-size`), and what a refused file is: an invalid job (exit 101, status
//! `invalid-job`), not a setup error, since the submitter chose it. A file that cannot be opened
//! at all stays a setup error (the host's problem).

use crate::disk::raw::RawDisk;
use crate::disk::{DiskBackend, round_to_sectors};
use construir_contract::outcome::EXIT_INVALID_JOB;
use construir_launcher::JobArgs;
use construir_launcher::jobfile::{JobFileError, JobFileRefusal};

/// Why the job's disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JobDiskError {
    /// The file is not a job this host runs (the message is the run's reason).
    #[error("{0}")]
    Invalid(String),
    /// The file could not be opened (the I/O error is the source).
    #[error(transparent)]
    Open(JobFileError),
    #[error("read the job file's size")]
    Size(#[source] std::io::Error),
}

fn invalid(refusal: &JobFileRefusal) -> JobDiskError {
    // The same shape as every other invalid-job reason (RunOutcome::InvalidJob's text).
    JobDiskError::Invalid(format!("invalid job: {refusal}"))
}

/// Opens the job file as the guest's read-write disk.
pub fn open_job_disk(args: &JobArgs) -> Result<RawDisk, JobDiskError> {
    let file = args.open_job().map_err(|e| match e.refusal() {
        Some(refusal) => invalid(refusal),
        None => JobDiskError::Open(e),
    })?;
    let disk = RawDisk::new(file, "construir-job").map_err(JobDiskError::Size)?;
    // The size the disk took is what the guest gets and what the file-size limit is computed
    // from; the file was checked on the same handle, but whoever else holds it open could have
    // grown it since.
    if disk.size() > round_to_sectors(args.max_job_size) {
        return Err(invalid(&JobFileRefusal::TooBig {
            size: disk.size(),
            max: args.max_job_size,
        }));
    }
    Ok(disk)
}

/// The `--json` summary of a job refused before any VM was built.
pub fn invalid_job_summary(reason: &str, host_kind: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "status": "invalid-job",
        "exit_code": EXIT_INVALID_JOB,
        "job_exit_status": null,
        "reason": reason,
        "backend": "vmm",
        "host_kind": host_kind,
        "image": image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        job: JobArgs,
    }

    fn args(path: &std::path::Path, max: &str) -> JobArgs {
        Cli::parse_from(["x", "--job", path.to_str().unwrap(), "--max-job-size", max]).job
    }

    fn reason(r: Result<RawDisk, JobDiskError>) -> String {
        match r {
            Err(JobDiskError::Invalid(why)) => why,
            Err(e) => panic!("not an invalid job: {e}"),
            Ok(_) => panic!("taken"),
        }
    }

    #[test]
    fn refused_job_files_are_invalid_jobs_and_open_errors_stay_setup_errors() {
        let d = tempfile::tempdir().unwrap();
        let job = d.path().join("j_t0.tar.xz");
        std::fs::write(&job, vec![1u8; 1000]).unwrap();
        let disk = open_job_disk(&args(&job, "1M")).unwrap();
        assert_eq!(disk.size(), 1024);

        let target = d.path().join("victim.json");
        std::fs::write(&target, b"{}").unwrap();
        let link = d.path().join("l_t0.tar.xz");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let why = reason(open_job_disk(&args(&link, "1M")));
        assert!(
            why.starts_with("invalid job: it is a symbolic link"),
            "{why}"
        );

        let hard = d.path().join("h_t0.tar.xz");
        std::fs::hard_link(&target, &hard).unwrap();
        assert!(reason(open_job_disk(&args(&hard, "1M"))).contains("2 hard links"));

        let big = d.path().join("b_t0.tar.xz");
        std::fs::File::create(&big)
            .unwrap()
            .set_len((1 << 20) + 1)
            .unwrap();
        assert!(reason(open_job_disk(&args(&big, "1M"))).contains("more than the largest job"));
        // The default cap (8 GiB) refuses a sparse terabyte.
        let huge = d.path().join("s_t0.tar.xz");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let cli = Cli::parse_from(["x", "--job", huge.to_str().unwrap()]).job;
        assert!(reason(open_job_disk(&cli)).contains("more than the largest job"));

        let missing = d.path().join("m_t0.tar.xz");
        assert!(matches!(
            open_job_disk(&args(&missing, "1M")),
            Err(JobDiskError::Open(_))
        ));
        assert_eq!(std::fs::read(&target).unwrap(), b"{}", "never touched");
    }

    #[test]
    fn the_file_size_limit_follows_the_job_size_cap() {
        use crate::sandbox::Limits;
        let d = tempfile::tempdir().unwrap();
        let job = d.path().join("j_t0.tar.xz");
        // A job of exactly the cap, not a whole number of sectors.
        let cap = (1 << 20) + 100;
        std::fs::File::create(&job).unwrap().set_len(cap).unwrap();
        let disk = open_job_disk(&args(&job, &cap.to_string())).unwrap();
        assert_eq!(disk.size(), round_to_sectors(cap));
        let root = 64 << 10;
        let limits = Limits::for_vm(256 << 20, disk.size().max(root), 16 << 10);
        assert!(
            limits.file_size >= disk.size(),
            "the guest can write all of it"
        );
        assert!(limits.file_size <= round_to_sectors(cap) + (1 << 20));
    }

    #[test]
    fn the_summary_of_a_refused_job() {
        let s = invalid_job_summary(
            "invalid job: it is a FIFO, not a regular file",
            "hardware",
            "t0",
        );
        assert_eq!(s["status"], "invalid-job");
        assert_eq!(s["exit_code"], 101);
        assert_eq!(s["reason"], "invalid job: it is a FIFO, not a regular file");
        assert!(s["job_exit_status"].is_null());
    }
}
