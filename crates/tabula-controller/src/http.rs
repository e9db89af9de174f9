//! The admin API: JSON over HTTP, routed to [`Controller`] methods. It only converts and
//! routes; every decision is in the service.
//!
//! | method | path                        | body / answer                 |
//! |--------|-----------------------------|-------------------------------|
//! | GET    | /v1/status                  | `StatusView`                  |
//! | GET    | /v1/check                   | `CheckView`                   |
//! | GET    | /v1/containers              | `[ContainerView]`             |
//! | POST   | /v1/containers              | `AddContainer` -> `ContainerView` |
//! | GET    | /v1/containers/{name}       | `ContainerView`               |
//! | GET    | /v1/vdisks                  | `[VdiskView]`                 |
//! | POST   | /v1/vdisks                  | `CreateVdisk` -> `VdiskView`  |
//! | GET    | /v1/vdisks/{name}           | `VdiskView`                   |
//! | DELETE | /v1/vdisks/{name}[?with_snapshots=true][&force=true] | - |
//! | POST   | /v1/vdisks/{name}/resize    | `ResizeVdisk` -> `VdiskView`  |
//! | GET    | /v1/vdisks/{name}/map       | `MapView`                     |
//! | POST   | /v1/vdisks/{name}/snapshots | `CreateSnapshot` -> `SnapshotView` |
//! | GET    | /v1/snapshots[?vdisk=NAME]  | `[SnapshotView]`              |
//! | DELETE | /v1/snapshots/{vdisk@snap}[?force=true] | -                 |
//! | POST   | /v1/clones                  | `CloneVdisk` -> `VdiskView`   |
//! | POST   | /v1/vdisks/{name}/rollback  | `Rollback` -> `VdiskView`     |
//! | GET    | /v1/diff?from=A&to=B        | `DiffView`                    |
//!
//! Errors answer with a status code and `{"error": "..."}`: those of the service, and those
//! of the request itself (a body that is not JSON or lacks a field, a wrong content type, an
//! unknown path or method, a body over [`MAX_BODY`] or slower than the read timeout), which
//! one layer ([`edge`]) turns into that shape. Deleting a vdisk or snapshot that NBD clients
//! are connected to answers 409 unless `force=true`.
//!
//! The server ([`serve`]) tells HTTP/1 (the admin API) from HTTP/2 (the agents' gRPC
//! channel) per connection. A client must send a request's head, and then its body, within
//! the read timeout ([`Limits`]), which also closes idle HTTP/1 connections; HTTP/2
//! connections carry agents' long-lived session streams and are kept only while their peer
//! answers pings.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use tabula_api::ControlError;
use tabula_api::admin::{
    AddContainer, ApiError, CloneVdisk, CreateSnapshot, CreateVdisk, MigrateVdisk, ResizeVdisk,
    Rollback,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::Controller;

type Ctl = State<Arc<Controller>>;

struct Error(ControlError);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Exists(_) | ControlError::InUse(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ControlError::Unavailable(_) | ControlError::Retry { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ControlError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            code,
            Json(ApiError {
                error: self.0.to_string(),
            }),
        )
            .into_response()
    }
}

impl From<ControlError> for Error {
    fn from(e: ControlError) -> Self {
        Error(e)
    }
}

type R<T> = Result<Json<T>, Error>;

/// The largest request body the admin API reads (its requests are a few hundred bytes).
pub const MAX_BODY: usize = 64 << 10;

/// How long admin API clients may take, and how long connections are kept.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest a client may take to send a request's head (counted from when the server
    /// starts waiting for it: at connect, or after the previous answer on a kept-alive
    /// connection, so it also closes idle HTTP/1 connections), and then its body.
    pub read_timeout: Duration,
    /// HTTP/2: a ping is sent after this long without traffic, and the connection closed if
    /// it is not answered within as long again.
    pub h2_keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            read_timeout: Duration::from_secs(10),
            h2_keepalive: Duration::from_secs(10),
        }
    }
}

fn json_error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

