//! A small typed wrapper around ureq for the construir API: every request carries
//! `Construir-Protocol: 1` and the bearer token; every answer's protocol header is checked with
//! [`check_protocol`]; refusals (`ApiError` bodies) become [`HttpError::Refused`] with their code
//! and message. Only idempotent GETs are retried, and only when the connection failed: a POST
//! that may have reached the server is never sent twice.

use crate::config::ServerUrl;
use crate::exit;
use construir_api::{ApiError, PROTOCOL_HEADER, PROTOCOL_VERSION, check_protocol, codes};
use serde::de::DeserializeOwned;
use std::time::Duration;
use ureq::http::Response;
use ureq::{Agent, Body};

/// How often a GET is tried when the connection fails.
const TRIES: u32 = 5;
/// The most bytes of a JSON answer read (a long job list is the largest).
pub const JSON_LIMIT: u64 = 64 << 20;
/// The most bytes of an error body read: it is one short JSON object.
const ERROR_LIMIT: u64 = 64 << 10;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server refused the request (a 4xx answer), with the `ApiError` code when it sent one.
    #[error("{what}: refused by the server ({status}{}): {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Refused {
        what: String,
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// The server (or something in front of it) failed: a 5xx answer.
    #[error("{what}: the server failed ({status}): {message}")]
    ServerFailed {
        what: String,
        status: u16,
        message: String,
    },
    /// No answer: the connection, TLS or a timeout failed.
    #[error("{what}: cannot reach {server}")]
    Unreachable {
        what: String,
        server: String,
        #[source]
        source: ureq::Error,
    },
    /// An answer this client cannot take: another protocol version, no protocol header, a body
    /// that is not what the API says.
    #[error("{what}: {message}")]
    Protocol { what: String, message: String },
}

impl HttpError {
    /// The client's exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            HttpError::Refused { .. } => exit::REFUSED,
            HttpError::ServerFailed { .. } | HttpError::Unreachable { .. } => exit::UNREACHABLE,
            HttpError::Protocol { .. } => exit::USAGE,
        }
    }
}

/// Whether a failed request never got an answer, so that a GET may be sent again.
pub fn is_connection_error(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_)
    )
}

/// The wait before the next try after `tries` failed ones: 0.5 s, 1 s, 2 s, 4 s (at most 8 s).
pub fn backoff(tries: u32) -> Duration {
    Duration::from_millis(500u64 << tries.min(4)).min(Duration::from_secs(8))
}

/// A connection to one server with one token.
pub struct Api {
    agent: Agent,
    base: String,
    auth: String,
}

