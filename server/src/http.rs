//! The HTTP side: `/healthz`, and the JSON API under `/api/v1/` with its protocol header (checked
//! on every request, sent on every response), bearer tokens, a size limit on every request body,
//! and refusals as [`ApiError`] bodies with a fitting status.

use crate::blobs::{BlobError, Blobs};
use crate::db::{Db, Identity};
use crate::polls::Polls;
use crate::service::{App, ApplyError, Shared};
use crate::settings::Settings;
use crate::tokens;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use construir_api::{ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, check_protocol, codes};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
        .merge(crate::api_runner::routes())
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
        .nest("/api/v1", api)
        .with_state(app)
}

/// How the server holds up against slow and greedy clients: flags and `CONSTRUIR_SERVER_*`
/// variables.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// Connections served at once; more wait in the kernel's backlog (default 4096).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How long a client has to send a request's head, and how long an idle connection is kept
    /// (default 20s).
    #[arg(long, env = "CONSTRUIR_SERVER_HEADER_TIMEOUT", value_parser = crate::settings::parse_secs)]
    pub header_timeout: Option<u64>,
    /// The slowest a request body may arrive, in bytes a second, after --body-grace (default 8K):
    /// an upload of any size that keeps this pace is never cut.
    #[arg(long, env = "CONSTRUIR_SERVER_MIN_BODY_RATE", value_parser = construir_launcher::size::parse_size)]
    pub min_body_rate: Option<u64>,
    /// The head start a request body gets before --min-body-rate counts (default 30s).
    #[arg(long, env = "CONSTRUIR_SERVER_BODY_GRACE", value_parser = crate::settings::parse_secs)]
    pub body_grace: Option<u64>,
    /// Long polls (claims, followed logs) one token may hold open at once (default 64).
    #[arg(long, env = "CONSTRUIR_SERVER_MAX_POLLS_PER_TOKEN")]
    pub max_polls_per_token: Option<usize>,
}

/// [`ServeArgs`] in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub min_body_rate: u64,
    pub body_grace: Duration,
    pub max_polls_per_token: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 4096,
            header_timeout: Duration::from_secs(20),
            min_body_rate: 8 << 10,
            body_grace: Duration::from_secs(30),
            max_polls_per_token: crate::polls::DEFAULT_MAX_PER_TOKEN,
        }
    }
}

impl ServeArgs {
    pub fn resolve(&self) -> ServeLimits {
        let d = ServeLimits::default();
        ServeLimits {
            max_connections: self.max_connections.unwrap_or(d.max_connections).max(1),
            header_timeout: self
                .header_timeout
                .map_or(d.header_timeout, |s| Duration::from_secs(s.max(1))),
            min_body_rate: self.min_body_rate.unwrap_or(d.min_body_rate).max(1),
            body_grace: self.body_grace.map_or(d.body_grace, Duration::from_secs),
            max_polls_per_token: self
                .max_polls_per_token
                .unwrap_or(d.max_polls_per_token)
                .max(1),
        }
    }
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(settings: Settings, limits: ServeLimits, db: Db) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen on {}: {e}", settings.listen))?;
    let local = listener.local_addr()?;
    let blobs = Blobs::open_local(&settings.data)?;
    // The address on stdout (one line), for scripts that listen on port 0.
    println!("http://{local}");
    tracing::info!(
        "construir-server: serving on http://{local} (data {}; at most {} connections)",
        settings.data.display(),
        limits.max_connections
    );
    let app = App::new(settings, db, blobs);
    app.spawn_sweeper();
    let routes = router_with(app, Polls::new(limits.max_polls_per_token));
    serve_on(listener, routes, limits, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("construir-server: stopping");
    })
    .await;
    Ok(())
}

/// How long a stop waits for the requests in flight (long polls end within 30 s).
const DRAIN: Duration = Duration::from_secs(35);

