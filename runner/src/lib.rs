//! construir-runner's parts: the run core both modes share (runcore: one job file through one
//! backend, in its own network namespace: netns), the local queue mode (dirs, intake, run,
//! runner) and the pull mode (remote: claims from a construir-server over HTTP). A library so the
//! parsers of what a backend, a file on disk or a server hands the runner are fuzzed (fuzz/) and
//! tested apart from the binary.

pub mod backend;
pub mod dirs;
pub mod disk_copy;
pub mod intake;
pub mod netns;
pub mod runcore;
pub use construir_contract::record;
pub mod remote;
pub mod run;
pub mod runner;
