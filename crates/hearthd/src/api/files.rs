//! File routes: buffered operations, streamed contents (with Range), tar archives, watch events.

use super::processes::ndjson;
use super::{query, ApiJson};
use crate::error::{Error, Result};
use crate::service::Service;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use hearth_api::{FileOp, FileOperation, FileResult, FileUploadResponse};
use hearth_proto::files::{DownloadRequest, TarRequest, UploadRequest, WatchRequest};
use serde::Deserialize;
use std::sync::Arc;

type Svc = State<Arc<Service>>;
type QueryResult<T> = std::result::Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub async fn ops(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(op): ApiJson<FileOp>,
) -> Result<Json<FileResult>> {
    Ok(Json(svc.file_op(&id, op).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    path: String,
    user: Option<String>,
    /// Octal permission bits for an upload.
    mode: Option<String>,
    #[serde(default)]
    recursive: bool,
}

impl PathQuery {
    fn no_extras(&self, mode: bool, recursive: bool) -> Result<()> {
        if self.mode.is_some() && !mode {
            return Err(Error::invalid("mode applies to uploads only"));
        }
        if self.recursive && !recursive {
            return Err(Error::invalid("recursive applies to watches only"));
        }
        Ok(())
    }
}

pub async fn download(
    State(svc): Svc,
    Path(id): Path<String>,
    q: QueryResult<PathQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let Query(q) = query(q)?;
    q.no_extras(false, false)?;
    let range = headers
        .get(axum::http::header::RANGE)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let (offset, length) = match &range {
        None => (0, None),
        Some(spec) => {
            // The size decides what a suffix or open range means.
            let mut stat = FileOp::new(FileOperation::Stat, q.path.clone());
            stat.user = q.user.clone();
            let size = svc
                .file_op(&id, stat)
                .await?
                .stat
                .map_or(0, |e| e.size_bytes);
            match super::snapshots::parse_range(spec, size) {
                Some((start, end)) => (start, Some(end - start)),
                None => return Ok(super::snapshots::unsatisfiable(spec, size)),
            }
        }
    };
    let dl = svc
        .download_file(
            &id,
            DownloadRequest {
                path: q.path,
                offset,
                length,
                user: q.user,
            },
        )
        .await?;
    let body = Body::from_stream(dl.body.map(|r| r.map_err(std::io::Error::other)));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("content-length", HeaderValue::from(dl.length));
    if range.is_some() {
        let last = (offset + dl.length).max(1) - 1;
        let cr = format!("bytes {offset}-{last}/{}", dl.size);
        h.insert("content-range", HeaderValue::from_str(&cr).expect("ascii"));
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

pub async fn upload(
    State(svc): Svc,
    Path(id): Path<String>,
    q: QueryResult<PathQuery>,
    body: Body,
) -> Result<(StatusCode, Json<FileUploadResponse>)> {
    let Query(q) = query(q)?;
    q.no_extras(true, false)?;
    let mode = q
        .mode
        .as_deref()
        .map(|m| {
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "mode {} is not octal permission bits",
                        hearth_api::excerpt(m)
                    ))
                })
        })
        .transpose()?;
    let path = q.path.clone();
    let size_bytes = svc
        .upload_file(
            &id,
            UploadRequest {
                path: q.path,
                mode,
                user: q.user,
            },
            body.into_data_stream(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(FileUploadResponse { path, size_bytes }),
    ))
}

pub async fn get_archive(
    State(svc): Svc,
    Path(id): Path<String>,
    q: QueryResult<PathQuery>,
) -> Result<Response> {
    let Query(q) = query(q)?;
    q.no_extras(false, false)?;
    let tar = svc
        .get_archive(
            &id,
            TarRequest {
                path: q.path,
                user: q.user,
            },
        )
        .await?;
    let mut resp = Response::new(Body::from_stream(
        tar.map(|r| r.map_err(std::io::Error::other)),
    ));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-tar"),
    );
    Ok(resp)
}

pub async fn put_archive(
    State(svc): Svc,
    Path(id): Path<String>,
    q: QueryResult<PathQuery>,
    body: Body,
) -> Result<StatusCode> {
    let Query(q) = query(q)?;
    q.no_extras(false, false)?;
    svc.put_archive(
        &id,
        TarRequest {
            path: q.path,
            user: q.user,
        },
        body.into_data_stream(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn watch(
    State(svc): Svc,
    Path(id): Path<String>,
    q: QueryResult<PathQuery>,
) -> Result<Response> {
    let Query(q) = query(q)?;
    q.no_extras(false, true)?;
    let events = svc
        .watch(
            &id,
            WatchRequest {
                path: q.path,
                recursive: q.recursive,
                user: q.user,
            },
        )
        .await?;
    Ok(ndjson(events.map(|r| r.map_err(std::io::Error::other))).into_response())
}
