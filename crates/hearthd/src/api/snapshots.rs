use super::ApiJson;
use crate::error::Result;
use crate::service::snapshots::Timings;
use crate::service::Service;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::Json;
use hearth_api::{
    CreateSnapshotRequest, CreateSnapshotResponse, MachineEnvelope, RestoreRequest,
    SnapshotEnvelope, SnapshotList,
};
use std::sync::Arc;

type Svc = State<Arc<Service>>;

/// The phases of the operation as a standard `Server-Timing` header (milliseconds).
fn server_timing(t: &Timings) -> HeaderMap {
    let value = t
        .iter()
        .map(|(name, d)| format!("{name};dur={:.1}", d.as_secs_f64() * 1000.0))
        .collect::<Vec<_>>()
        .join(", ");
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("server-timing", v);
    }
    headers
}

pub async fn create(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> Result<(StatusCode, HeaderMap, Json<CreateSnapshotResponse>)> {
    let (resp, timings) = svc.create_snapshot(&id, req).await?;
    Ok((StatusCode::CREATED, server_timing(&timings), Json(resp)))
}

pub async fn list_for_machine(
    State(svc): Svc,
    Path(id): Path<String>,
) -> Result<Json<SnapshotList>> {
    Ok(Json(SnapshotList {
        snapshots: svc.list_snapshots(Some(&id))?,
    }))
}

pub async fn list(State(svc): Svc) -> Result<Json<SnapshotList>> {
    Ok(Json(SnapshotList {
        snapshots: svc.list_snapshots(None)?,
    }))
}

pub async fn get(State(svc): Svc, Path(id): Path<String>) -> Result<Json<SnapshotEnvelope>> {
    Ok(Json(SnapshotEnvelope {
        snapshot: svc.get_snapshot(&id)?,
    }))
}

pub async fn delete(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode> {
    svc.delete_snapshot(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn restore(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<(StatusCode, HeaderMap, Json<MachineEnvelope>)> {
    let (machine, timings) = svc.restore(&id, req).await?;
    Ok((
        StatusCode::CREATED,
        server_timing(&timings),
        Json(MachineEnvelope { machine }),
    ))
}