/// Serves `routes` on `listener` with hyper's HTTP/1.1 server until `shutdown`, then lets the
/// requests in flight end (for at most [`DRAIN`]). Against slow clients: at most
/// `max_connections` at once (the next waits in the backlog until one ends), a request head
/// must arrive within `header_timeout` (an idle kept-alive connection is closed after as long),
/// and a body must keep [`MinRate`]'s pace. Long polls are not affected: once a request is read,
/// its handler takes the time it takes.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    routes: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let pace = Pace {
        grace: limits.body_grace,
        bytes_per_s: limits.min_body_rate,
    };
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, a connection reset before it was taken: wait, go on.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let routes = routes.clone();
        let service = hyper::service::service_fn(move |request: axum::http::Request<Incoming>| {
            let request = request.map(|body| Body::new(MinRate::new(body, pace)));
            routes.clone().oneshot(request)
        });
        let connection = graceful.watch(http1.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("construir-server: requests still open after {DRAIN:?}; stopping anyway");
    }
}

/// The slowest pace a request body may keep: `bytes_per_s` on average, after `grace`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub grace: Duration,
    pub bytes_per_s: u64,
}

/// A request body too slow for its [`Pace`].
#[derive(Debug, thiserror::Error)]
#[error("the request body arrives slower than {0} bytes a second")]
pub struct TooSlow(u64);

/// A request body that fails once it falls behind its [`Pace`]: by `grace + received /
/// bytes_per_s` after its first read it must have sent `received` bytes and more, so an upload
/// of any size that keeps the pace is never cut, and a client that trickles bytes to hold a
/// connection is. The clock starts at the handler's first read (a body the server is slow to
/// read is not the client's fault).
pub struct MinRate<B> {
    inner: B,
    pace: Pace,
    received: u64,
    /// From the first read: when it started, and the time by which more must have come.
    clock: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
}

impl<B> MinRate<B> {
    pub fn new(inner: B, pace: Pace) -> Self {
        MinRate {
            inner,
            pace,
            received: 0,
            clock: None,
        }
    }
}

/// When a body that started at `started` and has sent `received` bytes must have sent more.
fn due(pace: Pace, started: tokio::time::Instant, received: u64) -> tokio::time::Instant {
    let credit = Duration::from_secs_f64(received as f64 / pace.bytes_per_s.max(1) as f64);
    started + pace.grace + credit.min(Duration::from_secs(365 * 86400))
}

