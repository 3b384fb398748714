//! construir-server's parts: settings, tokens, the database, the HTTP API. A library so each is
//! tested apart from the binary (and, later, against PostgreSQL and S3 by the same tests).

pub mod api_jobs;
pub mod api_runner;
pub mod blobs;
pub mod db;
pub mod http;
pub mod jobs;
pub mod openapi;
pub mod service;
pub mod settings;
pub mod tokens;

#[cfg(test)]
mod flow_tests;
