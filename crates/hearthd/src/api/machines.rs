use super::ApiJson;
use crate::access::Caller;
use crate::error::Result;
use crate::service::Service;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::{Extension, Json};
use hearth_api::{
    CreateMachineRequest, ExecRequest, ExecResponse, ForkRequest, MachineEnvelope, MachineList,
    NetworkRequest, PortEnvelope, PortList, PublishPortRequest,
};
use std::sync::Arc;

type Svc = State<Arc<Service>>;

pub async fn create(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateMachineRequest>,
) -> Result<(StatusCode, Json<MachineEnvelope>)> {
    let machine = svc.create_machine(req, caller).await?;
    Ok((StatusCode::CREATED, Json(MachineEnvelope { machine })))
}

pub async fn list(State(svc): Svc) -> Result<Json<MachineList>> {
    Ok(Json(MachineList {
        machines: svc.list_machines()?,
    }))
}

pub async fn get(State(svc): Svc, Path(id): Path<String>) -> Result<Json<MachineEnvelope>> {
    Ok(Json(MachineEnvelope {
        machine: svc.get_machine(&id)?,
    }))
}

pub async fn delete(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode> {
    svc.delete_machine(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn stop(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode> {
    svc.stop_machine(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn start(State(svc): Svc, Path(id): Path<String>) -> Result<Json<MachineEnvelope>> {
    Ok(Json(MachineEnvelope {
        machine: svc.start_machine(&id).await?,
    }))
}

pub async fn exec(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Json<ExecResponse>> {
    Ok(Json(svc.exec(&id, req).await?))
}

pub async fn fork(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ForkRequest>,
) -> Result<(StatusCode, HeaderMap, Json<MachineEnvelope>)> {
    let (machine, timings) = svc.fork_machine(&id, req).await?;
    Ok((
        StatusCode::CREATED,
        super::snapshots::server_timing(&timings),
        Json(MachineEnvelope { machine }),
    ))
}

pub async fn set_network(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NetworkRequest>,
) -> Result<Json<MachineEnvelope>> {
    Ok(Json(MachineEnvelope {
        machine: svc.set_network_policy(&id, req).await?,
    }))
}

pub async fn publish_port(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PublishPortRequest>,
) -> Result<(StatusCode, Json<PortEnvelope>)> {
    let port = svc.publish_port(&id, req).await?;
    Ok((StatusCode::CREATED, Json(PortEnvelope { port })))
}

pub async fn list_ports(State(svc): Svc, Path(id): Path<String>) -> Result<Json<PortList>> {
    Ok(Json(PortList {
        ports: svc.list_ports(&id)?,
    }))
}

pub async fn unpublish_port(
    State(svc): Svc,
    Path((id, port_id)): Path<(String, String)>,
) -> Result<StatusCode> {
    svc.unpublish_port(&id, &port_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
