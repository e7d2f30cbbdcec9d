//! HTTP routes and the mapping of requests and errors (the API is described in docs/api.md).

mod files;
mod json;
mod machines;
mod processes;
mod snapshots;

use crate::access::Caller;
use crate::service::Service;
use crate::tcp::RemoteAddr;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::{Extension, Router};
use std::sync::Arc;

pub use json::ApiJson;

/// A query string that did not parse is 400 in the API's error model.
fn query<T>(
    q: std::result::Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> crate::error::Result<axum::extract::Query<T>> {
    q.map_err(|e| crate::error::Error::invalid(format!("bad query string: {}", e.body_text())))
}

/// The API as `caller` may use it.
pub fn router(svc: Arc<Service>, caller: Caller) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(hearth_api::Health { ok: true }) }),
        )
        .route("/machines", post(machines::create).get(machines::list))
        .route(
            "/machines/{id}",
            get(machines::get).delete(machines::delete),
        )
        .route("/machines/{id}/stop", post(machines::stop))
        .route("/machines/{id}/start", post(machines::start))
        .route("/machines/{id}/exec", post(machines::exec))
        .route("/machines/{id}/fork", post(machines::fork))
        .route(
            "/machines/{id}/processes",
            post(processes::start).get(processes::list),
        )
        .route("/machines/{id}/processes/{process}", get(processes::get))
        .route(
            "/machines/{id}/processes/{process}/output",
            get(processes::output),
        )
        .route(
            "/machines/{id}/processes/{process}/stdin",
            post(processes::stdin),
        )
        .route(
            "/machines/{id}/processes/{process}/signal",
            post(processes::signal),
        )
        .route(
            "/machines/{id}/processes/{process}/resize",
            post(processes::resize),
        )
        .route(
            "/machines/{id}/processes/{process}/attach",
            get(processes::attach),
        )
        .route("/machines/{id}/files/ops", post(files::ops))
        .route(
            "/machines/{id}/files/content",
            get(files::download).put(files::upload),
        )
        .route(
            "/machines/{id}/files/archive",
            get(files::get_archive).put(files::put_archive),
        )
        .route("/machines/{id}/files/watch", get(files::watch))
        .route("/machines/{id}/network", patch(machines::set_network))
        .route(
            "/machines/{id}/published-ports",
            post(machines::publish_port).get(machines::list_ports),
        )
        .route(
            "/machines/{id}/published-ports/{port_id}",
            delete(machines::unpublish_port),
        )
        .route(
            "/machines/{id}/snapshots",
            post(snapshots::create).get(snapshots::list_for_machine),
        )
        .route("/snapshots", get(snapshots::list))
        .route(
            "/snapshots/{id}",
            get(snapshots::get).delete(snapshots::delete),
        )
        .route("/snapshots/{id}/restore", post(snapshots::restore))
        .route("/snapshots/{id}/upload", post(snapshots::upload))
        .route(
            "/snapshots/{id}/artifacts/{artifact_id}",
            get(snapshots::artifact),
        )
        .route(
            "/gc",
            post(|State(svc): State<Arc<Service>>| async move { svc.gc().await.map(axum::Json) }),
        )
        .fallback(|| async { crate::error::Error::not_found("no such endpoint") })
        // Bodies are limited where they are read: JSON in `ApiJson`, stdin per call, and
        // uploads stream through without a limit.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(Extension(caller))
        .with_state(svc)
}

/// For the TCP listener: every request must carry `Authorization: Bearer <token>`. A refused
/// request is logged with where it came from, never with what it sent.
pub async fn require_bearer(
    State(token): State<Arc<String>>,
    ConnectInfo(RemoteAddr(remote)): ConnectInfo<RemoteAddr>,
    req: Request,
    next: Next,
) -> Response {
    let expected = format!("Bearer {token}");
    let given = req.headers().get(AUTHORIZATION);
    let given_bytes = given.map(|v| v.as_bytes()).unwrap_or_default();
    if constant_time_eq(given_bytes, expected.as_bytes()) {
        return next.run(req).await;
    }
    tracing::warn!(
        %remote,
        method = %req.method(),
        path = req.uri().path(),
        "refused a TCP request: {}",
        if given.is_some() { "wrong bearer token" } else { "no bearer token" }
    );
    let body = hearth_api::ErrorBody {
        error: "missing or wrong bearer token".into(),
        code: hearth_api::ErrorCode::Invalid,
    };
    (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
