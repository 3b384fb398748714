//! The HTTP side: `/healthz`, and the JSON API under `/api/v1/` with its protocol header (checked
//! on every request, sent on every response), bearer tokens, a size limit on every request body,
//! and refusals as [`ApiError`] bodies with a fitting status.

use crate::blobs::BlobError;
use crate::db::Identity;
use crate::polls::Polls;
use crate::service::{ApplyError, Shared};
use crate::tokens;
use axum::extract::{FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use construir_api::{ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, check_protocol, codes};
use std::sync::Arc;

/// A refusal, answered as JSON with its status.
#[derive(Debug)]
pub struct Refusal(pub ApiError);

impl Refusal {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Refusal(ApiError::new(code, message))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<ApplyError> for Refusal {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::NoJob => Refusal::new(codes::NOT_FOUND, "no such job"),
            ApplyError::Refused(r) => Refusal(ApiError::from(&r)),
            ApplyError::Db(e) => e.into(),
            ApplyError::Contended => Refusal::new(codes::TOO_MANY_REQUESTS, e.to_string()),
        }
    }
}

impl From<BlobError> for Refusal {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooBig { limit } => Refusal::new(
                codes::OUTPUT_TOO_BIG,
                format!("the upload is larger than its limit of {limit} bytes"),
            ),
            BlobError::Body(why) => Refusal::new(
                codes::BAD_REQUEST,
                format!("the upload was cut short: {why}"),
            ),
            BlobError::Io(e) if is_disk_full(&e) => {
                tracing::error!("blob storage: {e}");
                Refusal::new(
                    codes::UNAVAILABLE,
                    "the server's disk is full: nothing was stored; try again later",
                )
            }
            BlobError::Store(e) if !matches!(e, object_store::Error::NotFound { .. }) => {
                tracing::error!("blob storage: {e}");
                Refusal::new(
                    codes::UNAVAILABLE,
                    "the server's blob store did not take the upload; try again later",
                )
            }
            other => {
                tracing::error!("{other}");
                Refusal::new(
                    codes::INTERNAL,
                    "the server could not store the upload; try again",
                )
            }
        }
    }
}

/// A write refused for want of space (or of a quota of the file system's).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error() == Some(libc::ENOSPC)
}

impl From<crate::db::DbError> for Refusal {
    fn from(e: crate::db::DbError) -> Self {
        tracing::error!("{e}");
        // The database not answering (down, restarting, every connection busy) is the farm's
        // trouble for a while, not this request's: 503, retried by runners and clients.
        match crate::db::trouble(&e) {
            crate::db::Trouble::Unavailable => Refusal::new(
                codes::UNAVAILABLE,
                "the server's database does not answer; try again later",
            ),
            crate::db::Trouble::BadValue => Refusal::new(
                codes::BAD_REQUEST,
                "a value in the request holds a character the database does not store (a NUL)",
            ),
            crate::db::Trouble::Internal => Refusal::new(
                codes::INTERNAL,
                "the server could not complete the request; try again",
            ),
        }
    }
}

/// The caller, from `Authorization: Bearer TOKEN`.
pub struct Caller(pub Identity);

impl FromRequestParts<Shared> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let unauthorized = |why: &str| Refusal::new(codes::UNAUTHORIZED, why.to_string());
        if !parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return Err(unauthorized(
                "no Authorization header (Authorization: Bearer TOKEN)",
            ));
        }
        let token = tokens::bearer(&parts.headers)
            .ok_or_else(|| unauthorized("the Authorization header holds no construir token"))?;
        let who = app
            .db
            .identify(&tokens::digest(token))
            .await?
            .ok_or_else(|| unauthorized("unknown or revoked token"))?;
        // Runner tokens are not held to it: a volunteer's fleet claims (long polls, capped per
        // token) and registers, and its jobs' traffic goes with attempt tokens.
        if let Some(limiter) = &app.requests
            && who.role != "runner"
            && let Err(not_until) = limiter.check_key(&who.user_id)
        {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            return Err(Refusal::new(
                codes::TOO_MANY_REQUESTS,
                format!(
                    "more than {} API requests a second from {}'s tokens; try again in {} ms",
                    app.settings.requests_per_second,
                    who.user,
                    wait.as_millis().max(1)
                ),
            ));
        }
        Ok(Caller(who))
    }
}

