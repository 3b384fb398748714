//! The request and response types of the API, documented field by field.
//!
//! Requests that clients and runners send are read with `deny_unknown_fields`: a misspelt field
//! is an error, not a silently ignored wish. Responses are plain, so that a newer server may add
//! fields an older client ignores. Times are Unix milliseconds (`_ms`), durations seconds (`_s`),
//! sizes bytes unless the name says otherwise (`_mib`).

mod ids;
mod images;
mod jobs;
mod limits;
mod runner;
mod runners;

pub use ids::{AttemptId, IdError, JobId, Role, RoleError, RunnerId, UserId};
pub use images::ImageView;
pub use jobs::{
    AttemptState, AttemptView, JobState, JobView, MAX_PRIORITY, MAX_REPLICAS, MIN_PRIORITY,
    OutputIndexView, SubmitParams,
};
pub use limits::{Bound, JobLimits, LimitError};
pub use runner::{
    AbortRequest, ClaimRequest, ClaimResponse, HeartbeatRequest, HeartbeatResponse,
    LogOffsetResponse, MAX_CLAIM_WAIT_S, MAX_REASON_BYTES, Phase, PhaseTimes, ReportRequest,
    ReportStatus, RunnerCapabilities,
};
pub use runners::{RanAlone, RunnerView, Standing};

/// A request value that is refused, naming the field (the body of an `invalid-params` error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct InvalidField {
    /// The field's name as it is spelt on the wire (`capabilities.images`, `priority`).
    pub field: &'static str,
    pub why: String,
}

impl InvalidField {
    pub fn new(field: &'static str, why: impl Into<String>) -> Self {
        InvalidField {
            field,
            why: why.into(),
        }
    }
}

impl From<LimitError> for InvalidField {
    fn from(e: LimitError) -> Self {
        InvalidField::new(e.field, e.to_string())
    }
}

impl From<&InvalidField> for crate::ApiError {
    fn from(e: &InvalidField) -> Self {
        crate::ApiError::new(crate::codes::INVALID_PARAMS, e.to_string())
    }
}

/// Whether `index` names a build image as job names do (`i0`, `t0`): a lower-case letter, then
/// digits, 2 to 8 characters (the same rule as construir-contract's manifests).
pub fn valid_image_index(index: &str) -> bool {
    let mut chars = index.chars();
    matches!(chars.next(), Some('a'..='z'))
        && (2..=8).contains(&index.len())
        && chars.all(|c| c.is_ascii_digit())
}

/// Whether `text` is a sha256 as construir writes them: 64 lower-case hex digits.
pub fn valid_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}
