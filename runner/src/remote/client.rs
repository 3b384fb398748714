//! The pull runner's HTTP side (docs/api.md, "Endpoints"): blocking requests with ureq, the
//! protocol header sent and checked on every exchange, refusals read as the API's error bodies,
//! and the rule that a runner speaks plain http:// only to its own host.
//!
//! Failures are sorted by what the caller can do about them ([`ApiFailure::is_transient`]): no
//! answer, a 5xx or a 429 are worth retrying later; a refusal is not; a server that speaks
//! another protocol version is the end of the runner.

use construir_api::{ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, ProtocolError, check_protocol};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::time::Duration;
/// The HTTP types of this client's calls (methods, responses).
pub use ureq::http;

/// The most bytes of a JSON answer read (the API's bodies are at most 64 KiB).
const MAX_JSON_ANSWER: u64 = 1 << 20;

/// The header naming the runner on a claim.
pub const RUNNER_HEADER: &str = "Construir-Runner";

/// Why an exchange with the server did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// No answer: the server is unreachable, the connection broke, a timeout.
    #[error("no answer from the server: {0}")]
    Network(String),
    /// The server answered with a refusal.
    #[error("the server refused ({status}): {error}")]
    Refused { status: u16, error: ApiError },
    /// The answer is not in this runner's protocol version (or does not say).
    #[error("{0}")]
    Protocol(ProtocolError),
    /// A successful answer whose body could not be read as expected.
    #[error("the server's answer could not be read: {0}")]
    BadAnswer(String),
}

impl ApiFailure {
    /// Whether trying again later may work: no answer, the server's own failure, or too many
    /// requests.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiFailure::Network(_) => true,
            ApiFailure::Refused { status, .. } => *status == 429 || *status >= 500,
            ApiFailure::Protocol(_) | ApiFailure::BadAnswer(_) => false,
        }
    }

    /// The refusal's error code (`lease-lost`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiFailure::Refused { error, .. } => Some(&error.error),
            _ => None,
        }
    }

    /// For a call about an attempt: whether the server no longer holds it for this runner
    /// (`lease-lost`; or its token is refused or it is unknown: an attempt's token dies with it).
    pub fn is_lease_lost(&self) -> bool {
        match self {
            ApiFailure::Refused { status, error } => {
                error.error == construir_api::codes::LEASE_LOST || matches!(status, 401 | 404)
            }
            _ => false,
        }
    }
}

/// Why a server URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("--server {0:?} is not a URL (expected https://HOST[:PORT][/PATH])")]
    NotAUrl(String),
    #[error("--server {0:?}: only https:// (or http:// to this host) is spoken")]
    Scheme(String),
    #[error(
        "--server {0:?}: plain http:// to another host would send the runner's token and jobs in \
         clear; use https://, or --insecure if the network between is yours"
    )]
    Insecure(String),
    #[error("--server {0:?}: no query or fragment, please")]
    Extra(String),
}