/// The admin API's edge: reads the request body within the read timeout and size limit, and
/// turns every error answer that is not already JSON (axum's rejections of a body, path or
/// query, an unknown path or method) into `{"error": ...}`, keeping its status and headers.
async fn edge(read_timeout: Duration, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let body =
        match tokio::time::timeout(read_timeout, Limited::new(body, MAX_BODY).collect()).await {
            Err(_) => {
                return json_error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {}s",
                        read_timeout.as_secs_f64()
                    ),
                );
            }
            Ok(Err(e)) if e.is::<LengthLimitError>() => return too_large(),
            Ok(Err(e)) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                );
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
    let resp = next.run(Request::from_parts(parts, Body::from(body))).await;
    as_json_error(resp, &method, &path).await
}

fn too_large() -> Response {
    json_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body over the {} KiB limit of the admin API",
            MAX_BODY >> 10
        ),
    )
}

async fn as_json_error(resp: Response, method: &Method, path: &str) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
        .unwrap_or_default();
    let error = match status {
        StatusCode::NOT_FOUND if text.is_empty() => not_found_text(method, path),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("other methods");
            format!("{method} is not allowed on {path}: it takes {allowed}")
        }
        _ if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string(),
        _ => text,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ApiError { error }).unwrap_or_default();
    Response::from_parts(parts, Body::from(body))
}

fn not_found_text(method: &Method, path: &str) -> String {
    format!("no such endpoint: {method} {path} (the admin API's routes start with /v1/)")
}

/// The answer to a path no route matches.
async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    json_error(StatusCode::NOT_FOUND, not_found_text(&method, uri.path()))
}

/// The admin API's routes behind [`edge`].
pub fn router(ctl: Arc<Controller>) -> Router {
    router_with(ctl, Limits::default())
}

fn router_with(ctl: Arc<Controller>, limits: Limits) -> Router {
    let read_timeout = limits.read_timeout;
    // The routes sit behind an outer router so that `edge` sees their final answers (a 405
    // gets its `Allow` header inside a route).
    Router::new()
        .fallback_service(routes(ctl).fallback(not_found))
        .layer(axum::middleware::from_fn(move |req, next| {
            edge(read_timeout, req, next)
        }))
}

