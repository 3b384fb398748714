//! construir's job contract: what every part that touches a job agrees on — the guest (our kernel
//! and `construir-init`), the launchers, the runner, the server and the client.
//!
//! As plain data and pure functions, so a second implementation of any side can follow it: job
//! file names ([`jobname`]), the job archive format and its capped reader ([`archive`]), the
//! guest kernel command line ([`cmdline`]), the status port protocol ([`status`]), what a run's
//! outcome means as a process exit code ([`outcome`]), a run's record ([`record`]), the kind of
//! host ([`host`]), image manifests ([`manifest`]) and the layout of a job packed from a source tree
//! and a separate build script ([`source_job`]). This crate knows nothing of KVM, QEMU,
//! HTTP or a database; what the host-side binaries set up alike lives in `construir-launcher`.

#[cfg(feature = "archive")]
pub mod archive;
pub mod cmdline;
pub mod host;
pub mod jobname;
#[cfg(feature = "manifest")]
pub mod manifest;
mod manifest_index;
pub mod outcome;
#[cfg(feature = "manifest")]
pub mod record;
pub mod source_job;
pub mod status;
pub mod text;
