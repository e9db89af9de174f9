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
    AddContainer, ApiError, CloneVdisk, CreateSnapshot, CreateVdisk, ResizeVdisk, Rollback,
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
            }),
        )
        .route(
            "/v1/vdisks",
            get(|State(c): Ctl| async move { Json(c.list_vdisk_views().await) }).post(
                |State(c): Ctl, Json(req): Json<CreateVdisk>| async move {
                    c.create_vdisk(&req.name, req.size, req.segment_size, req.cow)
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

/// Serves the admin API on `listener` until `shutdown` resolves.
/// Serves the admin API on `listener`, and with `agents` set, the agents' gRPC channel on
/// the same port (HTTP/1 and HTTP/2 are told apart per connection).
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
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
