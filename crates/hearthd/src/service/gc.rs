//! `POST /gc`: removes the blobs no machine or snapshot needs and no operation is using, and
//! the templates of the kernels (and initrds) it removed.

use super::Service;
use crate::error::{Error, Result};
use hearth_api::GcResponse;

impl Service {
    pub async fn gc(&self) -> Result<GcResponse> {
        let blobs = self.artifacts.blobs().clone();
        let (mut report, removed) = tokio::task::spawn_blocking(move || blobs.gc())
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        let (templates, bytes) = self.remove_templates_of_removed_images(&removed).await;
        report.removed_templates = templates;
        report.freed_bytes += bytes;
        tracing::info!(
            blobs = report.removed_blobs,
            templates,
            bytes = report.freed_bytes,
            "garbage collected"
        );
        Ok(report)
    }
}
