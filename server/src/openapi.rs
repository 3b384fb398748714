//! The API's OpenAPI document, generated from the handlers' annotations and the shared types'
//! schemas (construir-api's `openapi` feature), so it cannot drift from the code. Served at
//! `/api/v1/openapi.json`.

use crate::api_attempts::{self, Uploaded};
use crate::api_jobs;
use crate::api_runner::{self, RegisterRequest, RegisterResponse};
use crate::images;
use crate::{receipts, runners};
use construir_api::ApiError;
use construir_api::trust::{
    Attestation, Receipt, SignedReceipt, SignedStatement, Statement, Verdict, Vote,
};
use construir_api::types::*;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "construir",
        description = "Submit build jobs; pull runners run each in a throw-away VM. Every request \
                       carries the header Construir-Protocol: 1 (see docs/api.md)."
    ),
    paths(
        api_jobs::submit,
        api_jobs::list,
        api_jobs::show,
        api_jobs::cancel,
        api_jobs::log,
        api_jobs::output,
        api_jobs::output_index,
        receipts::receipt,
        images::list,
        images::part,
        runners::list,
        runners::revoke,
        api_runner::register,
        api_runner::claim,
        api_attempts::job_file,
        api_attempts::start,
        api_attempts::heartbeat,
        api_attempts::append_log,
        api_attempts::upload_output,
        api_attempts::report,
        api_attempts::abort,
    ),
    components(schemas(
        ApiError,
        JobView,
        ImageView,
        AttemptView,
        OutputIndexView,
        JobState,
        AttemptState,
        JobLimits,
        RunnerCapabilities,
        ClaimRequest,
        ClaimResponse,
        HeartbeatRequest,
        HeartbeatResponse,
        Phase,
        ReportRequest,
        ReportStatus,
        PhaseTimes,
        AbortRequest,
        LogOffsetResponse,
        RegisterRequest,
        RegisterResponse,
        Uploaded,
        RunnerView,
        Standing,
        Statement,
        SignedStatement,
        Receipt,
        SignedReceipt,
        Verdict,
        Vote,
        Attestation,
    )),
    modifiers(&Tokens)
)]
pub struct ApiDoc;

/// The two bearer credentials: a user's token, and an attempt's own.
struct Tokens;

impl Modify for Tokens {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        for name in ["token", "attempt_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_lists_every_route_and_schema() {
        let doc = serde_json::to_value(super::document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/v1/jobs",
            "/api/v1/jobs/{id}",
            "/api/v1/jobs/{id}/log",
            "/api/v1/images",
            "/api/v1/images/{digest}/{part}",
            "/api/v1/runner/claim",
            "/api/v1/runner/attempts/{id}/log",
            "/api/v1/runner/attempts/{id}/report",
            "/api/v1/jobs/{id}/receipt",
            "/api/v1/runners",
            "/api/v1/runners/{id}/revoke",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(doc["components"]["schemas"]["ClaimResponse"].is_object());
        assert!(doc["components"]["schemas"]["ImageView"].is_object());
        assert!(doc["components"]["schemas"]["SignedReceipt"].is_object());
        assert!(doc["paths"]["/api/v1/jobs"]["post"]["parameters"].is_array());
    }
}
