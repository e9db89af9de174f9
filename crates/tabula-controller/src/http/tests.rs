//! The admin API's edges: every answer to bad input is a JSON `{"error": ...}` with a 4xx
//! status, never a 500, a panic or a hang, whatever the method, path, content type or body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::ServiceExt;

use super::{Limits, app};
use crate::{Controller, ControllerConfig};

const MIB: u64 = 1 << 20;

/// A controller on `dir` with a vdisk `vd` that has a snapshot `vd@s`, and a clone `cl`.
async fn controller(dir: &std::path::Path) -> Arc<Controller> {
    let ctl = Controller::open(ControllerConfig::new(dir)).await.unwrap();
    ctl.ensure_default_container(64 * MIB).await.unwrap();
    ctl.create_vdisk("vd", 16 * MIB, None, None, None)
        .await
        .unwrap();
    ctl.create_snapshot("vd", "s").await.unwrap();
    ctl.clone_vdisk("vd@s", "cl", None).await.unwrap();
    ctl
}

struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    body: Vec<u8>,
}

async fn send(app: &axum::Router, req: Request<Body>) -> Answer {
    let resp = tokio::time::timeout(Duration::from_secs(20), app.clone().oneshot(req))
        .await
        .expect("the admin API did not answer within 20 s")
        .unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        content_type,
        body,
    }
}

fn request(method: &str, uri: &str, content_type: Option<&str>, body: &[u8]) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(uri);
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(Body::from(body.to_vec())).unwrap()
}