impl Api {
    pub fn new(server: &ServerUrl, token: &str) -> Self {
        let mut config = Agent::config_builder()
            // Refusals are answers: their bodies are read, not turned into bare status errors.
            .http_status_as_error(false)
            // The API does not redirect; a redirect is reported, never followed with the token.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(15)))
            // Long polls hold an answer up to 30 s; past a minute of silence the server is gone.
            .timeout_per_read(Some(Duration::from_secs(75)))
            .timeout_per_write(Some(Duration::from_secs(75)))
            .user_agent(format!("construir/{}", env!("CARGO_PKG_VERSION")));
        if !server.tls {
            // Plain http goes to loopback (or where --insecure said): a proxy from the
            // environment would carry the token in the clear to somewhere else.
            config = config.proxy(None);
        }
        Api {
            agent: config.build().into(),
            base: server.base.clone(),
            auth: format!("Bearer {token}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET `path` (with its query): a 2xx answer whose protocol header is right, its body not
    /// read yet. Retried with back-off while the connection fails.
    pub fn get(&self, path: &str) -> Result<Response<Body>, HttpError> {
        self.retrying(path, &mut |what| {
            let resp = self.send_get(path)?;
            Ok(check(what, resp))
        })?
    }

    /// GET `path` and its whole body (at most `limit` bytes), with the answer's headers; the
    /// request and the body's read are retried together, so a connection lost mid-answer is
    /// tried again too.
    pub fn get_bytes(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<(ureq::http::HeaderMap, Vec<u8>), HttpError> {
        self.retrying(path, &mut |what| {
            let resp = self.send_get(path)?;
            let mut resp = match check(what, resp) {
                Ok(resp) => resp,
                Err(e) => return Ok(Err(e)),
            };
            let body = resp.body_mut().with_config().limit(limit).read_to_vec()?;
            Ok(Ok((resp.headers().clone(), body)))
        })?
    }

    fn send_get(&self, path: &str) -> Result<Response<Body>, ureq::Error> {
        self.agent
            .get(self.url(path))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("Authorization", &self.auth)
            .call()
    }

    /// Runs `once` until it gets an answer (an `Ok`), sleeping between tries while it fails to
    /// connect (an `Err` with a connection error), at most [`TRIES`] times.
    fn retrying<T>(
        &self,
        path: &str,
        once: &mut dyn FnMut(&str) -> Result<T, ureq::Error>,
    ) -> Result<T, HttpError> {
        let what = format!("GET {path}");
        let mut tries = 0;
        loop {
            match once(&what) {
                Ok(answer) => return Ok(answer),
                Err(e) if is_connection_error(&e) && tries + 1 < TRIES => {
                    let wait = backoff(tries);
                    eprintln!(
                        "construir: {what}: cannot reach {} ({e}); trying again in {:.1} s",
                        self.base,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                    tries += 1;
                }
                Err(ureq::Error::BodyExceedsLimit(limit)) => {
                    return Err(HttpError::Protocol {
                        what,
                        message: format!("the answer is larger than the {limit} bytes expected"),
                    });
                }
                Err(source) => {
                    return Err(HttpError::Unreachable {
                        what,
                        server: self.base.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// POST `path` with no body (never retried).
    pub fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, HttpError> {
        let what = format!("POST {path}");
        let sent = self
            .agent
            .post(self.url(path))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("Authorization", &self.auth)
            .send_empty()
            .map_err(|source| HttpError::Unreachable {
                what: what.clone(),
                server: self.base.clone(),
                source,
            })?;
        read_json(&what, &self.base, check(&what, sent)?)
    }

    /// POST `path` with `file` as the raw body, streamed with its length (never retried).
    pub fn post_file<T: DeserializeOwned>(
        &self,
        path: &str,
        file: std::fs::File,
    ) -> Result<T, HttpError> {
        let what = format!("POST {path}");
        let sent = self
            .agent
            .post(self.url(path))
            .header(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string())
            .header("Authorization", &self.auth)
            .content_type("application/octet-stream")
            .send(file)
            .map_err(|source| HttpError::Unreachable {
                what: what.clone(),
                server: self.base.clone(),
                source,
            })?;
        read_json(&what, &self.base, check(&what, sent)?)
    }
}

/// The first `max` characters of a body, for a message.
fn excerpt(body: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// An answer as the API says it must be: the right protocol header, a 2xx status; anything
/// else as the [`HttpError`] it is.
pub fn check(what: &str, mut resp: Response<Body>) -> Result<Response<Body>, HttpError> {
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get(PROTOCOL_HEADER)
        .map(|v| v.to_str().unwrap_or("(not ASCII)").to_string());
    match &header {
        // An answer without the header is not the server's own (a proxy's error page, a load
        // balancer's 404): a failure by its status, no version question, unless its body is
        // the server's refusal of this client's protocol.
        None if !(200..300).contains(&status) => return Err(foreign(what, status, &mut resp)),
        _ => {
            if let Err(e) = check_protocol(header.as_deref()) {
                return Err(HttpError::Protocol {
                    what: what.into(),
                    message: format!("HTTP {status}, not a construir answer: {e}"),
                });
            }
        }
    }
    if (200..300).contains(&status) {
        return Ok(resp);
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(ERROR_LIMIT)
        .read_to_vec()
        .unwrap_or_default();
    let api: Option<ApiError> = serde_json::from_slice(&body).ok();
    let what = what.to_string();
    Err(match (status, api) {
        (_, Some(api)) if api.error == codes::PROTOCOL_MISMATCH => HttpError::Protocol {
            what,
            message: format!("the server refused this client's protocol: {}", api.message),
        },
        (400..=499, Some(api)) => HttpError::Refused {
            what,
            status,
            code: Some(api.error),
            message: api.message,
        },
        (400..=499, None) => HttpError::Refused {
            what,
            status,
            code: None,
            message: excerpt(&body, 300),
        },
        (500.., api) => HttpError::ServerFailed {
            what,
            status,
            message: api
                .map(|a| a.to_string())
                .unwrap_or_else(|| excerpt(&body, 300)),
        },
        (300..=399, _) => HttpError::Protocol {
            message: format!(
                "the server redirects ({status}) to {:?}; give that address as --server",
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
            ),
            what,
        },
        _ => HttpError::Protocol {
            what,
            message: format!("unexpected HTTP {status}"),
        },
    })
}

/// A non-2xx answer without the protocol header, as the failure its status says.
fn foreign(what: &str, status: u16, resp: &mut Response<Body>) -> HttpError {
    let body = resp
        .body_mut()
        .with_config()
        .limit(ERROR_LIMIT)
        .read_to_vec()
        .unwrap_or_default();
    let what = what.to_string();
    if let Ok(api) = serde_json::from_slice::<ApiError>(&body)
        && api.error == codes::PROTOCOL_MISMATCH
    {
        return HttpError::Protocol {
            what,
            message: format!("the server refused this client's protocol: {}", api.message),
        };
    }
    let message = format!(
        "an answer not from a construir server (no {PROTOCOL_HEADER} header: a proxy in \
         front of it?): {}",
        excerpt(&body, 300)
    );
    match status {
        500.. => HttpError::ServerFailed {
            what,
            status,
            message,
        },
        300..=399 => HttpError::Protocol {
            message: format!(
                "redirected ({status}) to {:?} by something in front of the server; give the \
                 server's own address as --server",
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?")
            ),
            what,
        },
        _ => HttpError::Refused {
            what,
            status,
            code: None,
            message,
        },
    }
}

/// A 2xx answer's JSON body as `T`.
fn read_json<T: DeserializeOwned>(
    what: &str,
    server: &str,
    mut resp: Response<Body>,
) -> Result<T, HttpError> {
    let body = resp
        .body_mut()
        .with_config()
        .limit(JSON_LIMIT)
        .read_to_vec()
        .map_err(|source| HttpError::Unreachable {
            what: what.into(),
            server: server.into(),
            source,
        })?;
    parse_json(what, &body)
}

/// A JSON body as `T`; a body that is not is the server breaking the protocol.
pub fn parse_json<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(body).map_err(|e| HttpError::Protocol {
        what: what.into(),
        message: format!("the answer is not the JSON this client expects ({e})"),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A canned answer, or `None`: take the connection and close it without answering.
    pub(crate) type Canned = Option<String>;

    pub(crate) fn answer(status: u16, protocol: bool, headers: &str, body: &str) -> Canned {
        let proto = if protocol {
            "Construir-Protocol: 1\r\n"
        } else {
            ""
        };
        Some(format!(
            "HTTP/1.1 {status} X\r\n{proto}{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    /// A server on loopback that answers one connection per canned answer, in order, and
    /// returns the requests it read (head and body).
    pub(crate) fn fake_server(
        answers: Vec<Canned>,
    ) -> (ServerUrl, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = ServerUrl {
            base: format!("http://{}", listener.local_addr().unwrap()),
            tls: false,
        };
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for canned in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                seen.push(format!("{head}\r\n{}", String::from_utf8_lossy(&body)));
                if let Some(text) = canned {
                    (&stream).write_all(text.as_bytes()).unwrap();
                }
                drop(stream);
            }
            seen
        });
        (url, handle)
    }

    fn get_json<T: DeserializeOwned>(api: &Api, path: &str) -> Result<T, HttpError> {
        let (_, body) = api.get_bytes(path, JSON_LIMIT)?;
        parse_json(path, &body)
    }

    #[test]
    fn requests_carry_the_protocol_and_the_token_and_answers_are_checked() {
        let (url, server) = fake_server(vec![
            answer(200, true, "", r#"{"n": 1}"#),
            answer(200, false, "", r#"{"n": 1}"#),
            answer(200, true, "", "not json"),
        ]);
        let api = Api::new(&url, "secret-token");
        let v: serde_json::Value = get_json(&api, "/api/v1/whoami").unwrap();
        assert_eq!(v["n"], 1);
        let e = get_json::<serde_json::Value>(&api, "/x").unwrap_err();
        assert!(matches!(e, HttpError::Protocol { .. }), "{e}");
        assert!(e.to_string().contains("Construir-Protocol"), "{e}");
        assert_eq!(e.exit_code(), exit::USAGE);
        let e = get_json::<serde_json::Value>(&api, "/y").unwrap_err();
        assert!(e.to_string().contains("not the JSON"), "{e}");
        let seen = server.join().unwrap();
        let first = seen[0].to_ascii_lowercase();
        assert!(first.starts_with("get /api/v1/whoami "), "{first}");
        assert!(first.contains("construir-protocol: 1\r\n"), "{first}");
        assert!(
            first.contains("authorization: bearer secret-token\r\n"),
            "{first}"
        );
    }

    #[test]
    fn refusals_are_typed_by_their_code() {
        let (url, server) = fake_server(vec![
            answer(
                404,
                true,
                "",
                r#"{"error": "not-found", "message": "no job 9"}"#,
            ),
            answer(
                400,
                true,
                "",
                r#"{"error": "protocol-mismatch", "message": "speak 2"}"#,
            ),
            answer(413, true, "", "too big"),
            answer(502, false, "", "<html>bad gateway</html>"),
            answer(500, true, "", r#"{"error": "internal", "message": "db"}"#),
            answer(307, true, "Location: https://elsewhere.example\r\n", ""),
        ]);
        let api = Api::new(&url, "t");
        let e = api.get("/api/v1/jobs/9").unwrap_err();
        assert!(
            matches!(&e, HttpError::Refused { status: 404, code: Some(c), .. } if c == "not-found")
        );
        assert_eq!(e.exit_code(), exit::REFUSED);
        assert!(e.to_string().contains("404 not-found): no job 9"), "{e}");
        let e = api.get("/a").unwrap_err();
        assert!(matches!(e, HttpError::Protocol { .. }) && e.to_string().contains("speak 2"));
        let e = api.get("/b").unwrap_err();
        assert!(
            matches!(
                e,
                HttpError::Refused {
                    status: 413,
                    code: None,
                    ..
                }
            ),
            "{e}"
        );
        let e = api.get("/c").unwrap_err();
        assert!(
            matches!(e, HttpError::ServerFailed { status: 502, .. }),
            "{e}"
        );
        assert_eq!(e.exit_code(), exit::UNREACHABLE);
        let e = api.get("/d").unwrap_err();
        assert!(e.to_string().contains("internal: db"), "{e}");
        let e = api.get("/e").unwrap_err();
        assert!(e.to_string().contains("elsewhere.example"), "{e}");
        server.join().unwrap();
    }

    #[test]
    fn an_answer_without_the_protocol_header_is_no_version_question() {
        let (url, server) = fake_server(vec![
            answer(
                403,
                false,
                "",
                "<html>blocked by the corporate proxy</html>",
            ),
            answer(404, false, "", "<html>404 Not Found (nginx)</html>"),
            answer(413, false, "", "<html>413 Request Entity Too Large</html>"),
            answer(
                400,
                false,
                "",
                r#"{"error": "protocol-mismatch", "message": "speak 2"}"#,
            ),
            answer(400, true, "", r#"{"error": "bad-request", "message": "x"}"#),
            answer(409, false, "Construir-Protocol: 2\r\n", "{}"),
        ]);
        let api = Api::new(&url, "t");
        let e = api.get("/api/v1/jobs/1").unwrap_err();
        assert!(
            matches!(
                &e,
                HttpError::Refused {
                    status: 403,
                    code: None,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.exit_code(), exit::REFUSED);
        let text = e.to_string();
        assert!(
            text.contains("403") && text.contains("proxy") && text.contains("corporate"),
            "{text}"
        );
        let e = api.get("/b").unwrap_err();
        assert!(matches!(e, HttpError::Refused { status: 404, .. }), "{e}");
        let e = api
            .post_empty::<serde_json::Value>("/api/v1/jobs/1/cancel")
            .unwrap_err();
        assert!(matches!(e, HttpError::Refused { status: 413, .. }), "{e}");
        let e = api.get("/d").unwrap_err();
        assert!(
            matches!(e, HttpError::Protocol { .. }) && e.to_string().contains("speak 2"),
            "the server's own word: {e}"
        );
        let e = api.get("/e").unwrap_err();
        assert!(
            matches!(&e, HttpError::Refused { code: Some(c), .. } if c == "bad-request"),
            "{e}"
        );
        let e = api.get("/f").unwrap_err();
        assert!(
            matches!(e, HttpError::Protocol { .. }) && e.to_string().contains("protocol 2"),
            "another version said is a version question: {e}"
        );
        server.join().unwrap();
    }

    #[test]
    fn gets_are_retried_when_the_connection_fails_and_posts_are_not() {
        let (url, server) = fake_server(vec![None, None, answer(200, true, "", "[]")]);
        let api = Api::new(&url, "t");
        let list: Vec<serde_json::Value> = get_json(&api, "/api/v1/jobs").unwrap();
        assert!(list.is_empty());
        assert_eq!(server.join().unwrap().len(), 3);
        let (url, server) = fake_server(vec![None]);
        let api = Api::new(&url, "t");
        let e = api
            .post_empty::<serde_json::Value>("/api/v1/jobs/1/cancel")
            .unwrap_err();
        assert!(matches!(e, HttpError::Unreachable { .. }), "{e}");
        assert_eq!(e.exit_code(), exit::UNREACHABLE);
        assert_eq!(server.join().unwrap().len(), 1, "sent once");
        assert_eq!(backoff(0), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(8));
    }

    #[test]
    fn a_file_is_posted_raw_with_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j_t0.tar.xz");
        std::fs::write(&path, b"JOBDATA").unwrap();
        let (url, server) = fake_server(vec![answer(201, true, "", r#"{"id": 5}"#)]);
        let api = Api::new(&url, "t");
        let v: serde_json::Value = api
            .post_file(
                "/api/v1/jobs?name=j_t0.tar.xz",
                std::fs::File::open(&path).unwrap(),
            )
            .unwrap();
        assert_eq!(v["id"], 5);
        let seen = server.join().unwrap().remove(0);
        let lower = seen.to_ascii_lowercase();
        assert!(lower.contains("content-length: 7\r\n"), "{seen}");
        assert!(
            lower.contains("content-type: application/octet-stream"),
            "{seen}"
        );
        assert!(seen.ends_with("\r\n\r\nJOBDATA"), "{seen}");
    }
}
