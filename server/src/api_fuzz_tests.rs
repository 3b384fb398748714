//! The API fuzzed: arbitrary requests (any method, every route of the OpenAPI document and the
//! website with hostile path segments and queries, any token, any protocol header, any content
//! type, bodies from nothing through mutated good JSON to past the size limits) against one
//! server holding real users, jobs and an attempt. Each must get an answer within seconds, never
//! a 5xx, and under `/api/v1/` always the protocol header and, for a refusal, a JSON `ApiError`
//! that says what is wrong. A bounded number of cases per run (proptest); what it finds is kept
//! in `proptest-regressions/api_fuzz_tests.txt` (replayed first on every run) and, once fixed,
//! as a named test below.

use crate::http::router;
use crate::service::Shared;
use axum::body::Body;
use axum::http::Request;
use construir_api::PROTOCOL_HEADER;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::time::Duration;
use tower::ServiceExt;

/// One server for every case: its runtime, and the credentials and ids a request may use.
struct Target {
    rt: tokio::runtime::Runtime,
    app: Shared,
    tokens: Vec<String>,
    runner: String,
    ids: Vec<String>,
    _dir: tempfile::TempDir,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (dir, app, tokens, runner, ids) = rt.block_on(async {
            use crate::flow_tests::{caps, job, submit, token};
            use crate::matching_tests::{claim, claimed};
            let (dir, app) = crate::http::tests::test_app().await;
            let alice = token(&app, "alice", "submitter").await;
            let admin = token(&app, "root", "admin").await;
            let v = crate::replica_tests::volunteer(&app, "volunteer", "home").await;
            let mut ids = Vec::new();
            for n in 0..3 {
                let s = submit(&app, &alice, &format!("f{n}_t0.tar.xz"), job("f")).await;
                ids.push(s.json()["id"].to_string());
            }
            let a = claimed(&claim(&app, &v.token, &v.runner, caps()).await);
            let attempt = a.base.rsplit('/').next().unwrap().to_string();
            ids.push(attempt);
            // Long polls answer at once: what is fuzzed is what requests say, not waiting.
            app.begin_stopping();
            let tokens = vec![alice, admin, v.token.clone(), a.token.clone()];
            (dir, app, tokens, v.runner, ids)
        });
        Target {
            rt,
            app,
            tokens,
            runner,
            ids,
            _dir: dir,
        }
    })
}

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Every route template with the methods it takes: the API's (from its OpenAPI document), the
/// website's (GET and POST), and the rest.
fn templates() -> Vec<(String, Vec<&'static str>)> {
    let doc = serde_json::to_value(crate::openapi::document()).unwrap();
    let mut t: Vec<(String, Vec<&'static str>)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(path, item)| {
            let methods = METHODS
                .into_iter()
                .filter(|m| item.get(m.to_lowercase()).is_some())
                .collect();
            (path.clone(), methods)
        })
        .collect();
    for web in [
        "/",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/cancel",
        "/jobs/{id}/files/{path}",
        "/jobs/{id}/live",
        "/jobs/{id}/log.txt",
        "/jobs/{id}/output",
        "/jobs/{id}/receipt.json",
        "/jobs/{id}/resubmit",
        "/runners",
        "/runners/{id}/revoke",
        "/images",
        "/admin",
        "/admin/jobs/delete",
        "/admin/users/ban",
        "/signin",
        "/signup",
        "/signout",
        "/tokens",
        "/tokens/{id}/revoke",
        "/submit",
        "/healthz",
        "/metrics",
        "/static/site.css",
        "/api/v1/no/such/thing",
        "/api/v1/{id}",
    ] {
        t.push((web.to_string(), vec!["GET", "POST"]));
    }
    t.sort();
    t.dedup_by(|a, b| a.0 == b.0);
    t
}

