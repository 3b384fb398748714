//! The API's paths and queries (docs/api.md, "Submitters"), as pure functions: what goes on the
//! wire is tested here, not found out from a server.

use construir_api::types::{AttemptId, JobId, SubmitParams};
use std::fmt::Write as _;

/// `text` percent-encoded for a query value: everything but RFC 3986's unreserved characters
/// (so `&`, `=`, `+`, `#`, spaces and non-ASCII cannot change the query's meaning).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `POST /api/v1/jobs?name=…&…`: the job file's name, then every [`SubmitParams`] field that
/// was given, by its wire name (taken from the type's serialisation, so a field added to the
/// contract needs no change here). A priority of 0 is the default and is left out.
pub fn submit(name: &str, params: &SubmitParams) -> String {
    let mut path = format!("/api/v1/jobs?name={}", percent_encode(name));
    let value = serde_json::to_value(params).expect("SubmitParams serialises");
    // Sorted by name, whatever order the JSON map keeps: the same request for the same flags.
    let mut fields: Vec<_> = value
        .as_object()
        .expect("SubmitParams is an object")
        .iter()
        .collect();
    fields.sort_by_key(|(key, _)| key.as_str());
    for (key, value) in fields {
        let text = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::Number(n) if key == "priority" && n.as_i64() == Some(0) => continue,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(path, "&{key}={}", percent_encode(&text));
    }
    path
}

/// `GET /api/v1/jobs`.
pub fn jobs() -> String {
    "/api/v1/jobs".into()
}

/// `GET /api/v1/jobs/{id}`.
pub fn job(id: JobId) -> String {
    format!("/api/v1/jobs/{id}")
}

/// `POST /api/v1/jobs/{id}/cancel`.
pub fn cancel(id: JobId) -> String {
    format!("/api/v1/jobs/{id}/cancel")
}

/// `GET /api/v1/jobs/{id}/output`.
pub fn output(id: JobId) -> String {
    format!("/api/v1/jobs/{id}/output")
}

/// `GET /api/v1/jobs/{id}/receipt`: the job's signed receipt, once a quorum agreed on it.
pub fn receipt(id: JobId) -> String {
    format!("/api/v1/jobs/{id}/receipt")
}

/// `GET /.well-known/construir/server-key`: the key receipts are signed with. Beside the API,
/// under the server's URL prefix (as every path here is).
pub fn server_key() -> String {
    "/.well-known/construir/server-key".into()
}

/// `GET /api/v1/jobs/{id}/log?attempt=A&offset=N&wait_s=S`; without an attempt, the server
/// takes the job's last; a wait of 0 is left out (answer at once).
pub fn log(id: JobId, attempt: Option<AttemptId>, offset: u64, wait_s: u32) -> String {
    let mut path = format!("/api/v1/jobs/{id}/log?");
    if let Some(a) = attempt {
        let _ = write!(path, "attempt={a}&");
    }
    let _ = write!(path, "offset={offset}");
    if wait_s > 0 {
        let _ = write!(path, "&wait_s={wait_s}");
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_cannot_break_out() {
        assert_eq!(percent_encode("hello_i0.tar.xz"), "hello_i0.tar.xz");
        assert_eq!(
            percent_encode("a b&c=d+e#f/ü"),
            "a%20b%26c%3Dd%2Be%23f%2F%C3%BC"
        );
    }

    #[test]
    fn a_submission_sends_only_what_was_given() {
        assert_eq!(
            submit("hello_i0.tar.xz", &SubmitParams::default()),
            "/api/v1/jobs?name=hello_i0.tar.xz"
        );
        let all = SubmitParams {
            image: Some("t0".into()),
            timeout_s: Some(1800),
            output_size: Some(64 << 20),
            console_cap: Some(1 << 20),
            memory_mib: Some(1024),
            vcpus: Some(2),
            priority: -5,
            replicas: Some(3),
            quorum: Some(2),
            own_runners: true,
            any_class: false,
            adaptive: true,
            private: Some(true),
        };
        let path = submit("my job_t0.tar.xz", &all);
        assert!(
            path.starts_with("/api/v1/jobs?name=my%20job_t0.tar.xz&"),
            "{path}"
        );
        let mut pairs: Vec<&str> = path.split_once('?').unwrap().1.split('&').collect();
        pairs.sort();
        assert_eq!(
            pairs,
            [
                "adaptive=true",
                "console_cap=1048576",
                "image=t0",
                "memory_mib=1024",
                "name=my%20job_t0.tar.xz",
                "output_size=67108864",
                "own_runners=true",
                "priority=-5",
                "private=true",
                "quorum=2",
                "replicas=3",
                "timeout_s=1800",
                "vcpus=2",
            ]
        );
        // What the server reads back is what was meant.
        let query: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .filter(|p| !p.starts_with("name=") && !p.starts_with("image="))
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                // Numbers, and `true`: JSON's spelling of both is the query's.
                (k.to_string(), serde_json::from_str(v).unwrap())
            })
            .collect();
        let mut query = serde_json::Value::Object(query);
        query["image"] = "t0".into();
        assert_eq!(serde_json::from_value::<SubmitParams>(query).unwrap(), all);
    }

    #[test]
    fn paths() {
        assert_eq!(job(JobId(4)), "/api/v1/jobs/4");
        assert_eq!(cancel(JobId(4)), "/api/v1/jobs/4/cancel");
        assert_eq!(output(JobId(4)), "/api/v1/jobs/4/output");
        assert_eq!(jobs(), "/api/v1/jobs");
        assert_eq!(receipt(JobId(4)), "/api/v1/jobs/4/receipt");
        assert_eq!(server_key(), "/.well-known/construir/server-key");
        assert_eq!(log(JobId(4), None, 0, 0), "/api/v1/jobs/4/log?offset=0");
        assert_eq!(
            log(JobId(4), Some(AttemptId(9)), 512, 25),
            "/api/v1/jobs/4/log?attempt=9&offset=512&wait_s=25"
        );
    }
}
