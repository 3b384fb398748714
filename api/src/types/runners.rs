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

/// Why a result stands on one runner's word (adaptive replication, BOINC's): the runner's
/// standing when it claimed the job, and the server's terms then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RanAlone {
    /// The runner's votes in a row that had agreed with a quorum.
    pub agreed_in_row: u64,
    /// The votes in a row the server asked of a runner to let it run a job alone
    /// (`--adaptive-after`).
    pub after: u64,
    /// The chance, in percent, that such a run was audited (`--audit-percent`): another
    /// replica run after its report, which had to agree with it.
    pub audit_percent: u8,
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
