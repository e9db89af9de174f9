//! Several controller addresses (`--controller URL[,URL...]`, `TABULA_CONTROLLER=URL,URL`): the
//! agent and the admin CLI pass over an address where nothing listens, and over standbys (a
//! fake one in this test: 421 with the leader's URL on the admin API, "not the leader" with
//! the `tabula-leader` metadata on gRPC), and end up at the real controller: the agent
//! registers, serves, and a first write (an allocating fault) works.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::cluster::{Agent, Controller, kill_all, wait_connected};
use common::{BIN, assert_success, free_port, have, qemu_io};

/// A controller and agents in a temporary directory, killed on drop (logs printed on failure).
struct Setup {
    controller: Controller,
    agents: Vec<Agent>,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut controller = Controller::prepare(dir.path(), "127.0.0.1", free_port(), &[]);
        controller.spawn();
        Setup {
            controller,
            agents: Vec::new(),
            dir,
        }
    }

    /// Starts an agent with `--controller list` and waits until the controller counts it.
    fn agent(&mut self, name: &str, list: &str) -> &Agent {
        let mut a = Agent::prepare(self.dir.path(), name, "127.0.0.1", free_port(), list, &[]);
        a.spawn(true);
        self.agents.push(a);
        wait_connected(&self.controller, &[name], Duration::from_secs(30));
        self.agents.last().unwrap()
    }

    fn stop_and_check(&mut self) {
        for a in &mut self.agents {
            a.proc.stop();
        }
        self.controller.stop_and_check();
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        kill_all(&mut self.controller, &mut self.agents);
    }
}

/// The admin CLI with `TABULA_CONTROLLER=list` (no --controller), bounded to 60 s.
fn cli_env(list: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["-k", "5", "60", BIN])
        .args(args)
        .env("TABULA_CONTROLLER", list)
        .output()
        .expect("run tabula")
}

fn cli_ok(list: &str, args: &[&str]) -> String {
    let out = cli_env(list, args);
    assert_success(&out, &format!("TABULA_CONTROLLER={list} tabula {args:?}"));
    String::from_utf8(out.stdout).unwrap()
}

/// An address where nothing listens (connections are refused).
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[test]
fn a_dead_first_address_is_passed_over_by_the_agent_and_the_cli() {
    if !have("qemu-io") {
        return;
    }
    let mut s = Setup::start();
    let dead = dead_url();
    let list = format!("{dead},{}", s.controller.url());

    // The CLI: the first address refuses, the second answers.
    cli_ok(
        &list,
        &[
            "vdisk",
            "create",
            "one",
            "--size",
            "64M",
            "--segment-size",
            "1M",
        ],
    );
    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&list, &["status", "--json"])).unwrap();
    assert_eq!(
        st["data_dir"].as_str(),
        Some(s.controller.data_dir.to_str().unwrap()),
        "{st}"
    );

    // The agent registers with the second address and serves; a first write needs a fault
    // answered by the controller.
    let url = s.agent("host-a", &list).url("one");
    let out = qemu_io(
        &url,
        &[
            "write -P 0x5a 0 256k",
            "read -P 0x5a 0 256k",
            "write -P 0x3c 8M 4k",
        ],
    );
    assert!(out.contains("wrote 262144/262144"), "{out}");
    // The writes were allocated by the controller (the map says so through the same list).
    let map: serde_json::Value =
        serde_json::from_str(&cli_ok(&list, &["vdisk", "map", "one", "--json"])).unwrap();
    let mapped = |off: u64| {
        map["entries"].as_array().unwrap().iter().any(|e| {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["state"] == "normal" && o <= off && off < o + l
        })
    };
    assert!(mapped(0) && mapped(8 << 20), "{map}");

    // With no address answering, the error names each one and why.
    let dead2 = dead_url();
    let out = cli_env(&format!("{dead},{dead2}"), &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&dead) && err.contains(&dead2) && err.contains("tried"),
        "the error names every address tried:\n{err}"
    );
    s.stop_and_check();
}

