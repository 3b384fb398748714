//! What a stranger can check without trusting the server: runners' signed statements and the
//! server's signed receipts (docs/trust.md, "Formats").
//!
//! A runner signs a [`Statement`] of what it ran and what came out; once a quorum of runners
//! agree, the server signs a [`Receipt`] that holds their statements. [`SignedReceipt::open`]
//! checks a receipt with nothing but the server's public key: the server cannot make a result
//! up without the runners' keys, and a runner's statement cannot be moved to another job.
//!
//! Signatures are ed25519 over a context string followed by the payload, the JSON text exactly
//! as it travels (it is carried as a string, so no re-serialisation can change the bytes).
//!
//! Here: the statements and the rule that names a result's attestation; in `keys`, the key
//! pairs, signatures and the server key's published form; in `receipt`, the receipts and all
//! that opening one checks.

mod keys;
mod receipt;
#[cfg(test)]
mod tests;

pub use keys::{KeyPair, ServerKey, key_id, valid_public_key, verify_signature};
pub use receipt::{Receipt, SignedReceipt, Verdict, Vote};

use crate::types::{
    AttemptId, InvalidField, JobId, ReportStatus, RunnerId, UserId, valid_image_index, valid_sha256,
};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

pub const STATEMENT_VERSION: u32 = 1;
pub const RECEIPT_VERSION: u32 = 1;
/// Signatures are over CONTEXT || payload bytes (domain separation: a statement can never pass
/// as a receipt).
pub const STATEMENT_CONTEXT: &[u8] = b"construir-statement-v1\n";
pub const RECEIPT_CONTEXT: &[u8] = b"construir-receipt-v1\n";
/// The longest statement, as JSON text.
pub const MAX_STATEMENT_BYTES: usize = 16 * 1024;
/// The longest receipt, as JSON text (its statements included).
pub const MAX_RECEIPT_BYTES: usize = 256 * 1024;

/// The only algorithm a [`ServerKey`] names.
pub const ALGORITHM: &str = "ed25519";

/// The longest `runner_version`, in bytes.
const MAX_VERSION_BYTES: usize = 64;
/// The longest backend or host kind, as `RunnerCapabilities` takes them.
const MAX_NAME_BYTES: usize = 32;
/// How much of a parser's message is kept: it may quote the hostile text.
const MAX_ECHO: usize = 300;

/// Why a signature, a key, a statement or a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("the system's random source failed: {0}")]
    Random(String),
    #[error("{what}: expected {digits} lower-case hex digits, got {got}")]
    Hex {
        what: &'static str,
        digits: usize,
        got: String,
    },
    #[error("{what} {key} is not a usable ed25519 public key")]
    BadPublicKey { what: &'static str, key: String },
    #[error("{what} is {bytes} bytes; at most {max} are taken")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{what} is not valid JSON of its kind: {why}")]
    Parse { what: &'static str, why: String },
    #[error("{what} does not bear a valid signature by {key}")]
    BadSignature { what: &'static str, key: String },
    #[error("the statement is refused: {0}")]
    InvalidStatement(InvalidField),
    #[error("the receipt is refused: {0}")]
    InvalidReceipt(InvalidField),
    #[error("the server key is refused: {0}")]
    InvalidServerKey(InvalidField),
    #[error(
        "the receipt says it is signed by {claimed}, but it was checked with {expected}: \
         they must be the same key"
    )]
    ServerKeyMismatch { expected: String, claimed: String },
    #[error(
        "the receipt has {votes} agreeing vote(s) for a quorum of {quorum} of {replicas} \
         replica(s): it needs 1 <= quorum <= replicas and at least quorum votes"
    )]
    Quorum {
        votes: usize,
        quorum: u32,
        replicas: u32,
    },
    /// The receipt says one runner ran the job alone, but its terms do not hold.
    #[error("the receipt says one runner ran the job alone, but {0}")]
    RanAlone(String),
    /// Vote `vote` (counted from 1) holds a statement that does not open.
    #[error("vote {vote} (runner {runner}): {source}")]
    VoteStatement {
        vote: usize,
        runner: RunnerId,
        source: Box<TrustError>,
    },
    /// A field of vote `vote`'s statement is not the receipt's (or its verdict's).
    #[error(
        "vote {vote} (runner {runner}): its statement's {field} is {got}, the receipt's {expected}"
    )]
    VoteMismatch {
        vote: usize,
        runner: RunnerId,
        field: &'static str,
        expected: String,
        got: String,
    },
    /// Two votes share what must be one vote's own: a runner, a runner key, an attempt, an owner.
    #[error("votes {first} and {second} share {what} {value}: each vote must be another's")]
    SharedByVotes {
        what: &'static str,
        value: String,
        first: usize,
        second: usize,
    },
    #[error(
        "the receipt says its result is {claimed}, but its votes make it {actual} \
         (quorum {quorum}, submitter {submitter}, agreeing owners {owners})"
    )]
    WrongAttestation {
        claimed: Attestation,
        actual: Attestation,
        quorum: u32,
        submitter: UserId,
        owners: String,
    },
    #[error(
        "the receipt's verdict is {0}, which is no job outcome a receipt is issued for (success or failed)"
    )]
    VerdictNotOutcome(ReportStatus),
}