/// Path segments and query values a hostile client sends.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("9223372036854775807".to_string()),
        Just("1e9".to_string()),
        Just("true".to_string()),
        Just("".to_string()),
        Just("%00".to_string()),
        Just("..%2F..%2Fetc%2Fpasswd".to_string()),
        Just("%E2%80%AE%3Cscript%3E".to_string()),
        Just("a".repeat(300)),
        (0u64..5000).prop_map(|n| n.to_string()),
        "[a-zA-Z0-9_.~-]{0,20}",
    ]
}

const QUERY_KEYS: &[&str] = &[
    "name",
    "offset",
    "wait_s",
    "attempt",
    "memory_mib",
    "vcpus",
    "timeout_s",
    "private",
    "replicas",
    "quorum",
    "adaptive",
    "state",
    "limit",
    "before",
    "image",
    "priority",
    "owner",
    "output_size",
    "console_cap",
    "own_runners",
    "any_class",
    "x",
];

const FIELDS: &[&str] = &[
    "capabilities",
    "wait_s",
    "name",
    "public_key",
    "status",
    "exit_code",
    "job_exit_status",
    "output_sha256",
    "output_tree_sha256",
    "statement",
    "reason",
    "free_slots",
    "images",
    "arch",
    "backend",
    "host_kind",
    "max_memory_mib",
    "unknown_field",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        Just(Value::from(u64::MAX)),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// Good bodies of the API, each with one field replaced, removed or added.
fn mutated_good_body() -> impl Strategy<Value = Vec<u8>> {
    let goods = vec![
        json!({"capabilities": crate::flow_tests::caps(), "wait_s": 0}),
        json!({"name": "home", "public_key": "00"}),
        json!({"status": "success", "exit_code": 0, "job_exit_status": 0,
               "output_sha256": "0".repeat(64), "output_tree_sha256": "0".repeat(64)}),
        json!({"reason": "runner-side"}),
    ];
    (
        prop::sample::select(goods),
        prop::sample::select(FIELDS),
        json_value(),
        0u8..3,
    )
        .prop_map(|(mut good, field, value, how)| {
            if let Some(o) = good.as_object_mut() {
                match how {
                    0 => {
                        o.insert(field.to_string(), value);
                    }
                    1 => {
                        o.remove(field);
                    }
                    _ => {
                        if let Some(caps) = o.get_mut("capabilities").and_then(Value::as_object_mut)
                        {
                            caps.insert(field.to_string(), value);
                        }
                    }
                }
            }
            good.to_string().into_bytes()
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        mutated_good_body(),
        // Past the JSON limit (64 KiB), and a form past the website's.
        Just(format!("{{\"name\":\"{}\"}}", "a".repeat(70 << 10)).into_bytes()),
        Just(vec![b'a'; 300 << 10]),
    ]
}

#[derive(Debug, Clone)]
struct Fuzzed {
    method: &'static str,
    path: String,
    token: Option<usize>,
    garbage_token: bool,
    protocol: Option<&'static str>,
    content_type: Option<&'static str>,
    runner_header: Option<String>,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Fuzzed> {
    // Mostly what a route takes, with the protocol header and a token, so that most requests
    // get past the door and into the handlers; the rest anything.
    let route = prop::sample::select(templates()).prop_flat_map(|(path, methods)| {
        let method = match methods.is_empty() {
            true => prop::sample::select(METHODS.to_vec()).boxed(),
            false => prop_oneof![
                4 => prop::sample::select(methods),
                1 => prop::sample::select(METHODS.to_vec()),
            ]
            .boxed(),
        };
        (method, Just(path))
    });
    (
        route,
        prop::collection::vec(hostile_value(), 2),
        prop::collection::vec((prop::sample::select(QUERY_KEYS), hostile_value()), 0..5),
        (
            any::<bool>(),
            prop::option::weighted(0.8, 0usize..4),
            any::<bool>(),
        ),
        prop_oneof![
            6 => Just(Some("1")),
            1 => prop::option::of(prop::sample::select(vec!["2", "x", ""])),
        ],
        prop_oneof![
            3 => Just(Some("application/json")),
            1 => prop::option::of(prop::sample::select(vec![
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/octet-stream",
            ])),
        ],
        (prop::option::of(hostile_value()), any::<bool>(), body()),
    )
        .prop_map(
            |((method, template), segs, query, (real_id, token, garbage), protocol, ct, rest)| {
                let (runner, real_runner, body) = rest;
                let t = target();
                let mut path = String::new();
                let mut n = 0;
                for part in template.split('/').skip(1) {
                    path.push('/');
                    if part.starts_with('{') {
                        let v = match real_id {
                            true => t.ids[n % t.ids.len()].clone(),
                            false => segs[n % segs.len()].clone(),
                        };
                        path.push_str(&v);
                        n += 1;
                    } else {
                        path.push_str(part);
                    }
                }
                if !query.is_empty() {
                    path.push('?');
                    let q: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    path.push_str(&q.join("&"));
                }
                Fuzzed {
                    method,
                    path,
                    token,
                    garbage_token: garbage,
                    protocol,
                    content_type: ct,
                    runner_header: match real_runner {
                        true => Some(t.runner.clone()),
                        false => runner,
                    },
                    body,
                }
            },
        )
}

/// Sends `f` and checks its answer; the failure says what came back.
fn answered_clearly(f: &Fuzzed) -> Result<(), String> {
    let t = target();
    let mut b = Request::builder().method(f.method).uri(&f.path);
    if let Some(i) = f.token {
        b = b.header("Authorization", format!("Bearer {}", t.tokens[i]));
    } else if f.garbage_token {
        b = b.header("Authorization", "Bearer cst_not-a-token\u{7f}");
    }
    if let Some(p) = f.protocol {
        b = b.header(PROTOCOL_HEADER, p);
    }
    if let Some(ct) = f.content_type {
        b = b.header("Content-Type", ct);
    }
    if let Some(r) = &f.runner_header {
        b = b.header("Construir-Runner", r.as_str());
    }
    let Ok(req) = b.body(Body::from(f.body.clone())) else {
        return Ok(()); // not a request any client can send (a path hyper would not parse)
    };
    let app = t.app.clone();
    let answer = t.rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(10), async move {
            let resp = router(app).oneshot(req).await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            (status, headers, body)
        })
        .await
    });
    let (status, headers, body) = answer.map_err(|_| format!("no answer within 10 s to {f:?}"))?;
    let body = body.map_err(|e| format!("the answer's body broke ({e}) for {f:?}"))?;
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status.is_server_error() {
        return Err(format!("{status} {text:?} for {f:?}"));
    }
    if f.path.starts_with("/api/v1/") {
        if headers.get(PROTOCOL_HEADER).is_none() {
            return Err(format!("{status} without {PROTOCOL_HEADER} for {f:?}"));
        }
        if status.is_client_error() && f.method != "HEAD" {
            let v: Value = serde_json::from_slice(&body).map_err(|_| {
                format!("{status} with a body that is not JSON: {text:?} for {f:?}")
            })?;
            let clear = v["error"].is_string()
                && v["message"].as_str().is_some_and(|m| !m.trim().is_empty());
            if !clear {
                return Err(format!(
                    "{status} without error and message: {text:?} for {f:?}"
                ));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1500,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_request_gets_a_clear_answer_never_a_5xx_or_a_hang(f in request()) {
        if let Err(why) = answered_clearly(&f) {
            prop_assert!(false, "{}", why);
        }
    }
}

/// Found by the fuzzer: `/api/v1/` (the nest's root, with a slash) fell through to the
/// website's 404, without the protocol header or an `ApiError`.
#[test]
fn the_api_root_with_a_slash_answers_as_an_unknown_endpoint() {
    for path in ["/api/v1/", "/api/v1"] {
        let f = Fuzzed {
            method: "GET",
            path: path.into(),
            token: None,
            garbage_token: false,
            protocol: None,
            content_type: None,
            runner_header: None,
            body: Vec::new(),
        };
        assert_eq!(answered_clearly(&f), Ok(()));
    }
}