/// Refuses API requests without this protocol version (on the routes that need it; the answer
/// says ours through [`api_answers`]).
async fn require_protocol(request: Request, next: Next) -> Response {
    let theirs = request
        .headers()
        .get(PROTOCOL_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    match check_protocol(theirs.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(e) => Refusal(ApiError::from(&e)).into_response(),
    }
}

/// Every answer under `/api/v1/`: says our protocol version, and a refusal that is not one of
/// ours already (axum's own rejections: unreadable JSON, a bad query or path, a wrong content
/// type, a body past its limit, a method the path does not take) becomes an [`ApiError`] body
/// with the code of its status.
async fn api_answers(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let mut response =
        if (status.is_client_error() || status.is_server_error()) && !is_json(response.headers()) {
            as_api_error(&method, response).await
        } else {
            response
        };
    response.headers_mut().insert(
        PROTOCOL_HEADER,
        HeaderValue::from_str(&PROTOCOL_VERSION.to_string()).expect("digits"),
    );
    response
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The most of a rejection's own text kept as the message.
const REJECTION_TEXT: usize = 4 << 10;

/// A refusal that axum (or a layer) wrote as text, as an [`ApiError`] body: its status kept
/// (405, 413, 415), but for 422, which axum gives JSON of the wrong shape and
/// docs/api.md calls `bad-request` (400).
async fn as_api_error(method: &Method, response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, REJECTION_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let status = match parts.status {
        StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
        s => s,
    };
    let code = match status {
        StatusCode::UNAUTHORIZED => codes::UNAUTHORIZED,
        StatusCode::FORBIDDEN => codes::FORBIDDEN,
        StatusCode::NOT_FOUND => codes::NOT_FOUND,
        StatusCode::TOO_MANY_REQUESTS => codes::TOO_MANY_REQUESTS,
        s if s.is_server_error() => codes::INTERNAL,
        _ => codes::BAD_REQUEST,
    };
    let message = match status {
        // The method router adds its Allow header once this layer is done.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("this endpoint does not take {method} (its Allow header says what it takes)")
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase(),
        _ => text,
    };
    let mut answer = (status, Json(ApiError::new(code, message))).into_response();
    if let Some(v) = parts.headers.get(header::RETRY_AFTER) {
        answer.headers_mut().insert(header::RETRY_AFTER, v.clone());
    }
    answer
}

/// A path under `/api/v1/` that is no endpoint.
async fn no_such_endpoint(method: Method, OriginalUri(uri): OriginalUri) -> Refusal {
    let path = uri.path();
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    Refusal::new(
        codes::NOT_FOUND,
        format!(
            "no endpoint {method} {} (see /api/v1/openapi.json)",
            &path[..end]
        ),
    )
}

#[derive(serde::Serialize)]
struct WhoAmI {
    user: String,
    role: String,
    protocol: u32,
}

async fn whoami(Caller(who): Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        user: who.user,
        role: who.role,
        protocol: PROTOCOL_VERSION,
    })
}

async fn healthz(State(app): State<Shared>) -> Response {
    match sqlx::query("SELECT 1").execute(app.db.pool()).await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::error!("healthz: database: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database does not answer\n",
            )
                .into_response()
        }
    }
}

/// Prometheus' text format, as OpenMetrics (metrics.rs says what is counted).
async fn metrics(State(app): State<Shared>) -> Response {
    match app.metrics.render(&app.db).await {
        Ok(page) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            page,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("metrics: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database does not answer\n",
            )
                .into_response()
        }
    }
}

/// JSON request bodies larger than this are refused (job files, outputs and log pieces have
/// limits of their own).
pub const JSON_BODY_LIMIT: usize = 64 << 10;