fn routes(ctl: Arc<Controller>) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(c): Ctl| async move { Json(c.status().await) }),
        )
        .route(
            "/metrics",
            get(|State(c): Ctl| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics(&c.status().await),
                )
            }),
        )
        .route(
            "/v1/check",
            get(|State(c): Ctl| async move { c.check().await.map(Json).map_err(Error) }),
        )
        .route(
            "/v1/containers",
            get(|State(c): Ctl| async move { Json(c.list_containers().await) }).post(
                |State(c): Ctl, Json(req): Json<AddContainer>| async move {
                    let r: R<_> = c
                        .add_container(&req.name, &req.path, req.size)
                        .await
                        .map(Json)
                        .map_err(Error);
                    r
                },
            ),
        )
        .route(
            "/v1/containers/{name}",
            get(|State(c): Ctl, Path(name): Path<String>| async move {
                c.container_by_name(&name).await.map(Json).map_err(Error)
            })
            .delete(|State(c): Ctl, Path(name): Path<String>| async move {
                c.remove_container(&name)
                    .await
                    .map(|_| StatusCode::NO_CONTENT)
                    .map_err(Error)
            }),
        )
        .route(
            "/v1/containers/{name}/drain",
            post(|State(c): Ctl, Path(name): Path<String>| async move {
                c.drain_container(&name).await.map(Json).map_err(Error)
            })
            .delete(|State(c): Ctl, Path(name): Path<String>| async move {
                c.cancel_drain(&name).await.map(Json).map_err(Error)
            }),
        )
        .route(
            "/v1/moves",
            get(|State(c): Ctl| async move { Json(c.list_moves()) }),
        )
        .route(
            "/v1/vdisks/{name}/migrate",
            post(
                |State(c): Ctl, Path(name): Path<String>, Json(req): Json<MigrateVdisk>| async move {
                    c.migrate_vdisk(&name, &req.to)
                        .await
                        .map(Json)
                        .map_err(Error)
                },
            ),
        )
        .route(
            "/v1/vdisks",
            get(|State(c): Ctl| async move { Json(c.list_vdisk_views().await) }).post(
                |State(c): Ctl, Json(req): Json<CreateVdisk>| async move {
                    c.create_vdisk(
                        &req.name,
                        req.size,
                        req.segment_size,
                        req.cow,
                        req.container.as_deref(),
                    )
                        .await
                        .map(Json)
                        .map_err(Error)
                },
            ),
        )
        .route(
            "/v1/vdisks/{name}",
            get(|State(c): Ctl, Path(name): Path<String>| async move {
                c.vdisk_by_name(&name).await.map(Json).map_err(Error)
            })
            .delete(|State(c): Ctl, Path(name): Path<String>, Query(q): Query<DeleteQuery>| async move {
                let r = if q.force {
                    c.force_delete_vdisk(&name, q.with_snapshots).await
                } else {
                    c.delete_vdisk(&name, q.with_snapshots).await
                };
                r.map(|_| StatusCode::NO_CONTENT).map_err(Error)
            }),
        )
        .route(
            "/v1/vdisks/{name}/resize",
            post(
                |State(c): Ctl, Path(name): Path<String>, Json(req): Json<ResizeVdisk>| async move {
                    c.resize_vdisk(&name, req.size)
                        .await
                        .map(Json)
                        .map_err(Error)
                },
            ),
        )
        .route(
            "/v1/vdisks/{name}/map",
            get(|State(c): Ctl, Path(name): Path<String>| async move {
                c.map_view(&name).await.map(Json).map_err(Error)
            }),
        )
        .route(
            "/v1/vdisks/{name}/snapshots",
            post(
                |State(c): Ctl, Path(name): Path<String>, Json(req): Json<CreateSnapshot>| async move {
                    c.create_snapshot(&name, &req.name)
                        .await
                        .map(Json)
                        .map_err(Error)
                },
            ),
        )
        .route(
            "/v1/snapshots",
            get(|State(c): Ctl, Query(q): Query<SnapshotQuery>| async move {
                c.list_snapshots(q.vdisk.as_deref())
                    .await
                    .map(Json)
                    .map_err(Error)
            }),
        )
        .route(
            "/v1/snapshots/{name}",
            axum::routing::delete(
                |State(c): Ctl, Path(name): Path<String>, Query(q): Query<ForceQuery>| async move {
                    let r = if q.force {
                        c.force_delete_snapshot(&name).await
                    } else {
                        c.delete_snapshot(&name).await
                    };
                    r.map(|_| StatusCode::NO_CONTENT).map_err(Error)
                },
            ),
        )
        .route(
            "/v1/clones",
            post(|State(c): Ctl, Json(req): Json<CloneVdisk>| async move {
                c.clone_vdisk(&req.source, &req.name, req.cow)
                    .await
                    .map(Json)
                    .map_err(Error)
            }),
        )
        .route(
            "/v1/vdisks/{name}/rollback",
            post(
                |State(c): Ctl, Path(name): Path<String>, Json(req): Json<Rollback>| async move {
                    c.rollback(&name, &req.snapshot)
                        .await
                        .map(Json)
                        .map_err(Error)
                },
            ),
        )
        .route(
            "/v1/diff",
            get(|State(c): Ctl, Query(q): Query<DiffQuery>| async move {
                c.diff(&q.from, &q.to).await.map(Json).map_err(Error)
            }),
        )
        .with_state(ctl)
}

/// The pool's numbers in the Prometheus text format.
fn metrics(s: &tabula_api::admin::StatusView) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let flag = |b: bool| u64::from(b);
    gauge(
        "tabula_pool_capacity_bytes",
        "Bytes of all containers.",
        &[(String::new(), s.capacity)],
    );
    gauge(
        "tabula_pool_free_bytes",
        "Free bytes in the pool.",
        &[(String::new(), s.free)],
    );
    gauge(
        "tabula_pool_low_space",
        "1 while allocatable free space is under the low-space threshold.",
        &[(String::new(), flag(s.low_space))],
    );
    gauge(
        "tabula_pool_out_of_space",
        "1 while allocating writes fail with ENOSPC.",
        &[(String::new(), flag(s.out_of_space))],
    );
    gauge(
        "tabula_enospc_faults",
        "Allocation faults refused for lack of space since start.",
        &[(String::new(), s.enospc_faults)],
    );
    let per = |f: &dyn Fn(&tabula_api::admin::ContainerView) -> u64| -> Vec<(String, u64)> {
        s.containers
            .iter()
            .map(|c| (format!("{{container=\"{}\"}}", c.name), f(c)))
            .collect()
    };
    gauge(
        "tabula_container_size_bytes",
        "Container size.",
        &per(&|c| c.size),
    );
    gauge(
        "tabula_container_free_bytes",
        "Free bytes in the container.",
        &per(&|c| c.free),
    );
    gauge(
        "tabula_container_failed",
        "1 while nobody can reach the container.",
        &per(&|c| flag(c.state == "failed")),
    );
    gauge(
        "tabula_container_unreachable_agents",
        "Agents whose path to the container is down.",
        &per(&|c| c.unreachable_from.len() as u64),
    );
    o
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    with_snapshots: bool,
    /// Even while NBD clients are connected.
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
struct SnapshotQuery {
    vdisk: Option<String>,
}