/// A fake standby controller: every admin request gets 421 with `leader` (and a Location),
/// every gRPC call "not the leader" with the `tabula-leader` metadata. Counts what it got.
struct FakeStandby {
    url: String,
    http: Arc<AtomicUsize>,
    grpc: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeStandby {
    fn start(name: &str, leader: Option<String>) -> FakeStandby {
        use axum::http::{HeaderValue, StatusCode, header};
        use axum::response::{IntoResponse, Response};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let http = Arc::new(AtomicUsize::new(0));
        let grpc = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (h, g, name) = (http.clone(), grpc.clone(), name.to_string());
        let handler = move |req: axum::extract::Request| {
            let (h, g, name, leader) = (h.clone(), g.clone(), name.clone(), leader.clone());
            async move {
                let is_grpc = req
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|c| c.starts_with("application/grpc"));
                if is_grpc {
                    g.fetch_add(1, Ordering::Relaxed);
                    return tabula_proto::not_leader(leader.as_deref())
                        .into_http::<axum::body::Body>();
                }
                h.fetch_add(1, Ordering::Relaxed);
                let body = serde_json::json!({
                    "error": format!(
                        "this controller ({name}) is a standby; the leader is at {}",
                        leader.as_deref().unwrap_or("(unknown)")
                    ),
                    "leader": leader,
                });
                let mut resp: Response =
                    (StatusCode::MISDIRECTED_REQUEST, axum::Json(body)).into_response();
                if let Some(l) = &leader {
                    let loc = format!("{l}{}", req.uri().path());
                    resp.headers_mut()
                        .insert(header::LOCATION, HeaderValue::from_str(&loc).unwrap());
                }
                resp
            }
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(handler);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        FakeStandby {
            url,
            http,
            grpc,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for FakeStandby {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Open connections (the agent's channel) would hold a graceful shutdown: do not wait.
        drop(self.thread.take());
    }
}

#[test]
fn standbys_listed_first_lead_the_agent_and_the_cli_to_the_leader() {
    if !have("qemu-io") {
        return;
    }
    let mut s = Setup::start();
    let real = s.controller.url();
    // One standby knows no leader (an election under way), the other names the real one,
    // which is not in the list at all: the agent and the CLI learn it from the hint.
    let lost = FakeStandby::start("lost", None);
    let knows = FakeStandby::start("knows", Some(real.clone()));
    let list = format!("{},{}", lost.url, knows.url);

    cli_ok(
        &list,
        &[
            "vdisk",
            "create",
            "two",
            "--size",
            "64M",
            "--segment-size",
            "1M",
        ],
    );
    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&list, &["status", "--json"])).unwrap();
    assert_eq!(
        st["data_dir"].as_str(),
        Some(s.controller.data_dir.to_str().unwrap()),
        "{st}"
    );
    assert!(
        lost.http.load(Ordering::Relaxed) >= 2,
        "the CLI asked the first standby"
    );
    assert!(
        knows.http.load(Ordering::Relaxed) >= 2,
        "the CLI asked the second standby"
    );

    let url = s.agent("host-b", &list).url("two");
    assert!(
        lost.grpc.load(Ordering::Relaxed) >= 1,
        "the agent asked the first standby"
    );
    assert!(
        knows.grpc.load(Ordering::Relaxed) >= 1,
        "the agent asked the second standby"
    );
    let out = qemu_io(&url, &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]);
    assert!(out.contains("wrote 65536/65536"), "{out}");
    let log = s.agents[0].proc.log_text();
    assert!(log.contains("following the leader"), "agent log:\n{log}");

    // Standbys alone: the CLI's error says each is a standby and which knows no leader.
    let out = cli_env(&format!("{},{}", lost.url, dead_url()), &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&lost.url) && err.contains("standby") && err.contains("no leader is known"),
        "{err}"
    );
    s.stop_and_check();
}

/// The nearest to a failover one controller can give: kill -9 it and start it again, on the
/// same data, at the *other* listed address. A first write issued while no controller
/// answers waits (--fault-wait) and succeeds once it does; the agent follows it there.
#[test]
fn a_controller_that_comes_back_at_the_other_address_is_followed() {
    if !have("qemu-io") {
        return;
    }
    let mut s = Setup::start();
    let first = s.controller.url();
    let other_port = free_port();
    let list = format!("{first},http://127.0.0.1:{other_port}");
    cli_ok(
        &list,
        &[
            "vdisk",
            "create",
            "three",
            "--size",
            "64M",
            "--segment-size",
            "1M",
        ],
    );
    let agent = {
        let dir = s.dir.path().to_path_buf();
        let mut a = Agent::prepare(&dir, "host-c", "127.0.0.1", free_port(), &list, &[]);
        a.fault_wait = "20s".into();
        a.spawn(true);
        s.agents.push(a);
        wait_connected(&s.controller, &["host-c"], Duration::from_secs(30));
        s.agents[0].url("three")
    };
    qemu_io(&agent, &["write -P 0x11 0 64k"]);

    s.controller.proc.kill9();
    let t0 = std::time::Instant::now();
    let writer = {
        let url = agent.clone();
        std::thread::spawn(move || {
            qemu_io(
                &url,
                &[
                    "read -P 0x11 0 64k",
                    "write -P 0x22 16M 64k",
                    "read -P 0x22 16M 64k",
                ],
            )
        })
    };
    // The first write waits for a controller meanwhile.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "the first write did not wait for the controller"
    );
    s.controller.api_port = other_port;
    s.controller.spawn();
    let out = writer
        .join()
        .expect("qemu-io: the first write failed during the move");
    assert!(out.contains("wrote 65536/65536"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    wait_connected(&s.controller, &["host-c"], Duration::from_secs(30));
    s.stop_and_check();
}
