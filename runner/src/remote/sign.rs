//! The runner's key and its signed statements. The key is made at the first registration in the
//! runner's directory (`DIR/runner-key`, its owner's only) and kept: the server binds it to the
//! runner and checks every statement against it, so a copied token alone cannot speak for this
//! runner. Each report carries a statement of what this runner saw: the job and image it ran,
//! the outcome, and the digests of the output (its sha256 and tree, as
//! `construir_contract::archive` computes them) and of the console.

use super::ClaimResponse;
use super::transfer::{HashWriter, hex};
use construir_api::keyfile;
use construir_api::trust::{KeyPair, STATEMENT_VERSION, SignedStatement, Statement};
use construir_api::types::{ReportRequest, RunnerId};
use construir_contract::archive;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The key file in the runner's directory.
pub const KEY_FILE: &str = "runner-key";

/// The runner's key, made in `dir` if it has none.
pub fn runner_key(dir: &Path) -> anyhow::Result<KeyPair> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("create the runner's directory {}: {e}", dir.display()))?;
    let (key, made) = keyfile::load_or_create(&dir.join(KEY_FILE), "runner's")?;
    if made {
        eprintln!(
            "construir-runner: made this runner's signing key in {} (public key {}); keep it: \
             the server binds the runner to it",
            dir.join(KEY_FILE).display(),
            key.public_hex()
        );
    }
    Ok(key)
}

/// The tree digest of the first `len` bytes of `job` (the output the runner uploads), within
/// the limits the server indexes a job's output of `output_size` with; none if they are no
/// archive it can read (the statement then names the output without a tree).
pub fn output_tree(job: &Path, len: u64, output_size: u64) -> Option<String> {
    let file = std::fs::File::open(job).ok()?;
    let limits = archive::index_limits(output_size);
    archive::index(std::io::BufReader::new(file.take(len)), &limits)
        .ok()
        .map(|i| i.tree_sha256)
}

/// The console's sha256 and length (an absent or unreadable console is empty).
fn console_digest(console: &Path) -> (String, u64) {
    let mut hash = Sha256::new();
    match std::fs::File::open(console)
        .and_then(|mut f| std::io::copy(&mut f, &mut HashWriter(&mut hash)))
    {
        Ok(total) => (hex(&hash.finalize()), total),
        Err(_) => (hex(&Sha256::digest(b"")), 0),
    }
}

/// What signing a report needs besides the report.
pub struct Signer<'a> {
    pub key: &'a KeyPair,
    pub runner: RunnerId,
    pub backend: &'a str,
    pub host_kind: &'a str,
}

impl Signer<'_> {
    /// `report` for `offer` as a signed statement; none (logged) when the report itself would
    /// not be a valid one.
    pub fn statement(
        &self,
        offer: &ClaimResponse,
        report: &ReportRequest,
        console: &Path,
        started_ms: u64,
    ) -> Option<SignedStatement> {
        let (console_sha256, console_bytes) = console_digest(console);
        let st = Statement {
            v: STATEMENT_VERSION,
            job_id: offer.job_id,
            attempt_id: offer.attempt_id,
            job_sha256: offer.sha256.clone(),
            image: offer.image.clone(),
            image_digest: offer.image_digest.clone(),
            runner_id: self.runner,
            runner_key: self.key.public_hex(),
            runner_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: self.backend.to_string(),
            host_kind: self.host_kind.to_string(),
            status: report.status,
            job_exit_status: report.job_exit_status,
            output_sha256: report.output_sha256.clone(),
            output_tree_sha256: report.output_tree_sha256.clone(),
            console_sha256,
            console_bytes,
            started_ms,
            ended_ms: now_ms(),
        };
        match st.validate() {
            Ok(()) => Some(st.sign(self.key)),
            Err(e) => {
                tracing::warn!(
                    "attempt {}: the report is sent unsigned: {e}",
                    offer.attempt_id
                );
                None
            }
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