/// What one runner says about one attempt it ran: signed with its key, carried in its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// [`STATEMENT_VERSION`].
    pub v: u32,
    pub job_id: JobId,
    pub attempt_id: AttemptId,
    /// sha256 of the job file the runner ran.
    pub job_sha256: String,
    /// The image index (`i0`) and, if the job is pinned to one, the image's digest.
    pub image: String,
    pub image_digest: Option<String>,
    pub runner_id: RunnerId,
    /// The signer's public key (64 hex digits).
    pub runner_key: String,
    /// The runner's software version: at most 64 bytes of printable ASCII.
    pub runner_version: String,
    /// As `RunnerCapabilities` names them: at most 32 bytes of `[a-z0-9_-]`.
    pub backend: String,
    pub host_kind: String,
    pub status: ReportStatus,
    pub job_exit_status: Option<u16>,
    /// sha256 of the output archive, and its tree digest
    /// (`construir_contract::archive::tree_digest`): both or neither.
    pub output_sha256: Option<String>,
    pub output_tree_sha256: Option<String>,
    /// sha256 and length of the console the runner sent.
    pub console_sha256: String,
    pub console_bytes: u64,
    /// The runner's clock: shown, never decided on.
    pub started_ms: u64,
    pub ended_ms: u64,
}

impl Statement {
    /// Checks the version, the digests, the names, the runner's key, and that the status and
    /// the job's exit status agree (as a report's must).
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_version("v", self.v, STATEMENT_VERSION)?;
        check_sha256("job_sha256", &self.job_sha256)?;
        check_image("image", &self.image, self.image_digest.as_deref())?;
        if !valid_public_key(&self.runner_key) {
            return Err(InvalidField::new(
                "runner_key",
                "expected an ed25519 public key, 64 lower-case hex digits",
            ));
        }
        let v = &self.runner_version;
        if v.is_empty()
            || v.len() > MAX_VERSION_BYTES
            || !v.bytes().all(|b| (b' '..=b'~').contains(&b))
        {
            return Err(InvalidField::new(
                "runner_version",
                format!("expected 1 to {MAX_VERSION_BYTES} bytes of printable ASCII"),
            ));
        }
        check_name("backend", &self.backend)?;
        check_name("host_kind", &self.host_kind)?;
        check_outcome(
            self.status,
            self.job_exit_status,
            self.output_sha256.as_deref(),
            self.output_tree_sha256.as_deref(),
        )?;
        check_sha256("console_sha256", &self.console_sha256)
    }

    /// This statement signed with `key`, whose public key must be `runner_key` (else it never
    /// opens).
    pub fn sign(&self, key: &KeyPair) -> SignedStatement {
        let statement = serde_json::to_string(self).expect("a statement serialises");
        let signature = key.sign(STATEMENT_CONTEXT, statement.as_bytes());
        SignedStatement {
            statement,
            signature,
        }
    }
}

/// A [`Statement`] as it travels: its JSON text exactly as signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedStatement {
    /// The statement's JSON text, exactly the bytes signed.
    pub statement: String,
    /// The runner's signature of [`STATEMENT_CONTEXT`] and the text (128 hex digits).
    pub signature: String,
}

impl SignedStatement {
    /// Size cap, parse (deny unknown fields), validate, then the signature by
    /// statement.runner_key.
    pub fn open(&self) -> Result<Statement, TrustError> {
        check_size("the statement", self.statement.len(), MAX_STATEMENT_BYTES)?;
        let statement: Statement = parse("the statement", &self.statement)?;
        statement.validate().map_err(TrustError::InvalidStatement)?;
        verify_signature(
            &statement.runner_key,
            STATEMENT_CONTEXT,
            self.statement.as_bytes(),
            &self.signature,
        )
        .map_err(|e| named(e, "the statement"))?;
        Ok(statement)
    }
}

/// How far a result is confirmed by runners the submitter does not control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Attestation {
    /// At least two runners of at least two distinct owners agree.
    Verified,
    /// One runner of good standing ran it alone (adaptive replication) and no audit was
    /// drawn: the result is as good as that runner's record and the audit chance, no more.
    OnStanding,
    /// Too few runners or owners agree to call it verified.
    Unverified,
    /// Only the submitter's own runners vouch for it.
    SelfAttested,
}