/// The routes with the default cap of long polls per token (tests build one per request).
pub fn router(app: Shared) -> Router {
    router_with(app, Polls::new(crate::polls::DEFAULT_MAX_PER_TOKEN))
}

/// The routes; `polls` counts every token's open long polls (the [`crate::polls::LongPoll`]
/// extractor finds it in the request's extensions).
pub fn router_with(app: Shared, polls: Arc<Polls>) -> Router {
    let checked = Router::new()
        .route("/whoami", get(whoami))
        .merge(crate::api_jobs::routes())
        .merge(crate::images::routes())
        .merge(crate::api_runner::routes())
        .merge(crate::runners::routes())
        // JSON bodies; job files, outputs and console pieces are streamed with limits of their own.
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .route_layer(middleware::from_fn(require_protocol));
    let api = Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .merge(checked)
        .fallback(no_such_endpoint)
        .layer(axum::Extension(polls))
        .layer(middleware::from_fn(api_answers));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(crate::receipts::KEY_PATH, get(crate::receipts::server_key))
        .nest("/api/v1", api)
        // The nest's own root with a slash is not inside it: answered as any unknown endpoint.
        .merge(
            Router::new()
                .route("/api/v1/", axum::routing::any(no_such_endpoint))
                .layer(middleware::from_fn(api_answers)),
        )
        .merge(crate::web::routes())
        .with_state(app)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::service::App;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    pub(crate) async fn test_app() -> (tempfile::TempDir, Shared) {
        app_with(crate::settings::SettingArgs::default()).await
    }

    /// A server on a data directory of its own, with `args` over the defaults.
    pub(crate) async fn app_with(
        args: crate::settings::SettingArgs,
    ) -> (tempfile::TempDir, Shared) {
        let d = tempfile::tempdir().unwrap();
        let settings = crate::settings::SettingArgs {
            data: Some(d.path().to_path_buf()),
            ..args
        }
        .resolve()
        .unwrap();
        let (db, blobs) = crate::test_backends::open(d.path()).await;
        (d, App::new(settings, db, blobs).unwrap())
    }

    async fn call(app: &Shared, req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = router(app.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        assert_eq!(
            resp.headers()
                .get(PROTOCOL_HEADER)
                .map(|v| v.to_str().unwrap()),
            Some("1"),
            "every API answer says its protocol"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn get(path: &str, token: Option<&str>, protocol: Option<&str>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::get(path);
        if let Some(t) = token {
            b = b.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(p) = protocol {
            b = b.header(PROTOCOL_HEADER, p);
        }
        b.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn the_protocol_and_the_token_are_checked_on_every_request() {
        let (_d, app) = test_app().await;
        let user = app.db.ensure_user("alice").await.unwrap();
        let token = tokens::generate().unwrap();
        let id = app
            .db
            .add_token(user, "submitter", &tokens::digest(&token))
            .await
            .unwrap();
        let (status, body) = call(&app, get("/api/v1/whoami", Some(&token), None)).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (400, Some("protocol-mismatch"))
        );
        let (status, body) = call(&app, get("/api/v1/whoami", Some(&token), Some("2"))).await;
        assert_eq!(status.as_u16(), 400);
        assert!(
            body["message"].as_str().unwrap().contains("protocol 2"),
            "{body}"
        );
        let (status, body) = call(&app, get("/api/v1/whoami", None, Some("1"))).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (401, Some("unauthorized"))
        );
        let (status, _) = call(&app, get("/api/v1/whoami", Some("cst_nonsense"), Some("1"))).await;
        assert_eq!(status.as_u16(), 401);
        let (status, body) = call(&app, get("/api/v1/whoami", Some(&token), Some("1"))).await;
        assert_eq!(status.as_u16(), 200);
        assert_eq!(
            (body["user"].as_str(), body["role"].as_str()),
            (Some("alice"), Some("submitter"))
        );
        app.db.revoke_token(id).await.unwrap();
        let (status, _) = call(&app, get("/api/v1/whoami", Some(&token), Some("1"))).await;
        assert_eq!(status.as_u16(), 401, "a revoked token is refused at once");
    }

    pub(crate) async fn token_of(app: &Shared, user: &str, role: &str) -> String {
        let id = app.db.ensure_user(user).await.unwrap();
        let token = tokens::generate().unwrap();
        app.db
            .add_token(id, role, &tokens::digest(&token))
            .await
            .unwrap();
        token
    }

    fn request(
        method: &str,
        path: &str,
        token: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
    ) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(PROTOCOL_HEADER, "1")
            .header("Authorization", format!("Bearer {token}"));
        if let Some(t) = content_type {
            b = b.header("Content-Type", t);
        }
        b.body(body.into()).unwrap()
    }

    #[tokio::test]
    async fn axums_own_rejections_and_unknown_paths_are_api_errors() {
        let (_d, app) = test_app().await;
        let runner = token_of(&app, "volunteer", "runner").await;
        let alice = token_of(&app, "alice", "submitter").await;
        let json = Some("application/json");
        let cases: Vec<(axum::http::Request<Body>, u16, &str, &str)> = vec![
            (
                get("/api/v1/no/such/thing", Some(&alice), Some("1")),
                404,
                "not-found",
                "/api/v1/no/such/thing",
            ),
            // Unknown paths are answered alike whatever the caller says its protocol is.
            (get("/api/v1/nope", None, None), 404, "not-found", "nope"),
            (
                request(
                    "POST",
                    "/api/v1/runner/register",
                    &runner,
                    json,
                    "{not json",
                ),
                400,
                "bad-request",
                "JSON",
            ),
            (
                request(
                    "POST",
                    "/api/v1/runner/register",
                    &runner,
                    json,
                    r#"{"nom":"x"}"#,
                ),
                400,
                "bad-request",
                "nom",
            ),
            (
                request(
                    "POST",
                    "/api/v1/runner/register",
                    &runner,
                    None,
                    r#"{"name":"x"}"#,
                ),
                415,
                "bad-request",
                "Content-Type",
            ),
            (
                request(
                    "POST",
                    "/api/v1/runner/register",
                    &runner,
                    json,
                    format!(r#"{{"name":"{}"}}"#, "x".repeat(JSON_BODY_LIMIT)),
                ),
                413,
                "bad-request",
                "limit",
            ),
            (
                get("/api/v1/jobs/abc", Some(&alice), Some("1")),
                400,
                "bad-request",
                "abc",
            ),
            (
                get("/api/v1/jobs/1/log?offset=minus", Some(&alice), Some("1")),
                400,
                "bad-request",
                "offset",
            ),
            (
                request("DELETE", "/api/v1/jobs", &alice, None, Body::empty()),
                405,
                "bad-request",
                "does not take DELETE",
            ),
        ];
        for (req, status, code, said) in cases {
            let what = format!("{} {}", req.method(), req.uri());
            let resp = router(app.clone()).oneshot(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{what}");
            let headers = resp.headers().clone();
            assert_eq!(
                headers.get(PROTOCOL_HEADER).map(|v| v.to_str().unwrap()),
                Some("1"),
                "{what}"
            );
            assert!(is_json(&headers), "{what}: {headers:?}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let error: ApiError = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(error.error, code, "{what}: {error}");
            assert!(error.message.contains(said), "{what}: {error}");
            if status == 405 {
                let allow = headers.get(header::ALLOW).unwrap().to_str().unwrap();
                assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
            }
        }
        // What was already ours stays as it was; the document is served with the header too.
        let (status, body) = call(&app, get("/api/v1/whoami", None, Some("1"))).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (401, Some("unauthorized"))
        );
        let (status, body) = call(&app, get("/api/v1/openapi.json", None, None)).await;
        assert_eq!(status.as_u16(), 200);
        assert!(body["paths"].is_object(), "{body}");
    }

    #[tokio::test]
    async fn healthz_answers() {
        let (_d, app) = test_app().await;
        let resp = router(app)
            .oneshot(
                axum::http::Request::get("/healthz")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
}