/// What every error must look like: a JSON object with a non-empty `error` string.
fn error_text(a: &Answer) -> Result<String, String> {
    let shown = || {
        format!(
            "{} {:?} {:?}",
            a.status,
            a.content_type,
            String::from_utf8_lossy(&a.body)
        )
    };
    if a.content_type.as_deref() != Some("application/json") {
        return Err(format!("error answer is not JSON: {}", shown()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&a.body).map_err(|e| format!("{e}: {}", shown()))?;
    match v.get("error").and_then(|e| e.as_str()) {
        Some(e) if !e.is_empty() => Ok(e.to_string()),
        _ => Err(format!("no error text: {}", shown())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_errors_and_unknown_routes_answer_json() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(controller(dir.path()).await, true, Limits::default());
    let json = Some("application/json");
    // (method, path, content type, body, status, what the error mentions)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        &'a [u8],
        StatusCode,
        &'a str,
    );
    let cases: &[Case] = &[
        // curl -d '{bad' (malformed JSON)
        (
            "POST",
            "/v1/vdisks",
            json,
            b"{bad",
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        // a field missing
        (
            "POST",
            "/v1/vdisks",
            json,
            br#"{"name":"x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "size",
        ),
        // a field of the wrong type
        (
            "POST",
            "/v1/vdisks/vd/resize",
            json,
            br#"{"size":"big"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "size",
        ),
        // curl -d without -H 'Content-Type: application/json'
        (
            "POST",
            "/v1/vdisks",
            Some("application/x-www-form-urlencoded"),
            br#"{"name":"x","size":1048576}"#,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            "POST",
            "/v1/clones",
            None,
            b"",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        // a query that does not parse
        (
            "DELETE",
            "/v1/vdisks/vd?with_snapshots=maybe",
            None,
            b"",
            StatusCode::BAD_REQUEST,
            "with_snapshots",
        ),
        (
            "GET",
            "/v1/diff?from=vd",
            None,
            b"",
            StatusCode::BAD_REQUEST,
            "to",
        ),
        // no such route, no such method
        (
            "GET",
            "/v1/nothing",
            None,
            b"",
            StatusCode::NOT_FOUND,
            "/v1/nothing",
        ),
        (
            "PUT",
            "/v1/vdisks",
            json,
            b"{}",
            StatusCode::METHOD_NOT_ALLOWED,
            "GET",
        ),
        (
            "POST",
            "/v1/status",
            None,
            b"",
            StatusCode::METHOD_NOT_ALLOWED,
            "GET",
        ),
        // a body over the limit
        (
            "POST",
            "/v1/vdisks",
            json,
            &[b' '; 3 << 20],
            StatusCode::PAYLOAD_TOO_LARGE,
            "limit",
        ),
    ];
    for &(method, uri, ct, body, status, mention) in cases {
        let a = send(&app, request(method, uri, ct, body)).await;
        assert_eq!(
            a.status,
            status,
            "{method} {uri}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let e = error_text(&a).unwrap_or_else(|e| panic!("{method} {uri}: {e}"));
        assert!(
            e.contains(mention),
            "{method} {uri}: {e:?} should mention {mention:?}"
        );
    }
}

// ---- random requests at every route ----

#[derive(Debug, Clone)]
struct RandomRequest {
    method: String,
    uri: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Percent-encodes every byte that is not unreserved, so any bytes make a valid URI.
fn enc(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn name_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("vd".to_string()),
        Just("vd@s".to_string()),
        Just("cl".to_string()),
        Just("default".to_string()),
        Just("missing".to_string()),
        "[a-z@._-]{0,12}",
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| enc(&b)),
        (1usize..3000).prop_map(|n| "n".repeat(n)),
    ]
}

/// Every route: method, path (`{}` is a name) and the fields of its JSON body.
const ROUTES: &[(&str, &str, &[&str])] = &[
    ("GET", "/v1/status", &[]),
    ("GET", "/metrics", &[]),
    ("GET", "/v1/check", &[]),
    ("GET", "/v1/containers", &[]),
    ("POST", "/v1/containers", &["name", "path", "size"]),
    ("GET", "/v1/containers/{}", &[]),
    ("DELETE", "/v1/containers/{}", &[]),
    ("POST", "/v1/containers/{}/drain", &[]),
    ("DELETE", "/v1/containers/{}/drain", &[]),
    ("GET", "/v1/moves", &[]),
    ("GET", "/v1/vdisks", &[]),
    (
        "POST",
        "/v1/vdisks",
        &["name", "size", "segment_size", "cow", "container"],
    ),
    ("GET", "/v1/vdisks/{}", &[]),
    ("DELETE", "/v1/vdisks/{}", &[]),
    ("POST", "/v1/vdisks/{}/resize", &["size"]),
    ("GET", "/v1/vdisks/{}/map", &[]),
    ("POST", "/v1/vdisks/{}/snapshots", &["name"]),
    ("POST", "/v1/vdisks/{}/migrate", &["to"]),
    ("POST", "/v1/vdisks/{}/rollback", &["snapshot"]),
    ("GET", "/v1/snapshots", &[]),
    ("DELETE", "/v1/snapshots/{}", &[]),
    ("POST", "/v1/clones", &["source", "name", "cow"]),
    ("GET", "/v1/diff", &[]),
];

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("?with_snapshots=true".to_string()),
        Just("?with_snapshots=maybe".to_string()),
        Just("?force=true".to_string()),
        Just("?force=yes&with_snapshots=1".to_string()),
        Just("?vdisk=vd".to_string()),
        Just("?from=vd@s&to=vd".to_string()),
        Just("?from=vd@s&to=cl".to_string()),
        Just("?from=&to=".to_string()),
        proptest::collection::vec(any::<u8>(), 0..30).prop_map(|b| format!("?{}", enc(&b))),
        (
            "[a-z_]{1,14}",
            proptest::collection::vec(any::<u8>(), 0..20)
        )
            .prop_map(|(k, v)| format!("?{k}={}", enc(&v))),
    ]
}

fn any_method() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("GET"),
        3 => Just("POST"),
        2 => Just("DELETE"),
        1 => Just("PUT"),
        1 => Just("PATCH"),
        1 => Just("HEAD"),
        1 => Just("OPTIONS"),
        1 => Just("BREW"),
    ]
    .prop_map(str::to_string)
}

fn any_path() -> impl Strategy<Value = String> {
    let template = proptest::sample::select(ROUTES).prop_map(|r| r.1);
    prop_oneof![
        1 => proptest::collection::vec(name_segment(), 0..5)
            .prop_map(|segs| format!("/{}", segs.join("/"))),
        1 => (template, "[/a-z.]{0,8}")
            .prop_map(|(t, tail)| format!("{}{tail}", t.replace("{}", "vd"))),
    ]
}

/// Interesting JSON values for `field` of a route's body (`container`: the route adds a
/// container).
fn value(dir: &str, field: &str, container: bool) -> BoxedStrategy<serde_json::Value> {
    use serde_json::{Value, json};
    let odd = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        Just(json!([])),
        Just(json!({"a": 1})),
        Just(json!(-1)),
        Just(json!(1.5)),
    ];
    if field == "path" {
        // Only inside the test's directory (or an NBD server nobody runs): a relative path
        // would land in the crate's directory. Files directly in `containers/` are accepted;
        // the metadata files, the rest of the data dir, NUL bytes and 10 KB paths are refused.
        let dir = dir.to_string();
        let (d2, d3, d4) = (dir.clone(), dir.clone(), dir.clone());
        return prop_oneof![
            4 => "[a-z]{1,6}".prop_map(move |s| json!(format!("{dir}/containers/{s}.img"))),
            1 => "[a-z]{1,6}".prop_map(move |s| json!(format!("{d2}/{s}.img"))),
            1 => Just(json!(format!("{d3}/tabula.wal"))),
            1 => Just(json!(format!("{d4}/containers/a\u{0}b.img"))),
            1 => Just(json!(format!("/tmp/{}", "x".repeat(10_000)))),
            1 => Just(json!("nbd://127.0.0.1:1/x")),
            1 => Just(json!("nbd://")),
            1 => Just(json!("")),
            1 => odd,
        ]
        .boxed();
    }
    if field == "size" && container {
        // Container files the test really creates: sparse, but kept small.
        return prop_oneof![
            4 => prop_oneof![
                Just(json!(0)),
                Just(json!(1)),
                Just(json!(4096)),
                Just(json!(12345)),
                Just(json!(MIB)),
                Just(json!(64 * MIB)),
            ],
            // Sizes no file here can have: refused with 400, and nothing left behind.
            1 => prop_oneof![Just(json!(1u64 << 50)), Just(json!(1u64 << 63))],
            1 => odd,
        ]
        .boxed();
    }
    let nums = prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(4096)),
        Just(json!(MIB)),
        Just(json!(4 * MIB)),
        Just(json!(1u64 << 40)),
        Just(json!(1u64 << 62)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        any::<u64>().prop_map(|n| json!(n)),
    ];
    let strings = prop_oneof![
        1 => Just(json!("")),
        1 => Just(json!("vd")),
        1 => Just(json!("vd@s")),
        1 => Just(json!("cl")),
        1 => Just(json!("default")),
        1 => Just(json!("redirect")),
        1 => Just(json!("copy-out")),
        1 => Just(json!("x".repeat(300))),
        1 => "[a-z@._-]{1,10}".prop_map(|s| json!(s)),
        // Mostly valid new names.
        4 => "[a-z]{1,6}".prop_map(|s| json!(s)),
    ];
    let numeric = matches!(field, "size" | "segment_size");
    prop_oneof![
        (if numeric { 6 } else { 1 }) => nums,
        (if numeric { 1 } else { 6 }) => strings,
        1 => odd,
    ]
    .boxed()
}

