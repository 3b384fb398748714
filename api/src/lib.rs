//! The contract between construir-server, its pull runners and its clients.
//!
//! Everything the three must agree on lives here as plain data and pure functions, so that each
//! side can be tested without the others and a second implementation can follow it: the protocol
//! version ([`PROTOCOL_VERSION`], [`check_protocol`]), the error body every refusal uses
//! ([`ApiError`], [`codes`]), the request and response types ([`types`]), how log pieces are
//! appended ([`log`]), whether a runner can take a job ([`fit`]) and the job and attempt state
//! machines ([`state`]). Nothing here knows HTTP, a database or an async runtime; the
//! transition tables are written out in `docs/api.md`.

pub mod console;
pub mod fit;
pub mod keyfile;
pub mod log;
pub mod state;
pub mod trust;
pub mod types;

use serde::{Deserialize, Serialize};

/// The version of the protocol this crate describes. It changes whenever a change to a request,
/// a response or a rule would make an older peer misunderstand a newer one; additions that an
/// older peer can ignore (a new response field) do not change it.
pub const PROTOCOL_VERSION: u32 = 1;

/// The header both sides send on every request and response, holding [`PROTOCOL_VERSION`] in
/// decimal.
pub const PROTOCOL_HEADER: &str = "Construir-Protocol";

/// Why a peer's protocol header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(
        "no {PROTOCOL_HEADER} header: this side speaks construir protocol {PROTOCOL_VERSION} and \
         needs the other side to say which one it speaks"
    )]
    Missing,
    #[error(
        "the {PROTOCOL_HEADER} header {0:?} is not a protocol version (expected a decimal number, \
         this side speaks {PROTOCOL_VERSION})"
    )]
    Unparseable(String),
    #[error(
        "the other side speaks construir protocol {theirs} and this side speaks {PROTOCOL_VERSION}: \
         upgrade {older}",
        older = if *theirs < PROTOCOL_VERSION { "the other side" } else { "this side" }
    )]
    Mismatch { theirs: u32 },
}

/// Checks the other side's [`PROTOCOL_HEADER`] value (as received; surrounding blanks are
/// ignored). Only an exact match is accepted: there is one version at a time, and a peer that
/// guesses at another version's meaning does more harm than one that stops with a clear message.
pub fn check_protocol(header_value: Option<&str>) -> Result<(), ProtocolError> {
    let value = header_value.ok_or(ProtocolError::Missing)?.trim();
    // u32::from_str accepts a leading '+'; the header is digits only.
    if value.is_empty() || value.len() > 9 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProtocolError::Unparseable(truncated(value, 40)));
    }
    let theirs: u32 = value
        .parse()
        .map_err(|_| ProtocolError::Unparseable(value.to_string()))?;
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::Mismatch { theirs })
    }
}

