//! construir-runner's parts: the queue directories, the backends, the records, and the run loop.
//! A library so the parsers of what a backend or a file on disk hands the runner are fuzzed
//! (fuzz/) and tested apart from the binary.

pub mod backend;
pub mod dirs;
pub mod disk_copy;
pub mod intake;
pub use construir_contract::record;
pub mod run;
pub mod runner;