/// A JSON object with (most of) the fields a route's body has, so that many requests get
/// into the service; sometimes an unknown field.
fn object(
    dir: &str,
    fields: &'static [&'static str],
) -> impl Strategy<Value = serde_json::Value> + use<> {
    let container = fields.contains(&"path");
    let values: Vec<_> = fields
        .iter()
        .chain(["zzz"].iter())
        .map(|f| value(dir, f, container))
        .collect();
    let n = values.len();
    (
        values,
        proptest::collection::vec(proptest::bool::weighted(0.85), n),
    )
        .prop_map(move |(values, keep)| {
            let mut m = serde_json::Map::new();
            for (i, v) in values.into_iter().enumerate() {
                match fields.get(i) {
                    Some(k) if keep[i] => {
                        m.insert(k.to_string(), v);
                    }
                    // The unknown field, now and then.
                    None if !keep[i] => {
                        m.insert("zzz".to_string(), v);
                    }
                    _ => {}
                }
            }
            serde_json::Value::Object(m)
        })
}

/// Any JSON document; keys are at most three letters so that no random object is a valid
/// container request with a relative path.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,3}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body(dir: &str, fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> + use<> {
    prop_oneof![
        2 => Just(Vec::new()),
        6 => object(dir, fields).prop_map(|v| serde_json::to_vec(&v).unwrap()),
        2 => any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        2 => proptest::collection::vec(any::<u8>(), 0..300),
        // A valid-looking object cut short or with garbage after it.
        1 => (object(dir, fields), any::<usize>(), proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(v, cut, tail)| {
                let mut b = serde_json::to_vec(&v).unwrap();
                b.truncate(cut % (b.len() + 1));
                b.extend(tail);
                b
            }),
    ]
}

