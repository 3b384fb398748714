//! The image qcow2 → cached raw base, shared with construir-qemu: it lives in the
//! `construir-rawbase` crate (conversion with imago, backing and data files refused, sha256
//! checked against the manifest before conversion, the cache's use locks and stamps, pruning).
//! Re-exported here so the VMM's callers keep their paths.

pub use construir_rawbase::cache::{RawBase, cached_raw_base};
pub use construir_rawbase::convert::{
    ConvertError, MAX_VIRTUAL_SIZE, convert, convert_limited, sha256_file, sha256_reader,
};
