use super::ApiJson;
use crate::access::Caller;
use crate::error::Error;
use crate::error::Result;
use crate::service::snapshots::Timings;
use crate::service::Service;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hearth_api::{
    CreateSnapshotRequest, CreateSnapshotResponse, MachineEnvelope, RestoreRequest,
    SnapshotEnvelope, SnapshotList, UploadRequest, UploadResponse,
};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

type Svc = State<Arc<Service>>;

/// The phases of the operation as a standard `Server-Timing` header (milliseconds).
pub(super) fn server_timing(t: &Timings) -> HeaderMap {
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// Compute (and keep) every artifact's digest not known yet.
    #[serde(default)]
    hashes: bool,
}

pub async fn get(
    State(svc): Svc,
    Path(id): Path<String>,
    q: std::result::Result<
        axum::extract::Query<GetQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<SnapshotEnvelope>> {
    let axum::extract::Query(q) = super::query(q)?;
    let snapshot = if q.hashes {
        svc.get_snapshot_hashed(&id).await?
    } else {
        svc.get_snapshot(&id)?
    };
    Ok(Json(SnapshotEnvelope { snapshot }))
}

pub async fn delete(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode> {
    svc.delete_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn restore(
    State(svc): Svc,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<RestoreRequest>,
) -> Result<(StatusCode, HeaderMap, Json<MachineEnvelope>)> {
    let (machine, timings) = svc.restore(&id, req, caller).await?;
    Ok((
        StatusCode::CREATED,
        server_timing(&timings),
        Json(MachineEnvelope { machine }),
    ))
}

pub async fn upload(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UploadRequest>,
) -> Result<Json<UploadResponse>> {
    Ok(Json(svc.upload_snapshot(&id, req).await?))
}

/// One artifact's bytes, whole (200) or a single `Range: bytes=a-b` (206), streamed.
pub async fn artifact(
    State(svc): Svc,
    Path((id, artifact_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    let (path, size) = svc.artifact_file(&id, &artifact_id)?;
    let range = headers
        .get(axum::http::header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (start, end) = match range {
        None => (0, size),
        Some(spec) => match parse_range(spec, size) {
            Some(r) => r,
            None => return Ok(unsatisfiable(spec, size)),
        },
    };
    let mut file = tokio::fs::File::open(&path).await?;
    file.seek(std::io::SeekFrom::Start(start)).await?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(end - start)));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("content-length", HeaderValue::from(end - start));
    if range.is_some() {
        let cr = format!("bytes {start}-{}/{size}", end - 1);
        h.insert("content-range", HeaderValue::from_str(&cr).expect("ascii"));
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

/// 416 for a range outside `size` bytes.
pub(super) fn unsatisfiable(spec: &str, size: u64) -> Response {
    let mut resp = Error {
        code: hearth_api::ErrorCode::Invalid,
        message: format!("unsatisfiable range {spec:?} for {size} bytes"),
    }
    .into_response();
    *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    resp.headers_mut().insert(
        "content-range",
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    resp
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` as a half-open range within `size`.
pub(super) fn parse_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => (
            a.parse().ok()?,
            b.parse::<u64>().ok()?.saturating_add(1).min(size),
        ),
    };
    (start < end && start < size).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any header and any size: no panic, and a range only within the content.
        #[test]
        fn any_range_header_is_safe(
            spec in prop_oneof![
                "bytes=[0-9]{0,22}-[0-9]{0,22}",
                " ?bytes ?= ?-?[0-9 ,-]{0,30}",
                any::<String>(),
            ],
            size in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()],
        ) {
            if let Some((start, end)) = parse_range(&spec, size) {
                prop_assert!(start < end && end <= size, "{spec:?} of {size}: {start}..{end}");
            }
        }

        /// A well-formed range within the content is served exactly.
        #[test]
        fn ranges_within_the_content_are_exact(size in 1..u64::MAX, a in any::<u64>(), b in any::<u64>()) {
            let (first, last) = (a % size, b % size);
            let (first, last) = (first.min(last), first.max(last));
            prop_assert_eq!(
                parse_range(&format!("bytes={first}-{last}"), size),
                Some((first, last + 1))
            );
            prop_assert_eq!(parse_range(&format!("bytes={first}-"), size), Some((first, size)));
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some((0, 100)));
        assert_eq!(parse_range("bytes=900-", 1000), Some((900, 1000)));
        assert_eq!(parse_range("bytes=-10", 1000), Some((990, 1000)));
        assert_eq!(parse_range("bytes=990-5000", 1000), Some((990, 1000)));
        assert_eq!(parse_range("bytes=1000-1001", 1000), None);
        assert_eq!(parse_range("bytes=5-2", 1000), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
    }
}
