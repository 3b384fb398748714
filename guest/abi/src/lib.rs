//! The contract between construir's host side (the VMM, the QEMU launcher, the runner, the tools)
//! and its guest (our kernel and `construir-init`).
//!
//! Everything that both sides must agree on lives here, as plain data and pure functions, so a
//! second implementation of either side can follow it: the guest kernel command line
//! ([`cmdline`]), the status port protocol ([`status`]), what a run's outcome means as a process
//! exit code ([`outcome`]), the job archive format ([`archive`]), the kind of host
//! ([`host`]) and image manifests ([`manifest`]). This crate knows nothing of KVM or QEMU.

#[cfg(feature = "archive")]
pub mod archive;
pub mod cmdline;
pub mod console;
pub mod duration;
pub mod host;
#[cfg(feature = "launcher")]
pub mod jobfile;
pub mod jobname;
#[cfg(feature = "launcher")]
pub mod launcher;
#[cfg(feature = "manifest")]
pub mod manifest;
mod manifest_index;
pub mod outcome;
pub mod status;
