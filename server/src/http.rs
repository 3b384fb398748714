//! The HTTP side: `/healthz`, and the JSON API under `/api/v1/` with its protocol header (checked
//! on every request, sent on every response), bearer tokens, a size limit on every request body,
//! and refusals as [`ApiError`] bodies with a fitting status.

use crate::blobs::{BlobError, Blobs};
use crate::db::{Db, Identity};
use crate::service::{App, ApplyError, Shared};
use crate::settings::Settings;
use crate::tokens;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use construir_api::{ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, check_protocol, codes};

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

impl From<crate::db::DbError> for Refusal {
    fn from(e: crate::db::DbError) -> Self {
        tracing::error!("{e}");
        Refusal::new(
            codes::INTERNAL,
            "the server could not complete the request; try again",
        )
    }
}

/// The caller, from `Authorization: Bearer TOKEN`.
pub struct Caller(pub Identity);

impl FromRequestParts<Shared> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let unauthorized = |why: &str| Refusal::new(codes::UNAUTHORIZED, why.to_string());
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("no Authorization header (Authorization: Bearer TOKEN)"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| tokens::well_formed(t))
            .ok_or_else(|| unauthorized("the Authorization header holds no construir token"))?;
        let who = app
            .db
            .identify(&tokens::digest(token))
            .await?
            .ok_or_else(|| unauthorized("unknown or revoked token"))?;
        Ok(Caller(who))
    }
}

/// Refuses API requests without this protocol version, and says ours on every answer.
async fn protocol(request: Request, next: Next) -> Response {
    let theirs = request
        .headers()
        .get(PROTOCOL_HEADER)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let mut response = match check_protocol(theirs.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(e) => Refusal(ApiError::from(&e)).into_response(),
    };
    response.headers_mut().insert(
        PROTOCOL_HEADER,
        HeaderValue::from_str(&PROTOCOL_VERSION.to_string()).expect("digits"),
    );
    response
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

/// JSON request bodies larger than this are refused (job files, outputs and log pieces have
/// limits of their own).
pub const JSON_BODY_LIMIT: usize = 64 << 10;

pub fn router(app: Shared) -> Router {
    let api = Router::new()
        .route("/whoami", get(whoami))
        .merge(crate::api_jobs::routes())
        .merge(crate::api_runner::routes())
        // JSON bodies; job files, outputs and console pieces are streamed with limits of their own.
        .layer(axum::extract::DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(middleware::from_fn(protocol));
    Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
        .nest("/api/v1", api)
        .with_state(app)
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(settings: Settings, db: Db) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", settings.listen))?;
    let local = listener.local_addr()?;
    let blobs = Blobs::open_local(&settings.data)?;
    // The address on stdout (one line), for scripts that listen on port 0.
    println!("http://{local}");
    tracing::info!(
        "construir-server: serving on http://{local} (data {})",
        settings.data.display()
    );
    let app = App::new(settings, db, blobs);
    app.spawn_sweeper();
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("construir-server: stopping");
        })
        .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    pub(crate) async fn test_app() -> (tempfile::TempDir, Shared) {
        let d = tempfile::tempdir().unwrap();
        let settings = crate::settings::SettingArgs {
            data: Some(d.path().to_path_buf()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let db = Db::open_embedded(d.path()).await.unwrap();
        let blobs = Blobs::open_local(d.path()).unwrap();
        (d, App::new(settings, db, blobs))
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