#[derive(Deserialize)]
struct DiffQuery {
    from: String,
    to: String,
}

/// The admin API, and with `agents` set, the agents' gRPC channel (whose paths do not go
/// through [`edge`]: its streams are long-lived and its errors are gRPC statuses).
pub fn app(ctl: Arc<Controller>, agents: bool, limits: Limits) -> Router {
    let admin = router_with(ctl.clone(), limits);
    if agents {
        // Every path that is not the gRPC service's is the admin API's (a gRPC client
        // calling an unknown service gets a 404, which it reads as UNIMPLEMENTED).
        crate::grpc::router(ctl).fallback_service(admin)
    } else {
        admin
    }
}

/// Serves the admin API on `listener` until `shutdown` resolves, and with `agents` set, the
/// agents' gRPC channel on the same port (HTTP/1 and HTTP/2 are told apart per connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctl: Arc<Controller>,
    agents: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits::default();
    serve_app(listener, app(ctl, agents, limits), limits, shutdown).await
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, asks every
/// connection to finish (HTTP/1 after its current request, HTTP/2 with GOAWAY) and waits for
/// them.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // pause instead of spinning; the listener itself stays usable.
                    debug!(error = %e, "admin API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        while conns.try_join_next().is_some() {}
        // Small request/response exchanges (faults, heartbeats, acks) must not sit out
        // Nagle against the peer's delayed ACK (measured: 44 ms p99 fault latency without
        // this).
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        // Agents' registrations record the address they come from (`ConnectInfo`), to name
        // it when a second agent asks for the same name.
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        conns.spawn(connection(stream, app, limits, stop_rx.clone()));
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// The first bytes of every HTTP/2 connection.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes either stop matching the HTTP/2 preface (HTTP/1) or complete it;
/// returns what was read and whether it is HTTP/2, or `None` if the peer closed first.
async fn sniff(s: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    let mut buf = [0u8; 24];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            return Ok(None);
        }
        n += k;
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some((buf[..n].to_vec(), false)));
        }
    }
    Ok(Some((buf.to_vec(), true)))
}

async fn connection(
    mut stream: TcpStream,
    app: Router,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Telling the protocols apart is bounded like a request's head: a peer that connects
    // and says nothing (or stops inside the preface) is dropped.
    let (prefix, h2) = tokio::select! {
        r = tokio::time::timeout(limits.read_timeout, sniff(&mut stream)) => match r {
            Ok(Ok(Some(x))) => x,
            _ => return,
        },
        _ = stop.wait_for(|s| *s) => return,
    };
    let io = hyper_util::rt::TokioIo::new(Prefixed {
        prefix,
        pos: 0,
        inner: stream,
    });
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let timer = hyper_util::rt::TokioTimer::new();
    // Runs a connection until it ends, asking it to finish gracefully once `stop` is set.
    macro_rules! drive {
        ($conn:expr) => {{
            let mut conn = std::pin::pin!($conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(error = %e, "admin API connection ended");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        }};
    }
    if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        b.timer(timer)
            .keep_alive_interval(limits.h2_keepalive)
            .keep_alive_timeout(limits.h2_keepalive);
        drive!(b.serve_connection(io, svc))
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(timer).header_read_timeout(limits.read_timeout);
        drive!(b.serve_connection(io, svc))
    }
}

/// A connection whose first bytes were already read (to tell HTTP/1 from HTTP/2): reads
/// return them first.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