fn random_request(dir: &str) -> impl Strategy<Value = RandomRequest> + use<> {
    let content_type = prop_oneof![
        6 => Just(Some("application/json".to_string())),
        1 => Just(Some("application/json; charset=utf-8".to_string())),
        1 => Just(None),
        1 => Just(Some("text/plain".to_string())),
        1 => Just(Some("application/problem+json".to_string())),
        1 => "[ -~]{0,30}".prop_map(Some),
    ];
    let dir = dir.to_string();
    // Mostly a route with its method; sometimes any method on any path.
    let target = prop_oneof![
        4 => proptest::sample::select(ROUTES).prop_flat_map(move |(m, t, fields)| {
            (name_segment(), body(&dir, fields)).prop_map(move |(n, b)| {
                (m.to_string(), t.replace("{}", &n), b)
            })
        }),
        1 => (any_method(), any_path(), body(dir_for_any(), &["name", "size"])),
    ];
    (target, query(), content_type).prop_map(|((method, path, body), query, content_type)| {
        RandomRequest {
            method,
            uri: format!("{path}{query}"),
            content_type,
            body,
        }
    })
}

/// Bodies sent to arbitrary paths never reach a route that creates files.
fn dir_for_any() -> &'static str {
    "/nonexistent"
}

/// Random methods, paths, queries, content types and bodies at every route of a real
/// controller: each answer is a success or a JSON `{"error"}` with a 4xx (or a 503/507 the
/// service chose), never a 500, a panic or a hang.
#[test]
fn random_requests_get_a_json_error_or_a_success() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = rt.block_on(async { app(controller(dir.path()).await, true, Limits::default()) });
    let cases = std::env::var("TABULA_PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let files = dir.path().to_str().unwrap().to_string();
    // Answers by status, to show the requests reach the service, not only the parsers.
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::<(String, u16), u32>::new());
    runner
        .run(&random_request(&files), |r| {
            let Ok(method) = Method::from_bytes(r.method.as_bytes()) else {
                return Ok(());
            };
            let mut b = Request::builder().method(method).uri(&r.uri);
            if let Some(ct) = &r.content_type {
                b = b.header(header::CONTENT_TYPE, ct);
            }
            let req = b.body(Body::from(r.body.clone())).unwrap();
            let a = rt.block_on(send(&app, req));
            *seen
                .lock()
                .unwrap()
                .entry((r.method.clone(), a.status.as_u16()))
                .or_default() += 1;
            prop_assert_ne!(
                a.status,
                StatusCode::INTERNAL_SERVER_ERROR,
                "{:?}: {}",
                r,
                String::from_utf8_lossy(&a.body)
            );
            if a.status.is_success() {
                return Ok(());
            }
            prop_assert!(
                a.status.is_client_error()
                    || a.status == StatusCode::SERVICE_UNAVAILABLE
                    || a.status == StatusCode::INSUFFICIENT_STORAGE,
                "{:?}: {}",
                r,
                a.status
            );
            if r.method == "HEAD" {
                // No body in an answer to HEAD, by definition.
                return Ok(());
            }
            error_text(&a).map_err(|e| TestCaseError::fail(format!("{r:?}: {e}")))?;
            Ok(())
        })
        .unwrap();
    let seen = seen.into_inner().unwrap();
    eprintln!("answers by (method, status): {seen:?}");
    let count = |f: &dyn Fn(&str, u16) -> bool| -> u32 {
        seen.iter()
            .filter(|((m, s), _)| f(m, *s))
            .map(|(_, n)| n)
            .sum()
    };
    // Some requests changed something (created, deleted), and some were refused by the
    // service itself rather than by the request's parsing.
    assert!(count(&|m, s| m != "GET" && (200..300).contains(&s)) > 0);
    assert!(count(&|_, s| s == 404 || s == 409) > 0);
    assert!(count(&|_, s| s == 422) > 0);
}

