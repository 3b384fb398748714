//! The pull runner's HTTP side (docs/api.md, "Endpoints"): blocking requests with ureq, the
//! protocol header sent and checked on every exchange, refusals read as the API's error bodies,
//! and the rule that a runner speaks plain http:// only to its own host.
//!
//! Failures are sorted by what the caller can do about them ([`ApiFailure::is_transient`]): no
//! answer, a 5xx or a 429 are worth retrying later; a refusal is not; a server that speaks
//! another protocol version is the end of the runner. An answer without the protocol header is
//! not the server's (a proxy's, a load balancer's): it is [`ApiFailure::Foreign`], never taken
//! for a version mismatch or a lost lease.
//!
//! Proxies: https:// goes through `HTTPS_PROXY` (or `ALL_PROXY`; lower case too) unless
//! `NO_PROXY` names the server, so a volunteer behind a corporate proxy can run a runner; a
//! loopback server and plain http:// are never proxied (see [`proxy_for`]).
//!
//! What the server says is shown escaped ([`construir_contract::text::printable`]): a message
//! cannot forge the runner's log lines or drive its terminal.

use construir_api::{
    ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, ProtocolError, check_protocol, codes,
};
use construir_contract::text::printable;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Read;
use std::time::Duration;
/// The HTTP types of this client's calls (methods, responses).
pub use ureq::http;

/// The most bytes of a JSON answer read (the API's bodies are at most 64 KiB).
const MAX_JSON_ANSWER: u64 = 1 << 20;

/// The most of a foreign answer's body quoted in its error.
const FOREIGN_EXCERPT: usize = 300;

/// The header naming the runner on a claim.
pub const RUNNER_HEADER: &str = "Construir-Runner";

/// Why an exchange with the server did not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiFailure {
    /// No answer: the server is unreachable, the connection broke, a timeout.
    #[error("no answer from the server: {}", printable(.0))]
    Network(String),
    /// The server answered with a refusal.
    #[error("the server refused ({status}): {}", printable(&.error.to_string()))]
    Refused { status: u16, error: ApiError },
    /// An answer without the protocol header, so not the server's own: a proxy or a load
    /// balancer in front of it answered (a 502, a 403 of a filtering proxy, a 413 of a body
    /// limit, a 404 of a wrong path).
    #[error(
        "HTTP {status} from something in front of the server, not the server itself (no \
         {PROTOCOL_HEADER} header: a proxy?): {}",
        printable(.excerpt)
    )]
    Foreign { status: u16, excerpt: String },
    /// The answer is not in this runner's protocol version (or does not say).
    #[error("{}", printable(&.0.to_string()))]
    Protocol(ProtocolError),
    /// A successful answer whose body could not be read as expected.
    #[error("the server's answer could not be read: {}", printable(.0))]
    BadAnswer(String),
}

