//! Receipts: the server's signed word on a job's result, and everything a stranger checks when
//! opening one.

use super::{
    Attestation, KeyPair, MAX_RECEIPT_BYTES, RECEIPT_CONTEXT, RECEIPT_VERSION, SignedStatement,
    Statement, TrustError, attestation_of, check_image, check_outcome, check_sha256, check_size,
    check_version, echo, named, parse, shown, verify_signature,
};
use crate::types::{InvalidField, JobId, RanAlone, ReportStatus, RunnerId, UserId};
use serde::{Deserialize, Serialize};

/// The longest job file name a receipt may carry (a file name's limit).
const MAX_JOB_NAME_BYTES: usize = 255;

/// What the agreeing runners said came out of the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// `success` or `failed`.
    pub status: ReportStatus,
    pub job_exit_status: Option<u16>,
    pub output_sha256: Option<String>,
    pub output_tree_sha256: Option<String>,
}

/// One agreeing runner's statement, with who owns the runner (the server's knowledge, which the
/// statement cannot carry: an owner could claim anyone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Vote {
    pub runner_id: RunnerId,
    pub owner: UserId,
    pub statement: SignedStatement,
}

/// The server's word on a job's result, once a quorum of runners agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// [`RECEIPT_VERSION`].
    pub v: u32,
    /// The public key the receipt is signed with (64 hex digits).
    pub server_key: String,
    pub job_id: JobId,
    /// The job file's name as submitted.
    pub job_name: String,
    pub job_sha256: String,
    pub image: String,
    pub image_digest: Option<String>,
    pub submitter: UserId,
    /// How many runners were asked to run the job, and how many had to agree.
    pub replicas: u32,
    pub quorum: u32,
    pub attestation: Attestation,
    /// One runner of good standing ran the job alone and no audit was drawn (adaptive
    /// replication): its one vote stands for the quorum, on these terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_alone: Option<RanAlone>,
    pub verdict: Verdict,
    /// The agreeing statements only.
    pub votes: Vec<Vote>,
    /// When the server issued it, by the server's clock.
    pub issued_ms: u64,
}

impl Receipt {
    /// This receipt signed with `key`, whose public key must be `server_key` (else it never
    /// opens).
    pub fn sign(&self, key: &KeyPair) -> SignedReceipt {
        let receipt = serde_json::to_string(self).expect("a receipt serialises");
        let signature = key.sign(RECEIPT_CONTEXT, receipt.as_bytes());
        SignedReceipt { receipt, signature }
    }

    /// The receipt's own fields, before its votes: version, digests, names, the verdict.
    fn validate(&self) -> Result<(), InvalidField> {
        check_version("v", self.v, RECEIPT_VERSION)?;
        let name = &self.job_name;
        if name.is_empty() || name.len() > MAX_JOB_NAME_BYTES || name.chars().any(char::is_control)
        {
            return Err(InvalidField::new(
                "job_name",
                format!("expected 1 to {MAX_JOB_NAME_BYTES} bytes without control characters"),
            ));
        }
        check_sha256("job_sha256", &self.job_sha256)?;
        check_image("image", &self.image, self.image_digest.as_deref())?;
        let v = &self.verdict;
        check_outcome(
            v.status,
            v.job_exit_status,
            v.output_sha256.as_deref(),
            v.output_tree_sha256.as_deref(),
        )
    }
}

/// A [`Receipt`] as it travels: its JSON text exactly as signed, and the server's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    /// The receipt's JSON text, exactly the bytes signed.
    pub receipt: String,
    /// The server's signature of [`RECEIPT_CONTEXT`] and the text (128 hex digits).
    pub signature: String,
}

