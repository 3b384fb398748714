//! construir-server's parts: settings, tokens, the database, the HTTP API. A library so each is
//! tested apart from the binary (and, later, against PostgreSQL and S3 by the same tests).

pub mod db;
pub mod http;
pub mod settings;
pub mod tokens;