impl<B> HttpBody for MinRate<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let pace = this.pace;
        let (started, deadline) = this.clock.get_or_insert_with(|| {
            let now = tokio::time::Instant::now();
            (now, Box::pin(tokio::time::sleep_until(due(pace, now, 0))))
        });
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    deadline.as_mut().reset(due(pace, *started, this.received));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(TooSlow(pace.bytes_per_s))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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

    async fn token_of(app: &Shared, user: &str, role: &str) -> String {
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

    /// A server on 127.0.0.1 with `limits`; dropping the sender stops it.
    async fn live_server(
        limits: ServeLimits,
    ) -> (
        tempfile::TempDir,
        Shared,
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (d, app) = test_app().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let routes = router_with(app.clone(), Polls::new(limits.max_polls_per_token));
        tokio::spawn(serve_on(listener, routes, limits, async {
            let _ = stopped.await;
        }));
        (d, app, addr, stop)
    }

    /// Reads what the server sends until it closes the connection (at most `within`): the
    /// bytes, or `None` if it was still open then.
    async fn read_to_close(conn: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let read = tokio::time::timeout(within, async {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        read.ok().map(|()| got)
    }

    async fn send_raw(conn: &mut tokio::net::TcpStream, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        conn.write_all(bytes).await.unwrap();
        conn.flush().await.unwrap();
    }

    fn status_of(answer: &[u8]) -> u16 {
        let text = String::from_utf8_lossy(answer);
        text.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"))
    }

    #[tokio::test]
    async fn a_client_that_sends_half_a_head_is_dropped_within_the_header_timeout() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(400),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        for half in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "[..],
            b"G",
            b"",
        ] {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            send_raw(&mut conn, half).await;
            let t = std::time::Instant::now();
            let got = read_to_close(&mut conn, Duration::from_secs(5)).await;
            assert!(got.is_some(), "{half:?}: still open after 5 s");
            assert!(
                t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3),
                "{half:?}: closed after {:?}",
                t.elapsed()
            );
        }
        // A whole request on a fresh connection is answered as ever.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(
            &mut conn,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 200);
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_one_to_end() {
        let limits = ServeLimits {
            max_connections: 1,
            header_timeout: Duration::from_millis(800),
            ..ServeLimits::default()
        };
        let (_d, _app, addr, _stop) = live_server(limits).await;
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(
            &mut next,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let got = read_to_close(&mut next, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 200);
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "answered after {:?}, while the only connection allowed was held",
            t.elapsed()
        );
        assert!(
            read_to_close(&mut idle, Duration::from_secs(1))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_and_a_slow_one_that_keeps_its_pace_is_not() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(300),
            body_grace: Duration::from_millis(300),
            min_body_rate: 1000,
            ..ServeLimits::default()
        };
        let (_d, app, addr, _stop) = live_server(limits).await;
        let runner = token_of(&app, "volunteer", "runner").await;
        let head = |len: usize| {
            format!(
                "POST /api/v1/runner/register HTTP/1.1\r\nHost: x\r\nConstruir-Protocol: 1\r\n\
                 Authorization: Bearer {runner}\r\nContent-Type: application/json\r\n\
                 Content-Length: {len}\r\nConnection: close\r\n\r\n"
            )
        };
        // 10 bytes of 100, then nothing.
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(&mut conn, head(100).as_bytes()).await;
        send_raw(&mut conn, br#"{"name": "#).await;
        let t = std::time::Instant::now();
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .expect("the stalled request was cut");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status_of(&got), 400, "{text}");
        assert!(
            text.contains("bad-request") && text.contains("slower"),
            "{text}"
        );
        // 3000 bytes at 3000 a second: well past the grace, never behind the pace; and the
        // header timeout does not cut a request whose head has come.
        let body = format!(r#"{{"name": "home"{}}}"#, " ".repeat(3000 - 16));
        assert_eq!(body.len(), 3000);
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        send_raw(&mut conn, head(body.len()).as_bytes()).await;
        for piece in body.as_bytes().chunks(150) {
            send_raw(&mut conn, piece).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = read_to_close(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 200, "{}", String::from_utf8_lossy(&got));
        assert!(String::from_utf8_lossy(&got).contains("runner_id"));
    }

    #[tokio::test]
    async fn a_long_poll_outlasts_the_header_timeout() {
        let limits = ServeLimits {
            header_timeout: Duration::from_millis(300),
            body_grace: Duration::from_millis(300),
            ..ServeLimits::default()
        };
        let (_d, app, addr, _stop) = live_server(limits).await;
        let token = token_of(&app, "volunteer", "runner").await;
        let user = app.db.ensure_user("volunteer").await.unwrap();
        let runner = app.db.register_runner(user, "home").await.unwrap();
        let claim = serde_json::json!({"wait_s": 2, "capabilities": {
            "arch": "x86_64", "backend": "qemu", "host_kind": "emulated", "images": ["t0"],
            "max_memory_mib": 4096, "max_vcpus": 4, "max_timeout_s": 7200,
            "max_job_size": 1u64 << 30, "max_output_size": 1u64 << 30,
            "free_slots": 1, "free_memory_mib": 4096}})
        .to_string();
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /api/v1/runner/claim HTTP/1.1\r\nHost: x\r\nConstruir-Protocol: 1\r\n\
             Authorization: Bearer {token}\r\nConstruir-Runner: {runner}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{claim}",
            claim.len()
        );
        send_raw(&mut conn, request.as_bytes()).await;
        let t = std::time::Instant::now();
        let got = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(status_of(&got), 204, "{}", String::from_utf8_lossy(&got));
        assert!(
            t.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn serve_settings_have_sane_defaults_and_floors() {
        let d = ServeArgs::default().resolve();
        assert_eq!(d, ServeLimits::default());
        assert!(
            d.max_connections > 1000,
            "1,000 idle long-polling runners fit"
        );
        let zero = ServeArgs {
            max_connections: Some(0),
            header_timeout: Some(0),
            min_body_rate: Some(0),
            body_grace: Some(0),
            max_polls_per_token: Some(0),
        }
        .resolve();
        assert_eq!(
            (
                zero.max_connections,
                zero.header_timeout,
                zero.min_body_rate,
                zero.max_polls_per_token
            ),
            (1, Duration::from_secs(1), 1, 1)
        );
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
