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
//! | DELETE | /v1/vdisks/{name}[?with_snapshots=true] | -                 |
//! | POST   | /v1/vdisks/{name}/resize    | `ResizeVdisk` -> `VdiskView`  |
//! | GET    | /v1/vdisks/{name}/map       | `MapView`                     |
//! | POST   | /v1/vdisks/{name}/snapshots | `CreateSnapshot` -> `SnapshotView` |
//! | GET    | /v1/snapshots[?vdisk=NAME]  | `[SnapshotView]`              |
//! | DELETE | /v1/snapshots/{vdisk@snap}  | -                             |
//! | POST   | /v1/clones                  | `CloneVdisk` -> `VdiskView`   |
//! | POST   | /v1/vdisks/{name}/rollback  | `Rollback` -> `VdiskView`     |
//! | GET    | /v1/diff?from=A&to=B        | `DiffView`                    |
//!
//! Errors answer with a status code and `{"error": "..."}`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tabula_api::ControlError;
use tabula_api::admin::{
    AddContainer, ApiError, CloneVdisk, CreateSnapshot, CreateVdisk, MigrateVdisk, ResizeVdisk,
    Rollback,
};

use crate::Controller;

type Ctl = State<Arc<Controller>>;

struct Error(ControlError);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Exists(_) => StatusCode::CONFLICT,
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

pub fn router(ctl: Arc<Controller>) -> Router {
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
                c.delete_vdisk(&name, q.with_snapshots)
                    .await
                    .map(|_| StatusCode::NO_CONTENT)
                    .map_err(Error)
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
            axum::routing::delete(|State(c): Ctl, Path(name): Path<String>| async move {
                c.delete_snapshot(&name)
                    .await
                    .map(|_| StatusCode::NO_CONTENT)
                    .map_err(Error)
            }),
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

/// Serves the admin API on `listener` until `shutdown` resolves, and with `agents` set, the
/// agents' gRPC channel on the same port (HTTP/1 and HTTP/2 are told apart per connection).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctl: Arc<Controller>,
    agents: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = router(ctl.clone());
    if agents {
        app = app.merge(crate::grpc::router(ctl));
    }
    // Small request/response exchanges (faults, heartbeats, acks) must not sit out Nagle
    // against the peer's delayed ACK (measured: 44 ms p99 fault latency without this).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|s| {
        let _ = s.set_nodelay(true);
    });
    // Agents' registrations record the address they come from (`ConnectInfo`).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