impl Attestation {
    pub fn as_str(self) -> &'static str {
        match self {
            Attestation::Verified => "verified",
            Attestation::OnStanding => "on-standing",
            Attestation::Unverified => "unverified",
            Attestation::SelfAttested => "self-attested",
        }
    }
}

impl std::fmt::Display for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule, used by the server when it decides and by open() when it checks: SelfAttested if
/// every agreeing owner is the submitter; OnStanding if one runner ran it alone (`ran_alone`);
/// Verified if quorum >= 2 and the agreeing owners are at least 2 distinct users; else
/// Unverified.
pub fn attestation_of(
    quorum: u32,
    agreeing_owners: &[UserId],
    submitter: UserId,
    ran_alone: bool,
) -> Attestation {
    // No owners at all vouch for nothing, not even the submitter's word.
    if !agreeing_owners.is_empty() && agreeing_owners.iter().all(|o| *o == submitter) {
        return Attestation::SelfAttested;
    }
    if ran_alone {
        return Attestation::OnStanding;
    }
    let distinct: HashSet<UserId> = agreeing_owners.iter().copied().collect();
    if quorum >= 2 && distinct.len() >= 2 {
        Attestation::Verified
    } else {
        Attestation::Unverified
    }
}

/// Gives a signature failure the name of what was signed.
fn named(e: TrustError, what: &'static str) -> TrustError {
    match e {
        TrustError::BadSignature { key, .. } => TrustError::BadSignature { what, key },
        other => other,
    }
}

/// The first `max` characters of hostile text, quoted, for a message.
fn echo(text: &str, max: usize) -> String {
    let cut: String = text.chars().take(max).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

fn shown<T: std::fmt::Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "none".to_string(), T::to_string)
}

fn parse<T: serde::de::DeserializeOwned>(what: &'static str, text: &str) -> Result<T, TrustError> {
    serde_json::from_str(text).map_err(|e| TrustError::Parse {
        what,
        why: e.to_string().chars().take(MAX_ECHO).collect(),
    })
}

fn check_size(what: &'static str, bytes: usize, max: usize) -> Result<(), TrustError> {
    if bytes > max {
        return Err(TrustError::TooLarge { what, bytes, max });
    }
    Ok(())
}

fn check_version(field: &'static str, got: u32, want: u32) -> Result<(), InvalidField> {
    if got != want {
        return Err(InvalidField::new(
            field,
            format!("version {got}; this side reads version {want}"),
        ));
    }
    Ok(())
}

fn check_sha256(field: &'static str, text: &str) -> Result<(), InvalidField> {
    if !valid_sha256(text) {
        return Err(InvalidField::new(
            field,
            "expected 64 lower-case hex digits",
        ));
    }
    Ok(())
}

fn check_image(field: &'static str, image: &str, digest: Option<&str>) -> Result<(), InvalidField> {
    if !valid_image_index(image) {
        return Err(InvalidField::new(
            field,
            "expected an image index (a letter and digits, like i0)",
        ));
    }
    match digest {
        Some(d) => check_sha256("image_digest", d),
        None => Ok(()),
    }
}

fn check_name(field: &'static str, value: &str) -> Result<(), InvalidField> {
    let plain = value
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
    if value.is_empty() || value.len() > MAX_NAME_BYTES || !plain {
        return Err(InvalidField::new(
            field,
            format!("expected 1 to {MAX_NAME_BYTES} lower-case letters, digits, _ or -"),
        ));
    }
    Ok(())
}

/// An outcome's consistency: the status and the job's exit status agree (as
/// `ReportRequest::validate` says), the digests are digests, and there is no tree digest
/// without an output (an output may come without one: its runner could not read it).
fn check_outcome(
    status: ReportStatus,
    job_exit_status: Option<u16>,
    output_sha256: Option<&str>,
    output_tree_sha256: Option<&str>,
) -> Result<(), InvalidField> {
    let agrees = match (status, job_exit_status) {
        (ReportStatus::Success, Some(s)) => s == 0,
        (ReportStatus::Failed, Some(s)) => s != 0,
        _ => true,
    };
    if !agrees {
        return Err(InvalidField::new(
            "job_exit_status",
            format!(
                "{} does not agree with status {status}",
                job_exit_status.unwrap_or_default()
            ),
        ));
    }
    match (output_sha256, output_tree_sha256) {
        (Some(sha), Some(tree)) => {
            check_sha256("output_sha256", sha)?;
            check_sha256("output_tree_sha256", tree)
        }
        (None, None) => Ok(()),
        // An output its runner could not read as an archive (its tree is then the server's
        // index, or none): the sha256 alone.
        (Some(sha), None) => check_sha256("output_sha256", sha),
        (None, Some(_)) => Err(InvalidField::new(
            "output_tree_sha256",
            "given without an output_sha256",
        )),
    }
}