impl ApiFailure {
    /// Whether trying again later may work: no answer, the server's own failure, or too many
    /// requests (from the server, or from a proxy: then a timeout too).
    pub fn is_transient(&self) -> bool {
        match self {
            ApiFailure::Network(_) => true,
            ApiFailure::Refused { status, .. } => *status == 429 || *status >= 500,
            ApiFailure::Foreign { status, .. } => matches!(status, 408 | 429) || *status >= 500,
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

    /// Whether the server speaks another protocol version: its header says another, or its
    /// refusal says `protocol-mismatch`. Never for an answer without the header alone.
    pub fn is_protocol_mismatch(&self) -> bool {
        match self {
            ApiFailure::Protocol(_) => true,
            ApiFailure::Refused { error, .. } => error.error == codes::PROTOCOL_MISMATCH,
            _ => false,
        }
    }

    /// For a call about an attempt: whether the server no longer holds it for this runner
    /// (`lease-lost`; or its token is refused or it is unknown: an attempt's token dies with it).
    /// Only the server says so: a proxy's 404 is no lost lease.
    pub fn is_lease_lost(&self) -> bool {
        match self {
            ApiFailure::Refused { status, error } => {
                error.error == codes::LEASE_LOST || matches!(status, 401 | 404)
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

/// The proxy for a server at `base` (checked by [`server_base`]), from the environment as `env`
/// reads it: `HTTPS_PROXY`, then `ALL_PROXY` (either case), for https:// only, unless `NO_PROXY`
/// names the server. Never for a loopback server (a proxy would see its traffic; a test's server
/// would be unreachable through it) nor for plain http:// (only spoken to loopback, or with
/// `--insecure` on a network that is the volunteer's own: a proxy would read the token).
/// An unset or empty variable is no proxy; one that is not a proxy URL is an error.
pub fn proxy_for(
    base: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ureq::Proxy>, String> {
    let Ok(uri) = base.parse::<http::Uri>() else {
        return Ok(None);
    };
    let host = uri.host().unwrap_or_default();
    if uri.scheme_str() != Some("https") || is_loopback(host) {
        return Ok(None);
    }
    let first = |names: &[&'static str]| {
        names.iter().find_map(|name| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*name, v))
        })
    };
    if let Some((_, list)) = first(&["NO_PROXY", "no_proxy"]) {
        // ureq's own NO_PROXY rules (exact host, `.suffix`, `*.suffix`, `*`).
        let rules = list
            .split(',')
            .fold(
                ureq::Proxy::builder(ureq::ProxyProtocol::Http),
                |b, rule| b.no_proxy(rule.trim()),
            )
            .build()
            .map_err(|e| format!("NO_PROXY: {e}"))?;
        if rules.is_no_proxy(&uri) {
            return Ok(None);
        }
    }
    let Some((name, url)) = first(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]) else {
        return Ok(None);
    };
    // The value may hold a password: it is not quoted back.
    ureq::Proxy::new(url.trim())
        .map(Some)
        .map_err(|e| format!("{name} is not a proxy URL ({e})"))
}

/// The proxy for `base` from this process's environment; one that is not a proxy URL is said
/// and not used.
fn proxy_from_env(base: &str) -> Option<ureq::Proxy> {
    match proxy_for(base, |name| std::env::var(name).ok()) {
        Ok(proxy) => proxy,
        Err(why) => {
            tracing::warn!("{why}: connecting to {base} directly");
            None
        }
    }
}

/// What the runner says of its proxy, for its start-up line.
pub fn proxy_note(base: &str) -> Option<String> {
    proxy_from_env(base).map(|p| format!("through the proxy {}:{}", p.host(), p.port()))
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
            .proxy(proxy_from_env(&base))
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
        let wanted = (200..300).contains(&status) || also_ok.contains(&status);
        let protocol = response
            .headers()
            .get(PROTOCOL_HEADER)
            .map(|v| v.to_str().unwrap_or("(not text)").to_string());
        let Some(protocol) = protocol else {
            if wanted {
                // A construir server says its version on every answer.
                return Err(ApiFailure::Protocol(ProtocolError::Missing));
            }
            return Err(foreign(status, &read_capped(&mut response)));
        };
        if let Err(e) = check_protocol(Some(&protocol)) {
            return Err(ApiFailure::Protocol(e));
        }
        if wanted {
            return Ok(response);
        }
        let text = read_capped(&mut response);
        let error = serde_json::from_slice::<ApiError>(&text).unwrap_or_else(|_| {
            ApiError::new(
                &format!("http-{status}"),
                String::from_utf8_lossy(&text[..text.len().min(FOREIGN_EXCERPT)]).into_owned(),
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

/// An error answer's body, at most [`MAX_JSON_ANSWER`] bytes (what cannot be read is left).
fn read_capped(response: &mut http::Response<ureq::Body>) -> Vec<u8> {
    response
        .body_mut()
        .with_config()
        .limit(MAX_JSON_ANSWER)
        .read_to_vec()
        .unwrap_or_default()
}

/// A non-2xx answer without the protocol header: not the server's, unless its body is the
/// server's own refusal of this runner's protocol version.
fn foreign(status: u16, body: &[u8]) -> ApiFailure {
    if let Ok(error) = serde_json::from_slice::<ApiError>(body)
        && error.error == codes::PROTOCOL_MISMATCH
    {
        return ApiFailure::Refused { status, error };
    }
    let text = String::from_utf8_lossy(body);
    let mut end = text.trim().len().min(FOREIGN_EXCERPT);
    while !text.trim().is_char_boundary(end) {
        end -= 1;
    }
    ApiFailure::Foreign {
        status,
        excerpt: text.trim()[..end].to_string(),
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

    /// A loopback server answering one connection per canned answer (status, protocol
    /// header, body), in order.
    fn canned(answers: Vec<(u16, Option<&'static str>, &'static str)>) -> Client {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for (status, protocol, body) in answers {
                let (conn, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut request_body = vec![0; length];
                reader.read_exact(&mut request_body).unwrap();
                let header = protocol
                    .map(|p| format!("{PROTOCOL_HEADER}: {p}\r\n"))
                    .unwrap_or_default();
                let answer = format!(
                    "HTTP/1.1 {status} X\r\n{header}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                (&conn).write_all(answer.as_bytes()).unwrap();
            }
        });
        Client::new(base)
    }

    fn call(client: &Client) -> Result<(), ApiFailure> {
        client
            .exchange(http::Method::POST, "/x", "t", &[], Payload::None, &[])
            .map(drop)
    }

    #[test]
    fn answers_without_the_protocol_header_are_not_taken_for_the_servers() {
        let client = canned(vec![
            (403, None, "<html>blocked by the corporate proxy</html>"),
            (404, None, "<html>not found</html>"),
            (413, None, "<html>request entity too large</html>"),
            (502, None, "<html>bad gateway</html>"),
            (429, None, ""),
            (
                400,
                None,
                r#"{"error":"protocol-mismatch","message":"speak 2"}"#,
            ),
            (
                400,
                Some("2"),
                r#"{"error":"protocol-mismatch","message":"x"}"#,
            ),
            (200, None, "{}"),
            (
                404,
                Some("1"),
                r#"{"error":"not-found","message":"no attempt"}"#,
            ),
        ]);
        let e = call(&client).unwrap_err();
        assert!(matches!(e, ApiFailure::Foreign { status: 403, .. }), "{e}");
        assert!(!e.is_protocol_mismatch() && !e.is_transient() && !e.is_lease_lost());
        let text = e.to_string();
        assert!(
            text.contains("HTTP 403") && text.contains("proxy") && text.contains("corporate"),
            "{text}"
        );
        let e = call(&client).unwrap_err();
        assert!(
            !e.is_lease_lost(),
            "a proxy's 404 does not drop the attempt: {e}"
        );
        let e = call(&client).unwrap_err();
        assert!(matches!(e, ApiFailure::Foreign { status: 413, .. }) && !e.is_transient());
        let e = call(&client).unwrap_err();
        assert!(e.is_transient() && !e.is_protocol_mismatch(), "{e}");
        assert!(call(&client).unwrap_err().is_transient(), "a proxy's 429");
        let e = call(&client).unwrap_err();
        assert!(e.is_protocol_mismatch(), "the server's own word: {e}");
        let e = call(&client).unwrap_err();
        assert!(
            matches!(
                e,
                ApiFailure::Protocol(ProtocolError::Mismatch { theirs: 2 })
            ),
            "{e}"
        );
        let e = call(&client).unwrap_err();
        assert!(
            matches!(e, ApiFailure::Protocol(ProtocolError::Missing)),
            "a success must say its version: {e}"
        );
        let e = call(&client).unwrap_err();
        assert!(e.is_lease_lost() && !e.is_protocol_mismatch(), "{e}");
    }

    #[test]
    fn what_the_server_says_is_shown_escaped() {
        let hostile = "ok\n2026-01-01T00:00:00Z INFO attempt 1: reported success\x1b]0;owned\x07";
        let failures = [
            ApiFailure::Refused {
                status: 409,
                error: ApiError::new("lease-lost", hostile),
            },
            ApiFailure::Foreign {
                status: 403,
                excerpt: hostile.into(),
            },
            ApiFailure::Network(hostile.into()),
            ApiFailure::BadAnswer(hostile.into()),
        ];
        for e in failures {
            let text = e.to_string();
            assert!(
                !text.contains('\n') && !text.contains('\x1b') && !text.contains('\x07'),
                "{text:?}"
            );
            assert!(text.contains("ok\\x0a2026"), "{text:?}");
        }
    }

    #[test]
    fn https_goes_through_the_proxy_loopback_and_plain_http_never() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let all: &[(&str, &str)] = &[
            ("HTTPS_PROXY", "http://proxy.corp:3128"),
            ("HTTP_PROXY", "http://plain.corp:3128"),
            ("ALL_PROXY", "http://all.corp:1080"),
        ];
        let p = proxy_for("https://farm.example.org", env(all))
            .unwrap()
            .expect("https to another host goes through HTTPS_PROXY");
        assert_eq!((p.host(), p.port()), ("proxy.corp", 3128));
        for direct in [
            "https://localhost:8443",
            "https://127.0.0.1",
            "https://[::1]:8443",
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://10.0.0.1:8080",
        ] {
            assert!(
                proxy_for(direct, env(all)).unwrap().is_none(),
                "{direct} is never proxied"
            );
        }
        let p = proxy_for(
            "https://farm.example.org",
            env(&[("https_proxy", ""), ("all_proxy", "socks5://all.corp:1080")]),
        );
        // An empty variable is unset; ALL_PROXY is the fallback (socks needs a feature
        // ureq is built without here, so it is refused, never silently ignored).
        match p {
            Ok(Some(p)) => assert_eq!(p.host(), "all.corp"),
            Ok(None) => panic!("ALL_PROXY was ignored"),
            Err(why) => assert!(why.contains("all_proxy"), "{why}"),
        }
        let p = proxy_for(
            "https://farm.example.org",
            env(&[("ALL_PROXY", "http://all.corp:1080")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.host(), "all.corp");
        for no in ["farm.example.org", ".example.org", "*.example.org", "x, *"] {
            let vars: &'static [(&'static str, &'static str)] = match no {
                "farm.example.org" => &[
                    ("HTTPS_PROXY", "http://p:1"),
                    ("NO_PROXY", "farm.example.org"),
                ],
                ".example.org" => &[("HTTPS_PROXY", "http://p:1"), ("no_proxy", ".example.org")],
                "*.example.org" => &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*.example.org")],
                _ => &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "x, *")],
            };
            assert!(
                proxy_for("https://farm.example.org", env(vars))
                    .unwrap()
                    .is_none(),
                "NO_PROXY={no}"
            );
        }
        assert!(
            proxy_for(
                "https://farm.example.org",
                env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "other.org")])
            )
            .unwrap()
            .is_some()
        );
        let e = proxy_for(
            "https://farm.example.org",
            env(&[("HTTPS_PROXY", "http://user:secret@[bad")]),
        )
        .unwrap_err();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("secret"), "{e}");
        assert!(
            proxy_for("https://farm.example.org", env(&[]))
                .unwrap()
                .is_none()
        );
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
