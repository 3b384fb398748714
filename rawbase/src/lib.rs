//! The raw root-disk bases both launchers (construir-vmm, construir-qemu) share.
//!
//! An image's root disk is a qcow2; neither launcher gives it to a VM. The first run converts it
//! (after checking its sha256 against the manifest, and refusing backing or data files) into a raw
//! file in the cache, `<cache>/raw/<disk_sha256>.raw`, that every later run shares read-only
//! under its own throw-away overlay. [`convert`] is the conversion, [`cache`] the cache with its
//! use locks and stamps, [`prune`] the removal of bases no image names any more.

pub mod cache;
pub mod convert;
pub mod lock;
pub mod prune;

pub use cache::{RawBase, cached_raw_base};
pub use convert::ConvertError;
