//! Runners as anyone may see them (`GET /api/v1/runners`): who lends them, and how their votes
//! fared against replicas of other owners.

use super::{RunnerId, UserId};
use serde::{Deserialize, Serialize};

/// A runner's standing: how its votes in replicated jobs fared (BOINC's "consecutive valid").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Standing {
    /// Votes in a row that agreed with the quorum (back to 0 at a disagreement).
    pub agreed_in_row: u64,
    /// Votes that agreed with a quorum, in all.
    pub agreed: u64,
    /// Votes that a quorum outvoted.
    pub disagreed: u64,
}

/// A registered runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerView {
    pub id: RunnerId,
    /// The user who lends it, and that user's name.
    pub owner: UserId,
    pub owner_name: String,
    pub name: String,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    /// The ed25519 public key its statements are signed with (64 hex digits), once it
    /// registered one.
    pub public_key: Option<String>,
    pub standing: Standing,
    /// It was revoked (by its owner or an admin): it claims and reports nothing more, its votes
    /// in jobs not yet ended stop counting, and results it took part in say so.
    pub revoked: bool,
}
