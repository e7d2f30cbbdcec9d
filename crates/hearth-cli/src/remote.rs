//! `hearth push` and `hearth pull`: the CLI as a small control plane over an S3-compatible
//! store. It opens and completes multipart uploads and presigns URLs; hearthd moves the bytes.
//! Endpoint and keys come from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
//! and `AWS_REGION`; addressing is path-style.

use crate::machines::{report_machine, spinner};
use crate::{output, Ctx};
use anyhow::{bail, ensure, Context, Result};
use hearth_api::{
    DurableSnapshotRef, RestoreRequest, Snapshot, UploadArtifact, UploadPart, UploadRequest,
};
use rusty_s3::actions::{CreateMultipartUpload, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::time::{Duration, Instant};

/// Object holding the snapshot's description, next to its artifacts.
const DESCRIPTION: &str = "hearth-snapshot.json";
/// S3 takes at most 10,000 parts, each of at least 5 MiB but the last.
const MIN_PART: u64 = 16 << 20;
const MAX_PARTS: u64 = 10_000;
const URL_LIFETIME: Duration = Duration::from_secs(3600);

struct Store {
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    http: reqwest::Client,
}

/// `s3://bucket/some/prefix` → the bucket and the prefix (no leading or trailing slash).
fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url}: want s3://bucket/prefix"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    ensure!(!bucket.is_empty(), "{url}: no bucket");
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl Store {
    fn open(bucket: &str, prefix: &str) -> Result<Store> {
        let region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into());
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .unwrap_or_else(|_| format!("https://s3.{region}.amazonaws.com"));
        let creds =
            Credentials::from_env().context("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")?;
        let bucket = Bucket::new(
            endpoint
                .parse()
                .with_context(|| format!("AWS_ENDPOINT_URL {endpoint}"))?,
            UrlStyle::Path,
            bucket.to_string(),
            region,
        )?;
        Ok(Store {
            bucket,
            creds,
            prefix: prefix.to_string(),
            http: reqwest::Client::new(),
        })
    }

    fn key(&self, snapshot: &str, name: &str) -> String {
        if self.prefix.is_empty() {
            format!("{snapshot}/{name}")
        } else {
            format!("{}/{snapshot}/{name}", self.prefix)
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<String> {
        let resp = req.send().await.with_context(|| what.to_string())?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        ensure!(
            status.is_success(),
            "{what}: HTTP {status}: {}",
            text.trim()
        );
        Ok(text)
    }

    async fn open_upload(&self, key: &str) -> Result<String> {
        let url = self
            .bucket
            .create_multipart_upload(Some(&self.creds), key)
            .sign(URL_LIFETIME);
        let text = self
            .send(self.http.post(url), &format!("opening the upload of {key}"))
            .await?;
        Ok(CreateMultipartUpload::parse_response(&text)?
            .upload_id()
            .to_string())
    }

    async fn complete(&self, key: &str, upload_id: &str, etags: &[String]) -> Result<()> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.creds),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(URL_LIFETIME);
        let body = action.body();
        self.send(self.http.post(url).body(body), &format!("completing {key}"))
            .await
            .map(|_| ())
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.creds), key, upload_id)
            .sign(URL_LIFETIME);
        let _ = self.http.delete(url).send().await;
    }
}

/// Part layout for an artifact of `size` bytes.
fn parts(size: u64) -> Vec<(u64, u64)> {
    let part = MIN_PART.max(size.div_ceil(MAX_PARTS));
    (0..size.div_ceil(part).max(1))
        .map(|i| (i * part, part.min(size - i * part)))
        .collect()
}

