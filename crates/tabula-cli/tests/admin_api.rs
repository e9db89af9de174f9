//! The admin API as clients meet it, against the real binary: every error is a JSON
//! `{"error": ...}`, slow or idle clients are cut off, and a vdisk with connected NBD
//! clients is not deleted without `--force`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::nbd::{Client, NbdErr};
use common::{Server, have, poll, run_timeout};

/// How long the admin API waits for a request's head (and body) before it closes the
/// connection; tests allow this much plus slack.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// `curl -sS -X METHOD [-H Content-Type] [-d BODY] URL`: (status, body).
fn curl(method: &str, url: &str, content_type: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut args = vec!["-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}"];
    if let Some(ct) = content_type {
        args.extend(["-H", ct]);
    }
    if let Some(b) = body {
        args.extend(["-d", b]);
    }
    args.push(url);
    let out = run_timeout("curl", &args, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error answer is not JSON ({e}): {body:?}"));
    v["error"]
        .as_str()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| panic!("no error text: {body}"))
        .to_string()
}

#[test]
fn malformed_requests_get_json_errors() {
    if !have("curl") {
        return;
    }
    let mut srv = Server::start("64M");
    let api = srv.api();
    let json = Some("Content-Type: application/json");
    // (method, path, content type header, body, status, what the error mentions)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        u16,
        &'a str,
    );
    let cases: &[Case] = &[
        ("POST", "/v1/vdisks", json, Some("{bad"), 400, "JSON"),
        (
            "POST",
            "/v1/vdisks",
            json,
            Some(r#"{"name":"x"}"#),
            422,
            "size",
        ),
        // curl -d without a content type sends a form.
        (
            "POST",
            "/v1/vdisks",
            None,
            Some(r#"{"name":"x","size":1048576}"#),
            415,
            "application/json",
        ),
        ("GET", "/v1/nothing", None, None, 404, "/v1/nothing"),
        ("PUT", "/v1/vdisks", json, Some("{}"), 405, "GET"),
        ("GET", "/v1/diff?from=a", None, None, 400, "to"),
    ];
    for &(method, path, ct, body, status, mention) in cases {
        let (code, text) = curl(method, &format!("{api}{path}"), ct, body);
        assert_eq!(code, status, "{method} {path}: {text}");
        let e = error_of(&text);
        assert!(
            e.contains(mention),
            "{method} {path}: {e:?} should mention {mention:?}"
        );
    }
    srv.stop_and_check();
}

/// Writes `bytes` one at a time, `gap` apart (repeating the last one past the end if
/// `repeat`, else then falling silent), until the server closes the connection; returns how
/// long that took, or `None` if it was still open after `limit`.
fn trickle(
    addr: &str,
    bytes: &[u8],
    repeat: bool,
    gap: Duration,
    limit: Duration,
) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(gap)).unwrap();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < limit {
        if i < bytes.len() || (repeat && !bytes.is_empty()) {
            // Repeating past the end, the client never stops sending.
            let b = bytes[i.min(bytes.len() - 1)];
            i += 1;
            if s.write_all(&[b]).is_err() {
                return Some(start.elapsed());
            }
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            // Closed, or an answer (a 408) before closing: either way it is cut off.
            Ok(_) => return Some(start.elapsed()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A client that sends its request head a byte every 200 ms, one that says nothing, one that
/// stops inside the HTTP/2 preface and one that trickles a body are all cut off within the
/// read timeout, while the API keeps answering others.
#[test]
fn slow_and_idle_clients_are_cut_off() {
    let mut srv = Server::start("64M");
    let addr = format!("127.0.0.1:{}", srv.api_port);
    let bound = READ_TIMEOUT * 2 + Duration::from_secs(5);
    let limit = bound + Duration::from_secs(10);
    let mut header = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
    header.extend(std::iter::repeat_n(b'a', 400));
    let body = b"POST /v1/vdisks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";
    let clients: Vec<(&str, Vec<u8>, Duration)> = vec![
        ("slow header", header, Duration::from_millis(200)),
        ("idle", Vec::new(), Duration::from_millis(200)),
        (
            "stalled HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n".to_vec(),
            Duration::from_millis(10),
        ),
        ("slow body", body.to_vec(), Duration::from_millis(1)),
    ];
    let threads: Vec<_> = clients
        .into_iter()
        .map(|(what, bytes, gap)| {
            let addr = addr.clone();
            // The body trickles a byte every 200 ms once the head is sent.
            std::thread::spawn(move || {
                let bytes = if what == "slow body" {
                    let mut b = bytes;
                    b.extend(std::iter::repeat_n(b' ', 900));
                    b
                } else {
                    bytes
                };
                let head_len = bytes.iter().position(|&b| b == b'{').unwrap_or(0);
                let r = if what == "slow body" {
                    let mut s = TcpStream::connect(&addr).unwrap();
                    s.write_all(&bytes[..=head_len]).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let start = Instant::now();
                    let mut answer = Vec::new();
                    let mut closed = None;
                    let mut i = head_len + 1;
                    while start.elapsed() < limit && closed.is_none() {
                        if i < bytes.len() && s.write_all(&bytes[i..=i]).is_err() {
                            closed = Some(start.elapsed());
                        }
                        i += 1;
                        let mut buf = [0u8; 512];
                        match s.read(&mut buf) {
                            Ok(0) => closed = Some(start.elapsed()),
                            Ok(n) => answer.extend_from_slice(&buf[..n]),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => closed = Some(start.elapsed()),
                        }
                    }
                    let answer = String::from_utf8_lossy(&answer).to_string();
                    if closed.is_some() && !answer.is_empty() {
                        assert!(
                            answer.starts_with("HTTP/1.1 408") && answer.contains("\"error\""),
                            "a body that never arrives gets a JSON 408: {answer}"
                        );
                    }
                    closed
                } else {
                    // Stopped inside the HTTP/2 preface: nothing more, so only the read
                    // timeout can end it (a repeated byte would turn it into HTTP/1).
                    let repeat = what != "stalled HTTP/2 preface";
                    trickle(&addr, &bytes, repeat, gap, limit)
                };
                (what, r)
            })
        })
        .collect();
    // Meanwhile the API answers.
    std::thread::sleep(Duration::from_secs(1));
    srv.cli(&["status"]);
    for t in threads {
        let (what, r) = t.join().unwrap();
        match r {
            Some(d) => assert!(d <= bound, "{what} client cut off only after {d:?}"),
            None => panic!("{what} client still connected after {limit:?}"),
        }
    }
    srv.cli(&["status"]);
    srv.stop_and_check();
}

#[test]
fn deleting_a_vdisk_with_connected_clients_needs_force() {
    let mut srv = Server::start("64M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    srv.cli(&["vdisk", "create", "other", "--size", "8M"]);
    let mut c = Client::connect(srv.nbd_port, "vd").unwrap();
    c.write(0, &[0x5a; 4096], true).unwrap();

    // Refused while connected, naming the agent and the way out.
    let out = srv.try_cli(&["vdisk", "delete", "vd"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "delete of a connected vdisk succeeded"
    );
    assert!(
        err.contains("connected") && err.contains("local") && err.contains("--force"),
        "{err}"
    );
    // Nothing changed: the client goes on.
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    c.flush().unwrap();
    // The HTTP answer is a 409 with a JSON error.
    if have("curl") {
        let (code, body) = curl("DELETE", &format!("{}/v1/vdisks/vd", srv.api()), None, None);
        assert_eq!(code, 409, "{body}");
        assert!(error_of(&body).contains("--force"));
    }

    // --force deletes it; the client's I/O then fails.
    srv.cli(&["vdisk", "delete", "vd", "--force"]);
    assert!(matches!(
        c.read(0, 4096),
        Err(NbdErr::Errno(_)) | Err(NbdErr::Io(_))
    ));
    assert!(Client::connect(srv.nbd_port, "vd").is_err());

    // After the client disconnects, a plain delete works.
    let mut o = Client::connect(srv.nbd_port, "other").unwrap();
    o.write(0, &[1; 4096], false).unwrap();
    assert!(!srv.try_cli(&["vdisk", "delete", "other"]).status.success());
    o.disconnect();
    poll(
        "delete after the client disconnected was still refused",
        Duration::from_secs(5),
        || {
            srv.try_cli(&["vdisk", "delete", "other"])
                .status
                .success()
                .then_some(())
        },
    );
    srv.stop_and_check();
}

#[test]
fn snapshots_with_connected_clients_need_force_too() {
    let mut srv = Server::start("64M");
    srv.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    srv.cli(&["snapshot", "create", "vd", "s"]);
    let mut c = Client::connect(srv.nbd_port, "vd@s").unwrap();
    c.read(0, 4096).unwrap();
    for args in [
        &["vdisk", "delete", "vd", "--with-snapshots"][..],
        &["snapshot", "delete", "vd@s"][..],
    ] {
        let out = srv.try_cli(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("vd@s") && err.contains("--force"),
            "{args:?}: {err}"
        );
    }
    // The vdisk itself has no client: without --with-snapshots the refusal is about the
    // snapshots, as before.
    srv.cli(&["snapshot", "delete", "vd@s", "--force"]);
    assert!(c.read(0, 4096).is_err());
    srv.cli(&["vdisk", "delete", "vd"]);
    srv.stop_and_check();
}

/// A networked agent reports its clients to the controller, which refuses the delete; the
/// agent's gRPC session (HTTP/2 on the admin port) outlives the HTTP/1 read timeout.
#[test]
fn distributed_delete_refused_while_an_agent_serves_the_vdisk() {
    let mut cl = Cluster::start("256M", &["a1"]);
    let ctl = &cl.controller;
    ctl.cli(&["vdisk", "create", "vd", "--size", "8M"]);
    let started = Instant::now();
    let mut c = cl.agent("a1").client("vd");
    c.write(0, &[7; 4096], true).unwrap();
    // The agent reports a new connection at once, not at its next heartbeat.
    let out = ctl.try_cli(&["vdisk", "delete", "vd"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "delete succeeded under a connected client"
    );
    assert!(err.contains("a1") && err.contains("--force"), "{err}");
    // The session stays up past the read timeout (no new session, I/O works).
    std::thread::sleep((READ_TIMEOUT + Duration::from_secs(3)).saturating_sub(started.elapsed()));
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
    let log = cl.controller.proc.log_text();
    assert!(
        !log.contains("registered again"),
        "the agent's session was cut:\n{log}"
    );
    c.disconnect();
    poll(
        "delete after the client disconnected was still refused",
        Duration::from_secs(10),
        || {
            cl.controller
                .try_cli(&["vdisk", "delete", "vd"])
                .status
                .success()
                .then_some(())
        },
    );
    cl.stop_and_check();
}