// ---- the server loop: slow, idle and silent clients ----

/// Serves the admin API and gRPC on a free port with short limits; returns its address and
/// the sender that stops it.
async fn short_limits_server(
    ctl: Arc<Controller>,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let limits = Limits {
        read_timeout: Duration::from_millis(500),
        h2_keepalive: Duration::from_millis(300),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(super::serve_app(
        listener,
        app(ctl, true, limits),
        limits,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, tx)
}

/// Sends `first`, then `trickle` a byte every 50 ms; returns how long until the server
/// closed the connection (or `None` within `limit`) and what it answered.
async fn cut_off_after(
    addr: std::net::SocketAddr,
    first: &[u8],
    trickle: &[u8],
    limit: Duration,
) -> (Option<Duration>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let start = std::time::Instant::now();
    s.write_all(first).await.unwrap();
    let mut answer = Vec::new();
    let mut i = 0;
    while start.elapsed() < limit {
        if !trickle.is_empty()
            && s.write_all(&trickle[i % trickle.len()..][..1])
                .await
                .is_err()
        {
            return (
                Some(start.elapsed()),
                String::from_utf8_lossy(&answer).into(),
            );
        }
        i += 1;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    Some(start.elapsed()),
                    String::from_utf8_lossy(&answer).into(),
                );
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (None, String::from_utf8_lossy(&answer).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_silent_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = short_limits_server(controller(dir.path()).await).await;
    let limit = Duration::from_secs(5);
    // Two read timeouts (telling the protocols apart, then the head) and scheduling slack.
    let bound = Duration::from_millis(2000);
    let cases: &[(&str, &[u8], &[u8])] = &[
        ("idle", b"", b""),
        ("slow head", b"GET /v1/status HTTP/1.1\r\nX-Slow: ", b"a"),
        ("stalled HTTP/2 preface", b"PRI * HTTP/2.0\r\n", b""),
        // The server pings; a peer that never answers is dropped.
        ("silent HTTP/2 peer", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b""),
        (
            "slow body",
            b"POST /v1/vdisks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
            b" ",
        ),
    ];
    for &(what, first, trickle) in cases {
        let (closed, answer) = cut_off_after(addr, first, trickle, limit).await;
        let closed = closed.unwrap_or_else(|| panic!("{what}: still connected after {limit:?}"));
        assert!(closed <= bound, "{what}: cut off only after {closed:?}");
        if what == "slow body" {
            assert!(
                answer.starts_with("HTTP/1.1 408") && answer.contains(r#"{"error":"#),
                "{what}: {answer}"
            );
        }
    }
    // A well-behaved client is answered, and its kept-alive connection closed once idle.
    let (closed, answer) = cut_off_after(
        addr,
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"",
        limit,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed.is_some_and(|c| c <= bound),
        "idle keep-alive: {closed:?}"
    );
    let _ = stop.send(());
}

// ---- deleting what clients are connected to ----

/// An in-process agent that reports NBD connections.
struct Connected(parking_lot::Mutex<Vec<(tabula_core::VdiskId, u32)>>);

#[async_trait::async_trait]
impl tabula_api::AgentPort for Connected {
    async fn apply(&self, _command: tabula_api::Command) -> Result<(), String> {
        Ok(())
    }
    fn report(&self) -> Option<tabula_api::AgentReport> {
        Some(tabula_api::AgentReport {
            connections: self.0.lock().clone(),
            ..Default::default()
        })
    }
}

/// A networked agent as the controller sees it: it reports through heartbeats.
struct Remote;

#[async_trait::async_trait]
impl tabula_api::AgentPort for Remote {
    async fn apply(&self, _command: tabula_api::Command) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_what_clients_are_connected_to_needs_force() {
    use tabula_api::ControlPlane;
    use tabula_core::VdiskId;
    let dir = tempfile::tempdir().unwrap();
    let ctl = controller(dir.path()).await;
    let id = |name: &str| {
        let ctl = ctl.clone();
        let name = name.to_string();
        async move { VdiskId(ctl.vdisk_by_name(&name).await.unwrap().id) }
    };
    let (vd, snap) = (id("vd").await, id("vd@s").await);
    let port = Arc::new(Connected(parking_lot::Mutex::new(vec![(vd, 2)])));
    ctl.register_agent("host-a", port.clone(), Vec::new())
        .await
        .unwrap();
    let app = app(ctl.clone(), true, Limits::default());
    let delete = |uri: &str| request("DELETE", uri, None, b"");

    let a = send(&app, delete("/v1/vdisks/vd?with_snapshots=true")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let e = error_text(&a).unwrap();
    assert!(
        e.contains("host-a") && e.contains("2 connections to vd") && e.contains("--force"),
        "{e}"
    );
    // Clients of a snapshot count when the snapshots go too.
    *port.0.lock() = vec![(snap, 1)];
    let a = send(&app, delete("/v1/vdisks/vd?with_snapshots=true")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(error_text(&a).unwrap().contains("vd@s"));
    let a = send(&app, delete("/v1/snapshots/vd@s")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(error_text(&a).unwrap().contains("1 connection to vd@s"));
    let a = send(&app, delete("/v1/snapshots/vd@s?force=true")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    // A networked agent whose lease ran out serves nothing: its last report does not count.
    *port.0.lock() = Vec::new();
    let session = ctl
        .agents
        .register(
            "host-b",
            Arc::new(Remote),
            vec![vd],
            Some(Duration::from_millis(3000)),
            "192.0.2.2:5000",
        )
        .unwrap();
    let report = tabula_api::AgentReport {
        connections: vec![(vd, 1)],
        ..Default::default()
    };
    assert!(ctl.agents.renew("host-b", session, report));
    let a = send(&app, delete("/v1/vdisks/vd")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(error_text(&a).unwrap().contains("host-b"));
    // (The refusal came after the 2 s wait for clients to leave; the lease ends at 3.5 s.)
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let a = send(&app, delete("/v1/vdisks/vd")).await;
    assert_eq!(
        a.status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    // A client that leaves while the delete waits for it does not make it fail.
    ctl.create_vdisk("gone", 16 * MIB, None, None, None)
        .await
        .unwrap();
    *port.0.lock() = vec![(id("gone").await, 1)];
    let leaves = {
        let port = port.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            port.0.lock().clear();
        })
    };
    let a = send(&app, delete("/v1/vdisks/gone")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    leaves.await.unwrap();
    // --force under clients.
    *port.0.lock() = vec![(id("cl").await, 1)];
    let a = send(&app, delete("/v1/vdisks/cl")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let a = send(&app, delete("/v1/vdisks/cl?force=true")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(ctl.check().await.unwrap().ok);
}