pub async fn push(ctx: &Ctx, snapshot: &str, dest: &str) -> Result<()> {
    let (bucket, prefix) = parse_s3_url(dest)?;
    let store = Store::open(&bucket, &prefix)?;
    let mut snap = ctx.client.get_snapshot(snapshot).await?;
    let t = Instant::now();
    let bar = spinner(format!("opening {} uploads", snap.artifacts.len()));
    let mut uploads = Vec::new();
    for a in &snap.artifacts {
        let key = store.key(&snap.id, &a.name);
        let upload_id = match store.open_upload(&key).await {
            Ok(id) => id,
            Err(e) => {
                for u in &uploads {
                    let u: &UploadArtifact = u;
                    store.abort(&u.object_key, &u.upload_id).await;
                }
                bar.finish_and_clear();
                return Err(e);
            }
        };
        let parts = parts(a.size_bytes)
            .into_iter()
            .enumerate()
            .map(|(i, (offset, size))| {
                let n = i as u16 + 1;
                UploadPart {
                    part_number: n as u32,
                    offset_bytes: offset,
                    size_bytes: size,
                    upload_url: store
                        .bucket
                        .upload_part(Some(&store.creds), &key, n, &upload_id)
                        .sign(URL_LIFETIME)
                        .to_string(),
                }
            })
            .collect();
        uploads.push(UploadArtifact {
            artifact_id: a.id.clone(),
            object_key: key,
            upload_id,
            parts,
        });
    }
    let total: u64 = snap.artifacts.iter().map(|a| a.size_bytes).sum();
    let nparts: usize = uploads.iter().map(|u| u.parts.len()).sum();
    bar.set_message(format!(
        "hearthd uploading {} in {nparts} parts",
        crate::size::human(total)
    ));
    let req = UploadRequest {
        artifacts: uploads.clone(),
    };
    let done = match ctx.client.upload_snapshot(&snap.id, &req).await {
        Ok(done) => done,
        Err(e) => {
            for u in &uploads {
                store.abort(&u.object_key, &u.upload_id).await;
            }
            bar.finish_and_clear();
            return Err(e.into());
        }
    };
    bar.set_message("completing the uploads".to_string());
    for (u, d) in uploads.iter().zip(&done.artifacts) {
        let etags: Vec<String> = d.completed_parts.iter().map(|p| p.etag.clone()).collect();
        store.complete(&u.object_key, &u.upload_id, &etags).await?;
    }
    for a in &mut snap.artifacts {
        a.object_key = Some(store.key(&snap.id, &a.name));
        // Digests hearthd had not computed before the upload come with its answer.
        if let Some(d) = done.artifacts.iter().find(|d| d.artifact_id == a.id) {
            a.sha256_hex = a.sha256_hex.take().or_else(|| d.sha256_hex.clone());
        }
    }
    let key = store.key(&snap.id, DESCRIPTION);
    let url = store
        .bucket
        .put_object(Some(&store.creds), &key)
        .sign(URL_LIFETIME);
    let body = serde_json::to_vec_pretty(&snap)?;
    store
        .send(store.http.put(url).body(body), &format!("writing {key}"))
        .await?;
    bar.finish_and_clear();
    if ctx.json {
        output::print_json(&snap);
    } else {
        let secs = t.elapsed().as_secs_f64();
        println!(
            "pushed {} to s3://{bucket}/{} ({} in {secs:.1} s, {:.0} MiB/s)",
            snap.id,
            store.key(&snap.id, ""),
            crate::size::human(total),
            total as f64 / (1 << 20) as f64 / secs
        );
    }
    Ok(())
}

pub async fn pull(ctx: &Ctx, source: &str, name: &str) -> Result<()> {
    let (bucket, path) = parse_s3_url(source)?;
    let (prefix, snapshot) = match path.rsplit_once('/') {
        Some((p, s)) => (p.to_string(), s.to_string()),
        None => (String::new(), path.clone()),
    };
    if snapshot.is_empty() {
        bail!("{source}: want s3://bucket/prefix/SNAPSHOT");
    }
    let store = Store::open(&bucket, &prefix)?;
    let key = store.key(&snapshot, DESCRIPTION);
    let url = store
        .bucket
        .get_object(Some(&store.creds), &key)
        .sign(URL_LIFETIME);
    let text = store
        .send(store.http.get(url), &format!("reading {key}"))
        .await?;
    let mut snap: Snapshot =
        serde_json::from_str(&text).with_context(|| format!("{key} is not a hearth snapshot"))?;
    for a in &mut snap.artifacts {
        let key = a
            .object_key
            .clone()
            .unwrap_or_else(|| store.key(&snapshot, &a.name));
        a.download_url = Some(
            store
                .bucket
                .get_object(Some(&store.creds), &key)
                .sign(URL_LIFETIME)
                .to_string(),
        );
    }
    let req = RestoreRequest {
        machine_id: name.to_string(),
        artifact: snap.artifact.clone(),
        memory_mib: None,
        storage_bytes: None,
        local_snapshot: None,
        snapshot: Some(DurableSnapshotRef {
            snapshot_id: snap.id.clone(),
            machine_id: snap.machine_id.clone(),
            image_id: "default".into(),
            source_runtime_host: None,
            source_tap_device: None,
            artifacts: snap.artifacts.clone(),
        }),
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
    };
    let bar = spinner(format!(
        "hearthd downloading {} and restoring {name}",
        snap.id
    ));
    let t = Instant::now();
    let res = ctx.client.restore(&snap.id, &req).await;
    bar.finish_and_clear();
    report_machine(ctx, &res?, &format!("restored from {source}"), t);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_layout_covers_the_file() {
        assert_eq!(parts(1), vec![(0, 1)]);
        let p = parts((40 << 20) + 5);
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().map(|(_, s)| s).sum::<u64>(), (40 << 20) + 5);
        assert!(p.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        // Never more than S3's 10,000 parts.
        assert!(parts(1 << 40).len() <= 10_000);
    }

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("s3://b/p/q/").unwrap(),
            ("b".into(), "p/q".into())
        );
        assert_eq!(parse_s3_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert!(parse_s3_url("http://b/p").is_err());
    }
}
