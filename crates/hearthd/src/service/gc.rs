//! `POST /gc`: removes the blobs no machine or snapshot needs and no operation is using.

use super::Service;
use crate::error::{Error, Result};
use hearth_api::GcResponse;

impl Service {
    pub async fn gc(&self) -> Result<GcResponse> {
        let blobs = self.artifacts.blobs().clone();
        let report = tokio::task::spawn_blocking(move || blobs.gc())
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        tracing::info!(
            blobs = report.removed_blobs,
            bytes = report.freed_bytes,
            "garbage collected"
        );
        Ok(report)
    }
}
