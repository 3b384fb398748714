//! construir-server's parts: settings, tokens, the database, the HTTP API. A library so each is
//! tested apart from the binary (and, later, against PostgreSQL and S3 by the same tests).

pub mod access;
pub mod accounts;
pub mod api_attempts;
pub mod api_jobs;
pub mod api_runner;
pub mod backup;
pub mod blobs;
pub mod claim_spread;
pub mod db;
pub mod deletion;
pub mod farm_queries;
pub mod http;
pub mod images;
pub mod indexing;
pub mod jobs;
pub mod listing;
pub mod logs;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod polls;
pub mod receipts;
pub mod retention;
pub mod runners;
pub mod serve;
pub mod service;
pub mod settings;
pub mod signing;
pub mod statements;
pub mod tokens;
pub mod web;

#[cfg(test)]
mod adaptive_tests;
#[cfg(test)]
mod api_fuzz_tests;
#[cfg(test)]
mod backup_tests;
#[cfg(test)]
mod farm_tests;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod image_tests;
#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod matching_tests;
#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod replica_tests;
#[cfg(test)]
mod retention_tests;
#[cfg(test)]
mod test_backends;
#[cfg(test)]
mod unstarted_tests;
#[cfg(test)]
mod web_admin_tests;
#[cfg(test)]
mod web_farm_tests;
#[cfg(test)]
mod web_tests;