/// Checks a server URL and returns its base, without a trailing `/`: https:// anywhere;
/// http:// only to a loopback host (`localhost`, 127.0.0.0/8, `::1`) unless `insecure`.
pub fn server_base(url: &str, insecure: bool) -> Result<String, UrlError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| UrlError::NotAUrl(url.to_string()))?;
    let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(UrlError::NotAUrl(url.to_string()));
    };
    if uri.query().is_some() || url.contains('#') {
        return Err(UrlError::Extra(url.to_string()));
    }
    match scheme {
        "https" => {}
        "http" if insecure || is_loopback(host) => {}
        "http" => return Err(UrlError::Insecure(url.to_string())),
        _ => return Err(UrlError::Scheme(url.to_string())),
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Whether `host` (as a URL spells it) is this machine's loopback.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A request body.
pub enum Payload<'a> {
    None,
    Json(Vec<u8>),
    /// Raw bytes (a log piece).
    Bytes(&'a [u8]),
    /// `len` bytes from a reader (an output upload), sent with that Content-Length.
    Reader {
        len: u64,
        reader: &'a mut dyn Read,
    },
}

/// The server and the credentials of the runner.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    /// A client of the server at `base` (checked by [`server_base`]).
    pub fn new(base: String) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Never follow the server elsewhere (to http://, to another host).
            .max_redirects(0)
            .user_agent(format!(
                "construir-runner/{} (protocol {PROTOCOL_VERSION})",
                env!("CARGO_PKG_VERSION")
            ))
            .timeout_connect(Some(Duration::from_secs(15)))
            // Per operation, not per request: a job or output of gigabytes takes as long as it
            // takes, a stalled connection does not. A long poll answers within ~25 s.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .timeout_per_write(Some(Duration::from_secs(60)))
            .timeout_recv_response(Some(Duration::from_secs(90)))
            .build();
        Client {
            agent: config.into(),
            base,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Stops every exchange in flight on this client and its clones (they fail at once): the
    /// runner's shutdown cuts its idle long polls with it.
    pub fn shutdown(&self) {
        self.agent.clone().shutdown();
    }

    /// One exchange: `method` on `path` (below the base) with `token`. Answers with a 2xx status,
    /// or one of `also_ok`, are returned; any other is a [`ApiFailure::Refused`].
    pub fn exchange(
        &self,
        method: http::Method,
        path: &str,
        token: &str,
        headers: &[(&str, String)],
        payload: Payload<'_>,
        also_ok: &[u16],
    ) -> Result<http::Response<ureq::Body>, ApiFailure> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("Authorization", format!("Bearer {token}"));
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        // Every body is sent from a reader, with its length: the borrowed upload and the owned
        // JSON alike (SendBody's lifetime is invariant, so the arms cannot mix kinds).
        let mut json: std::io::Cursor<Vec<u8>>;
        let mut bytes_left: &[u8];
        let mut nothing = std::io::empty();
        let (len, content_type, reader): (u64, Option<&str>, &mut dyn Read) = match payload {
            Payload::None => (0, None, &mut nothing),
            Payload::Json(bytes) => {
                json = std::io::Cursor::new(bytes);
                (
                    json.get_ref().len() as u64,
                    Some("application/json"),
                    &mut json,
                )
            }
            Payload::Bytes(bytes) => {
                bytes_left = bytes;
                (
                    bytes.len() as u64,
                    Some("application/octet-stream"),
                    &mut bytes_left,
                )
            }
            Payload::Reader { len, reader } => (len, Some("application/octet-stream"), reader),
        };
        builder = builder.header("Content-Length", len.to_string());
        if let Some(t) = content_type {
            builder = builder.header("Content-Type", t);
        }
        let body = ureq::SendBody::from_reader(reader);
        let request = builder
            .body(body)
            .map_err(|e| ApiFailure::Network(format!("cannot make the request: {e}")))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| ApiFailure::Network(e.to_string()))?;
        let status = response.status().as_u16();
        let protocol = response
            .headers()
            .get(PROTOCOL_HEADER)
            .map(|v| v.to_str().unwrap_or("(not text)"));
        if let Err(e) = check_protocol(protocol) {
            // A proxy's own 502 page carries no header: a server not reached, not one that
            // speaks another version.
            if protocol.is_none() && status >= 500 {
                return Err(ApiFailure::Refused {
                    status,
                    error: ApiError::new(
                        construir_api::codes::INTERNAL,
                        format!("HTTP {status} without the {PROTOCOL_HEADER} header (a proxy?)"),
                    ),
                });
            }
            return Err(ApiFailure::Protocol(e));
        }
        if (200..300).contains(&status) || also_ok.contains(&status) {
            return Ok(response);
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_JSON_ANSWER)
            .read_to_vec()
            .unwrap_or_default();
        let error = serde_json::from_slice::<ApiError>(&text).unwrap_or_else(|_| {
            ApiError::new(
                &format!("http-{status}"),
                String::from_utf8_lossy(&text[..text.len().min(300)]).into_owned(),
            )
        });
        Err(ApiFailure::Refused { status, error })
    }

    /// A JSON request answered with JSON (or, with `None`, by 204).
    pub fn json<T: DeserializeOwned>(
        &self,
        method: http::Method,
        path: &str,
        token: &str,
        headers: &[(&str, String)],
        body: &impl Serialize,
    ) -> Result<Option<T>, ApiFailure> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialize");
        let response = self.exchange(method, path, token, headers, Payload::Json(bytes), &[])?;
        read_json(response)
    }
}

/// Reads a JSON answer (`None` for 204 No Content).
pub fn read_json<T: DeserializeOwned>(
    mut response: http::Response<ureq::Body>,
) -> Result<Option<T>, ApiFailure> {
    if response.status().as_u16() == 204 {
        return Ok(None);
    }
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_JSON_ANSWER)
        .read_to_vec()
        .map_err(|e| ApiFailure::Network(e.to_string()))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| ApiFailure::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_anywhere_http_only_to_this_host() {
        for ok in [
            "https://farm.example.org",
            "https://farm.example.org:8443/construir/",
            "http://localhost:8080",
            "http://127.0.0.1:9",
            "http://127.1.2.3",
            "http://[::1]:8080",
        ] {
            assert!(server_base(ok, false).is_ok(), "{ok}");
        }
        assert_eq!(
            server_base("https://farm.example.org/c/", false).unwrap(),
            "https://farm.example.org/c"
        );
        for refused in [
            "http://farm.example.org",
            "http://10.0.0.1:8080",
            "http://localhost.example.org",
            "http://[::2]",
        ] {
            assert!(
                matches!(server_base(refused, false), Err(UrlError::Insecure(_))),
                "{refused}"
            );
            assert!(server_base(refused, true).is_ok(), "{refused} --insecure");
        }
        for bad in [
            "farm.example.org",
            "",
            "ftp://x",
            "https://x/?a=b",
            "https://x/#f",
        ] {
            assert!(server_base(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn failures_are_sorted_by_what_can_be_done() {
        let refused = |status, code: &str| ApiFailure::Refused {
            status,
            error: ApiError::new(code, ""),
        };
        assert!(ApiFailure::Network("reset".into()).is_transient());
        assert!(refused(500, "internal").is_transient());
        assert!(refused(429, "too-many-requests").is_transient());
        assert!(!refused(409, "lease-lost").is_transient());
        assert!(refused(409, "lease-lost").is_lease_lost());
        assert!(!refused(409, "wrong-state").is_lease_lost());
        assert!(
            refused(401, "unauthorized").is_lease_lost(),
            "its token died with it"
        );
        assert!(!ApiFailure::Protocol(ProtocolError::Missing).is_transient());
    }
}
