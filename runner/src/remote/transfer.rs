//! The attempt's files: the job downloaded into its run directory (checked against the claim's
//! size and sha256, holes kept: job files are mostly padding), and the output cut where the
//! archive the job wrote ends, hashed and uploaded.

use super::api::{AttemptApi, Uploaded};
use super::client::ApiFailure;
use construir_contract::archive::{CutError, Limits, archive_end};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a download did not give the job.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Api(#[from] ApiFailure),
    #[error("cannot write the job file: {0}")]
    Disk(#[source] io::Error),
    /// Its text quotes the claim (the server's): shown escaped.
    #[error(
        "the job file is not what the claim said: {}",
        construir_contract::text::printable(.0)
    )]
    Mismatch(String),
    #[error("the download was stopped")]
    Stopped,
}

impl DownloadError {
    pub fn is_transient(&self) -> bool {
        match self {
            DownloadError::Api(e) => e.is_transient(),
            // A broken connection surfaces as a read error of the body.
            DownloadError::Mismatch(_) | DownloadError::Stopped | DownloadError::Disk(_) => false,
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads the job into `to` (a new file, 0600), checking `size` and `sha256`; `stopped` is
/// asked between chunks.
pub fn download(
    api: &AttemptApi,
    to: &Path,
    size: u64,
    sha256: &str,
    stopped: &dyn Fn() -> bool,
) -> Result<(), DownloadError> {
    let (_, mut body) = api.job(size.saturating_add(1))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(to)
        .map_err(DownloadError::Disk)?;
    let got = write_sparse(&mut body, &mut file, size, stopped)?;
    if got.0 != size {
        return Err(DownloadError::Mismatch(format!(
            "{} bytes, not {size}",
            got.0
        )));
    }
    if got.1 != sha256 {
        return Err(DownloadError::Mismatch(format!(
            "sha256 {}, not {sha256}",
            got.1
        )));
    }
    file.sync_all().map_err(DownloadError::Disk)?;
    Ok(())
}

/// Copies `from` into `to`, leaving holes where whole chunks are zero, up to `limit + 1` bytes;
/// returns the length and sha256 of what came.
fn write_sparse(
    from: &mut impl Read,
    to: &mut File,
    limit: u64,
    stopped: &dyn Fn() -> bool,
) -> Result<(u64, String), DownloadError> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        if stopped() {
            return Err(DownloadError::Stopped);
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ApiFailure::Network(format!("the download broke: {e}")).into()),
        };
        let chunk = &buf[..n];
        hash.update(chunk);
        if chunk.iter().all(|b| *b == 0) {
            to.seek(SeekFrom::Current(n as i64))
                .map_err(DownloadError::Disk)?;
        } else {
            to.write_all(chunk).map_err(DownloadError::Disk)?;
        }
        total += n as u64;
        if total > limit {
            return Err(DownloadError::Mismatch(format!(
                "more than the {limit} bytes the claim said"
            )));
        }
    }
    to.set_len(total).map_err(DownloadError::Disk)?;
    Ok((total, hex(&hash.finalize())))
}

/// What the output upload found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// The archive at the start of the job's disk: its length and sha256.
    Archive { len: u64, sha256: String },
    /// No archive to upload, and why (a person reads it in the report's reason).
    None(String),
}

/// Finds the output in the job file the VM wrote over: the archive at its start, cut where it
/// ends, if it is no longer than `max` (the job's `output_size`).
pub fn find_output(job: &Path, max: u64) -> io::Result<Output> {
    let mut file = File::open(job)?;
    let end = match archive_end(io::BufReader::new(&mut file), &Limits::DEFAULT, max) {
        Ok(end) => end,
        Err(CutError::TooLong { limit }) => {
            return Ok(Output::None(format!(
                "the job's output is larger than its output_size ({limit} bytes): not uploaded"
            )));
        }
        Err(CutError::Archive(e)) => {
            return Ok(Output::None(format!(
                "the job's disk holds no readable archive ({e}): no output"
            )));
        }
    };
    file.seek(SeekFrom::Start(0))?;
    let mut hash = Sha256::new();
    io::copy(&mut (&mut file).take(end.len), &mut HashWriter(&mut hash))?;
    Ok(Output::Archive {
        len: end.len,
        sha256: hex(&hash.finalize()),
    })
}

/// Feeds what is written into a hash (`io::copy` into it hashes a reader).
pub struct HashWriter<'a>(pub &'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Uploads the first `len` bytes of `job`, and checks what the server says it received.
pub fn upload(api: &AttemptApi, job: &Path, len: u64, sha256: &str) -> Result<(), ApiFailure> {
    let mut file = File::open(job)
        .map_err(|e| ApiFailure::BadAnswer(format!("cannot read the job's disk: {e}")))?;
    let mut part = (&mut file).take(len);
    let Uploaded {
        sha256: theirs,
        size,
    } = api.upload(len, &mut part)?;
    if size != len || theirs != sha256 {
        // Damaged on the way: worth sending again.
        return Err(ApiFailure::Network(format!(
            "the server received {size} bytes with sha256 {theirs}, not {len} with {sha256}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_padded_job_arrives_sparse_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let mut job = b"archive at the start".to_vec();
        job.resize(8 << 20, 0);
        job[5 << 20] = 1;
        let mut f = File::create(d.path().join("j")).unwrap();
        let (len, sha) = write_sparse(&mut &job[..], &mut f, job.len() as u64, &|| false).unwrap();
        assert_eq!(len, job.len() as u64);
        assert_eq!(sha, hex(&Sha256::digest(&job)));
        let meta = std::fs::metadata(d.path().join("j")).unwrap();
        assert_eq!(meta.len(), 8 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "holes kept");
        assert_eq!(std::fs::read(d.path().join("j")).unwrap(), job);
        // Longer than the claim said: refused.
        let mut g = File::create(d.path().join("k")).unwrap();
        let e = write_sparse(&mut &job[..], &mut g, 1000, &|| false).unwrap_err();
        assert!(matches!(e, DownloadError::Mismatch(_)), "{e}");
        let e = write_sparse(&mut &job[..], &mut g, u64::MAX, &|| true).unwrap_err();
        assert!(matches!(e, DownloadError::Stopped));
    }

    #[test]
    fn the_output_is_the_archive_cut_at_its_end() {
        let d = tempfile::tempdir().unwrap();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "hello", &b"hello\n"[..]).unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&tar.into_inner().unwrap()).unwrap();
        let archive = xz.finish().unwrap();
        let mut disk = archive.clone();
        disk.extend(b"stale bytes of an older archive");
        disk.resize(1 << 20, 0);
        let job = d.path().join("j_t0.tar.xz");
        std::fs::write(&job, &disk).unwrap();
        let out = find_output(&job, 1 << 20).unwrap();
        assert_eq!(
            out,
            Output::Archive {
                len: archive.len() as u64,
                sha256: hex(&Sha256::digest(&archive))
            }
        );
        let Output::None(why) = find_output(&job, 10).unwrap() else {
            panic!("too long")
        };
        assert!(why.contains("output_size"), "{why}");
        std::fs::write(&job, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            find_output(&job, 1 << 20).unwrap(),
            Output::None(_)
        ));
    }
}
