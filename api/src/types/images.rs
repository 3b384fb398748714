//! Images the server serves by digest (`construir-server image publish INDEX`).

use serde::{Deserialize, Serialize};

/// A published image: its manifest, kernel and qcow2 as blobs. Its digest is the sha256 of the
/// manifest file's bytes; the manifest names the kernel's and the qcow2's sha256 (checked against
/// the blobs when published), so the digest pins all three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageView {
    /// The image index (`i0`, `t0`).
    pub index: String,
    /// The image's digest: the sha256 of its manifest (lower-case hex).
    pub digest: String,
    /// sha256 and size of the manifest blob (its sha256 is the digest).
    pub manifest_sha256: String,
    pub manifest_size: u64,
    /// sha256 and size of the kernel blob.
    pub kernel_sha256: String,
    pub kernel_size: u64,
    /// sha256 and size of the qcow2 blob.
    pub qcow2_sha256: String,
    pub qcow2_size: u64,
    /// When it was first published.
    pub published_ms: u64,
    /// Whether it is its index's current digest (what jobs submitted now are pinned to).
    pub current: bool,
}