/// The first `max` bytes of `text` (on a character boundary): what a peer sends is echoed back
/// in messages, and a peer may send a lot.
fn truncated(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The JSON body of every refusal, whatever the endpoint: a stable code a program can match on
/// (one of [`codes`]) and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// A stable code from [`codes`], such as `job-too-big`; new codes may appear, so a client
    /// treats an unknown one by its HTTP status.
    pub error: String,
    /// What went wrong and, where it helps, what to do about it.
    pub message: String,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ApiError {
            error: code.to_string(),
            message: message.into(),
        }
    }

    /// The HTTP status this error is answered with (500 for a code this crate does not know).
    pub fn http_status(&self) -> u16 {
        codes::http_status(&self.error).unwrap_or(500)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<&ProtocolError> for ApiError {
    fn from(e: &ProtocolError) -> Self {
        ApiError::new(codes::PROTOCOL_MISMATCH, e.to_string())
    }
}

/// The error codes of [`ApiError`]. A code, once published, keeps its meaning.
pub mod codes {
    /// The request's [`PROTOCOL_HEADER`](crate::PROTOCOL_HEADER) is missing, garbled or another
    /// version.
    pub const PROTOCOL_MISMATCH: &str = "protocol-mismatch";
    /// The request could not be read: not JSON, a missing or unknown field, a wrong type.
    pub const BAD_REQUEST: &str = "bad-request";
    /// The request was read but a value is refused (the message names the field): a limit above
    /// the server's maximum, a priority out of range, a claim wait above 30 s, …
    pub const INVALID_PARAMS: &str = "invalid-params";
    /// The job file's name is not `NAME_INDEX.tar.xz`.
    pub const BAD_JOB_NAME: &str = "bad-job-name";
    /// The job file is larger than the server takes.
    pub const JOB_TOO_BIG: &str = "job-too-big";
    /// An upload (output, console) went past the attempt's limit.
    pub const OUTPUT_TOO_BIG: &str = "output-too-big";
    /// No credentials, or credentials the server does not know (or that have expired).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The credentials are valid but do not allow this (wrong role, someone else's job).
    pub const FORBIDDEN: &str = "forbidden";
    /// No such job, attempt or runner (or not one the caller may see).
    pub const NOT_FOUND: &str = "not-found";
    /// The attempt is no longer live (its lease lapsed, it was not started in time, it was
    /// aborted or canceled): the runner stops working on it. A report is still taken, kept aside
    /// as late.
    pub const LEASE_LOST: &str = "lease-lost";
    /// The attempt has already reported; a report is taken once.
    pub const ALREADY_REPORTED: &str = "already-reported";
    /// The job has ended (succeeded, failed, canceled, errored, expired).
    pub const JOB_FINISHED: &str = "job-finished";
    /// The request does not apply to the job or attempt in its current state (starting an
    /// attempt twice, a heartbeat before the start, canceling twice, …).
    pub const WRONG_STATE: &str = "wrong-state";
    /// Too many requests or open long polls from this caller; retry later.
    pub const TOO_MANY_REQUESTS: &str = "too-many-requests";
    /// A quota of the caller's is used up (bytes stored); the message says which, how much is
    /// used and what the limit is. Retry once some is freed (retention, deleting jobs).
    pub const QUOTA_EXCEEDED: &str = "quota-exceeded";
    /// What the server keeps its data in does not answer or is full (its disk, its database,
    /// its blob store): nothing was stored; retry later.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The server failed; the request may be retried.
    pub const INTERNAL: &str = "internal";

    /// Every code with its HTTP status.
    pub const ALL: &[(&str, u16)] = &[
        (PROTOCOL_MISMATCH, 400),
        (BAD_REQUEST, 400),
        (INVALID_PARAMS, 422),
        (BAD_JOB_NAME, 422),
        (JOB_TOO_BIG, 413),
        (OUTPUT_TOO_BIG, 413),
        (UNAUTHORIZED, 401),
        (FORBIDDEN, 403),
        (NOT_FOUND, 404),
        (LEASE_LOST, 409),
        (ALREADY_REPORTED, 409),
        (JOB_FINISHED, 409),
        (WRONG_STATE, 409),
        (TOO_MANY_REQUESTS, 429),
        (QUOTA_EXCEEDED, 429),
        (UNAVAILABLE, 503),
        (INTERNAL, 500),
    ];

    /// The HTTP status of `code`, if it is one of [`ALL`].
    pub fn http_status(code: &str) -> Option<u16> {
        ALL.iter().find(|(c, _)| *c == code).map(|(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_version_is_accepted() {
        assert_eq!(check_protocol(Some("1")), Ok(()));
        assert_eq!(check_protocol(Some(" 1 ")), Ok(()));
    }

    #[test]
    fn missing_garbled_and_other_versions_are_refused_with_a_clear_message() {
        let missing = check_protocol(None).unwrap_err();
        assert_eq!(missing, ProtocolError::Missing);
        assert!(
            missing.to_string().contains("Construir-Protocol"),
            "{missing}"
        );
        for garbage in ["", "v1", "+1", "1.0", "-1", "99999999999999", "one"] {
            let e = check_protocol(Some(garbage)).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Unparseable(_)),
                "{garbage:?}: {e:?}"
            );
        }
        let newer = check_protocol(Some("2")).unwrap_err();
        assert_eq!(newer, ProtocolError::Mismatch { theirs: 2 });
        assert!(newer.to_string().contains("upgrade this side"), "{newer}");
        let older = check_protocol(Some("0")).unwrap_err().to_string();
        assert!(older.contains("speaks construir protocol 0"), "{older}");
        assert!(older.contains("upgrade the other side"), "{older}");
    }

    #[test]
    fn a_long_garbage_header_is_not_echoed_whole() {
        let long = "x".repeat(10_000);
        let e = check_protocol(Some(&long)).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn error_bodies_are_the_documented_json() {
        let e = ApiError::new(
            codes::JOB_TOO_BIG,
            "the job is 9 GiB; this server takes 8 GiB",
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "job-too-big", "message": "the job is 9 GiB; this server takes 8 GiB"})
        );
        assert_eq!(e.http_status(), 413);
        assert_eq!(ApiError::new("some-new-code", "").http_status(), 500);
        let from_protocol = ApiError::from(&ProtocolError::Missing);
        assert_eq!(from_protocol.error, codes::PROTOCOL_MISMATCH);
    }

    #[test]
    fn codes_are_unique_and_documented() {
        let doc = include_str!("../../docs/api.md");
        for (i, (code, _)) in codes::ALL.iter().enumerate() {
            assert!(
                codes::ALL[i + 1..].iter().all(|(c, _)| c != code),
                "{code} twice"
            );
            assert!(
                doc.contains(&format!("`{code}`")),
                "docs/api.md lacks {code}"
            );
        }
    }
}