impl SignedReceipt {
    /// Checks everything a stranger can check offline with the server's public key: size cap;
    /// the signature by `server_key_hex` and receipt.server_key == it; parse; votes.len() >=
    /// quorum >= 1, quorum <= replicas (with `ran_alone`: its terms hold, exactly one vote, a
    /// quorum of 2 or more); every vote's statement opens (its own runner's
    /// signature), its runner_id == vote.runner_id, its job_id, job_sha256, image and
    /// image_digest are the receipt's, its (status, job_exit_status, output_sha256,
    /// output_tree_sha256) is the verdict; runner ids, runner keys and attempt ids distinct
    /// across votes; owners distinct across votes; the attestation equals attestation_of(quorum,
    /// owners, submitter, ran_alone); the verdict's status is a job outcome (success or failed).
    pub fn open(&self, server_key_hex: &str) -> Result<Receipt, TrustError> {
        check_size("the receipt", self.receipt.len(), MAX_RECEIPT_BYTES)?;
        // The signature first: nothing the server did not sign is looked into.
        verify_signature(
            server_key_hex,
            RECEIPT_CONTEXT,
            self.receipt.as_bytes(),
            &self.signature,
        )
        .map_err(|e| named(e, "the receipt"))?;
        let receipt: Receipt = parse("the receipt", &self.receipt)?;
        if receipt.server_key != server_key_hex {
            return Err(TrustError::ServerKeyMismatch {
                expected: server_key_hex.to_string(),
                claimed: echo(&receipt.server_key, 80),
            });
        }
        receipt.validate().map_err(TrustError::InvalidReceipt)?;
        let votes = receipt.votes.len();
        if let Some(terms) = &receipt.ran_alone {
            check_ran_alone(terms, votes, receipt.quorum)?;
        }
        // A run alone's one vote stands for its quorum.
        let needed = match receipt.ran_alone {
            Some(_) => 1,
            None => receipt.quorum as usize,
        };
        if receipt.quorum < 1 || receipt.quorum > receipt.replicas || votes < needed {
            return Err(TrustError::Quorum {
                votes,
                quorum: receipt.quorum,
                replicas: receipt.replicas,
            });
        }
        let statements = receipt
            .votes
            .iter()
            .enumerate()
            .map(|(i, vote)| check_vote(&receipt, i + 1, vote))
            .collect::<Result<Vec<_>, _>>()?;
        distinct(
            "runner",
            receipt.votes.iter().map(|v| v.runner_id.to_string()),
        )?;
        distinct(
            "runner key",
            statements.iter().map(|s| s.runner_key.clone()),
        )?;
        distinct(
            "attempt",
            statements.iter().map(|s| s.attempt_id.to_string()),
        )?;
        distinct("owner", receipt.votes.iter().map(|v| v.owner.to_string()))?;
        let owners: Vec<UserId> = receipt.votes.iter().map(|v| v.owner).collect();
        let actual = attestation_of(
            receipt.quorum,
            &owners,
            receipt.submitter,
            receipt.ran_alone.is_some(),
        );
        if receipt.attestation != actual {
            return Err(TrustError::WrongAttestation {
                claimed: receipt.attestation,
                actual,
                quorum: receipt.quorum,
                submitter: receipt.submitter,
                owners: owners
                    .iter()
                    .map(UserId::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if !matches!(
            receipt.verdict.status,
            ReportStatus::Success | ReportStatus::Failed
        ) {
            return Err(TrustError::VerdictNotOutcome(receipt.verdict.status));
        }
        Ok(receipt)
    }
}

/// A run alone's terms: one vote, in place of a quorum of 2 or more, by a runner whose standing
/// met the server's ask, which asks at least one vote.
fn check_ran_alone(terms: &RanAlone, votes: usize, quorum: u32) -> Result<(), TrustError> {
    let why = if votes != 1 {
        format!("it carries {votes} votes instead of that runner's one")
    } else if quorum < 2 {
        format!("its quorum is {quorum}, which one vote meets without standing")
    } else if terms.after < 1 {
        "the standing asked is no votes at all".to_string()
    } else if terms.agreed_in_row < terms.after {
        format!(
            "the runner had {} votes agreed in a row, short of the {} asked",
            terms.agreed_in_row, terms.after
        )
    } else if terms.audit_percent > 100 {
        format!("an audit chance of {}%", terms.audit_percent)
    } else {
        return Ok(());
    };
    Err(TrustError::RanAlone(why))
}

/// Opens vote `number`'s statement and checks it speaks of the receipt's job and verdict.
fn check_vote(receipt: &Receipt, number: usize, vote: &Vote) -> Result<Statement, TrustError> {
    let s = vote
        .statement
        .open()
        .map_err(|e| TrustError::VoteStatement {
            vote: number,
            runner: vote.runner_id,
            source: Box::new(e),
        })?;
    let v = &receipt.verdict;
    let fields: [(&'static str, String, String); 9] = [
        (
            "runner_id",
            vote.runner_id.to_string(),
            s.runner_id.to_string(),
        ),
        ("job_id", receipt.job_id.to_string(), s.job_id.to_string()),
        (
            "job_sha256",
            receipt.job_sha256.clone(),
            s.job_sha256.clone(),
        ),
        ("image", receipt.image.clone(), s.image.clone()),
        (
            "image_digest",
            shown(&receipt.image_digest),
            shown(&s.image_digest),
        ),
        ("status", v.status.to_string(), s.status.to_string()),
        (
            "job_exit_status",
            shown(&v.job_exit_status),
            shown(&s.job_exit_status),
        ),
        // Replicas agree on the output's tree, not its archive's bytes (times and owners in a
        // tar may differ): the first vote is the result's, whose archive the verdict names;
        // the others must have an output when it has one.
        (
            "output_sha256",
            if number == 1 {
                shown(&v.output_sha256)
            } else {
                presence(&v.output_sha256)
            },
            if number == 1 {
                shown(&s.output_sha256)
            } else {
                presence(&s.output_sha256)
            },
        ),
        // A runner that could not read its own output names no tree: the server's index of the
        // bytes it sent is the vote then.
        (
            "output_tree_sha256",
            shown(&v.output_tree_sha256),
            match &s.output_tree_sha256 {
                None if s.output_sha256.is_some() => shown(&v.output_tree_sha256),
                other => shown(other),
            },
        ),
    ];
    for (field, expected, got) in fields {
        if expected != got {
            return Err(TrustError::VoteMismatch {
                vote: number,
                runner: vote.runner_id,
                field,
                expected,
                got,
            });
        }
    }
    Ok(s)
}

/// Whether there is an output, in words (the value compared for votes after the first).
fn presence(sha: &Option<String>) -> String {
    if sha.is_some() {
        "an output"
    } else {
        "no output"
    }
    .to_string()
}

/// Refuses the first value that two votes share (votes counted from 1).
fn distinct(what: &'static str, values: impl Iterator<Item = String>) -> Result<(), TrustError> {
    let mut seen: Vec<String> = Vec::new();
    for (i, value) in values.enumerate() {
        if let Some(first) = seen.iter().position(|v| *v == value) {
            return Err(TrustError::SharedByVotes {
                what,
                value,
                first: first + 1,
                second: i + 1,
            });
        }
        seen.push(value);
    }
    Ok(())
}
