//! Making seed-format jobs: an xz tar holding `opt/job/construir` (and whatever else the job
//! brings under `opt/job/`), padded with zeros so the job disk has room for the output.

use construir_abi::archive::{JOB_DIR, JOB_SCRIPT};
use std::io::Write;
use std::path::Path;

/// One file of a job.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// Path inside `opt/job/`.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl JobFile {
    pub fn new(path: impl Into<String>, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            data: data.into(),
            mode,
        }
    }

    /// The job's script, `opt/job/construir`.
    pub fn script(text: &str) -> Self {
        Self::new("construir", text.as_bytes(), 0o755)
    }
}

/// Why a job could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("a job needs {JOB_SCRIPT}")]
    NoScript,
    #[error("job path {0:?} must be relative and stay inside {JOB_DIR}/")]
    BadPath(String),
    #[error("cannot write the job")]
    Io(#[from] std::io::Error),
}

/// The job archive (xz tar) for `files`, unpadded.
pub fn job_archive(files: &[JobFile]) -> Result<Vec<u8>, PackError> {
    if !files.iter().any(|f| f.path == "construir") {
        return Err(PackError::NoScript);
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    for dir in ["opt/", "opt/job/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_cksum();
        builder.append_data(&mut header, dir, std::io::empty())?;
    }
    for f in files {
        if f.path.is_empty() || f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
            return Err(PackError::BadPath(f.path.clone()));
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(f.data.len() as u64);
        header.set_mode(f.mode);
        header.set_cksum();
        builder.append_data(&mut header, format!("{JOB_DIR}/{}", f.path), &f.data[..])?;
    }
    let tar = builder.into_inner()?;
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&tar)?;
    Ok(xz.finish()?)
}

/// Writes a job file: the archive, zero-padded to at least `min_size` bytes and to a whole
/// number of 512-byte sectors (the job's output is written over the same file).
pub fn write_job(path: &Path, files: &[JobFile], min_size: u64) -> Result<u64, PackError> {
    let archive = job_archive(files)?;
    let size = (archive.len() as u64).max(min_size).div_ceil(512) * 512;
    let tmp = path.with_extension("partial");
    {
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(&archive)?;
        out.set_len(size)?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_abi::archive;

    #[test]
    fn a_packed_job_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("hello_t0.tar.xz");
        let size = write_job(
            &job,
            &[
                JobFile::script("#!/bin/sh\necho hi\n"),
                JobFile::new("data/in.bin", vec![1, 2, 3], 0o644),
            ],
            1 << 20,
        )
        .unwrap();
        assert_eq!(size, 1 << 20);
        assert_eq!(std::fs::metadata(&job).unwrap().len(), 1 << 20);
        let disk = std::fs::read(&job).unwrap();
        let script = archive::read_file(&disk[..], JOB_SCRIPT, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(script, b"#!/bin/sh\necho hi\n");
        let (_, entries) = archive::list(&disk[..]).unwrap();
        let script_entry = entries.iter().find(|e| e.path == JOB_SCRIPT).unwrap();
        assert_eq!(script_entry.mode & 0o777, 0o755);
        assert!(entries.iter().any(|e| e.path == "opt/job/data/in.bin"));
    }

    #[test]
    fn refuses_jobs_without_script_or_with_escaping_paths() {
        assert!(matches!(job_archive(&[]), Err(PackError::NoScript)));
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            let files = [JobFile::script("true"), JobFile::new(bad, vec![], 0o644)];
            assert!(
                matches!(job_archive(&files), Err(PackError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn sizes_round_up_to_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("j_t0.tar.xz");
        let size = write_job(&job, &[JobFile::script("true")], 1000).unwrap();
        assert_eq!(size, 1024);
    }
}
