//! Snapshot transfer against a local S3 server (moto): hearthd's upload and its download +
//! verify of a 1 GiB artifact, against the raw baselines measured in the same run: reading the
//! file, sha256sum, a single `curl -T`, and a plain parallel ranged GET.

use super::{image_artifact, Daemon};
use anyhow::{ensure, Context, Result};
use clap::Parser;
use hearth_api::{
    CreateMachineRequest, ExecRequest, SnapshotKind, UploadArtifact, UploadPart, UploadRequest,
};
use hearthd::config::Config;
use hearthd::service::Service;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PART: u64 = 16 << 20;
const CHUNK: u64 = 8 << 20;

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Runs Python with a boto3 client `s3` for the server; returns its stdout.
fn boto(endpoint: &str, code: &str) -> Result<String> {
    let script = format!(
        "import boto3, json\ns3 = boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='k', \
         aws_secret_access_key='s', region_name='us-east-1')\n{code}\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).output()?;
    ensure!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub async fn run(image: &Path, data_mib: u64) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("moto_server (pip install 'moto[server]')")?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let result = bench(image, data_mib, work.path(), &endpoint).await;
    let _ = moto.kill();
    let _ = moto.wait();
    result
}

async fn bench(image: &Path, data_mib: u64, work: &Path, endpoint: &str) -> Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(endpoint.trim_start_matches("http://")).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    boto(endpoint, "s3.create_bucket(Bucket='bench')")?;

    // A 1 GiB disk artifact holding `data_mib` of non-zero data.
    eprintln!("filling a 1 GiB disk with {data_mib} MiB of data in a guest…");
    let daemon = Daemon::start(&work.join("root"), image).await?;
    daemon
        .client
        .create_machine(&CreateMachineRequest {
            machine_id: "fill".into(),
            artifact: image_artifact(image),
            memory_mib: Some(256),
            vcpus: Some(1),
            storage_bytes: Some(1 << 30),
            user_volume_ids: None,
            guest_config: None,
            network: None,
            ports: None,
            vmm: None,
            cold: None,
        })
        .await?;
    let script = format!(
        "yes hearth-transfer-bench | head -c {} > /root/fill && sync",
        data_mib << 20
    );
    let r = daemon
        .client
        .exec(
            "fill",
            &ExecRequest {
                command: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            },
        )
        .await?;
    ensure!(r.exit_code == 0, "filling failed: {}", r.stderr);
    let snap = daemon
        .client
        .create_snapshot("fill", "bench", SnapshotKind::Disk)
        .await?
        .snapshot;
    daemon.client.delete_machine("fill").await?;
    let disk = snap
        .artifacts
        .iter()
        .find(|a| a.id == "system")
        .context("no disk")?
        .clone();
    let file = daemon.root.join("snapshots/bench").join(&disk.name);
    let size = disk.size_bytes;

    // Raw baselines: read the file, sha256sum it, one curl -T of it.
    let t = Instant::now();
    let mut f = std::fs::File::open(&file)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    let read = t.elapsed();
    let t = Instant::now();
    let ok = Command::new("sha256sum")
        .arg(&file)
        .stdout(Stdio::null())
        .status()?;
    ensure!(ok.success());
    let sha = t.elapsed();
    let put_url = boto(endpoint, "print(s3.generate_presigned_url('put_object', Params={'Bucket':'bench','Key':'curl'}, ExpiresIn=3600))")?;
    let t = Instant::now();
    let ok = Command::new("curl")
        .args(["-sS", "-f", "-o", "/dev/null", "-T"])
        .arg(&file)
        .arg(&put_url)
        .status()?;
    ensure!(ok.success(), "curl -T failed");
    let curl = t.elapsed();

    // hearthd's upload of the same file in 16 MiB parts.
    let nparts = size.div_ceil(PART);
    let plan = boto(
        endpoint,
        &format!(
            "u = s3.create_multipart_upload(Bucket='bench', Key='disk')['UploadId']\n\
             urls = [s3.generate_presigned_url('upload_part', Params={{'Bucket':'bench','Key':'disk','UploadId':u,'PartNumber':n}}, ExpiresIn=3600) for n in range(1, {nparts} + 1)]\n\
             print(json.dumps({{'upload_id': u, 'urls': urls}}))"
        ),
    )?;
    let plan: serde_json::Value = serde_json::from_str(&plan)?;
    let upload_id = plan["upload_id"].as_str().context("upload id")?.to_string();
    let parts = plan["urls"]
        .as_array()
        .context("urls")?
        .iter()
        .enumerate()
        .map(|(i, u)| UploadPart {
            part_number: i as u32 + 1,
            offset_bytes: i as u64 * PART,
            size_bytes: PART.min(size - i as u64 * PART),
            upload_url: u.as_str().unwrap_or_default().to_string(),
        })
        .collect();
    let req = UploadRequest {
        artifacts: vec![UploadArtifact {
            artifact_id: disk.id.clone(),
            object_key: "disk".into(),
            upload_id: upload_id.clone(),
            parts,
        }],
    };
    let t = Instant::now();
    let done = daemon.client.upload_snapshot("bench", &req).await?;
    let upload = t.elapsed();
    let etags: Vec<String> = done.artifacts[0]
        .completed_parts
        .iter()
        .map(|p| p.etag.clone())
        .collect();
    boto(
        endpoint,
        &format!(
            "etags = json.loads(r'{}')\n\
             s3.complete_multipart_upload(Bucket='bench', Key='disk', UploadId='{upload_id}', MultipartUpload={{'Parts': [{{'ETag': e, 'PartNumber': i + 1}} for i, e in enumerate(etags)]}})",
            serde_json::to_string(&etags)?
        ),
    )?;
    let get_url = boto(endpoint, "print(s3.generate_presigned_url('get_object', Params={'Bucket':'bench','Key':'disk'}, ExpiresIn=3600))")?;

    // Plain parallel ranged GET into a file, no verification.
    let t = Instant::now();
    plain_parallel_get(&get_url, size, &work.join("plain.img")).await?;
    let plain_get = t.elapsed();
    std::fs::remove_file(work.join("plain.img"))?;

    // hearthd's download + sha256 verification, on a fresh data root (nothing cached).
    let cfg = Config::parse_from(["hearthd", "--root", work.join("dl").to_str().unwrap()]);
    let svc = Service::new(cfg.clone(), hearthd::make_vmms(&cfg)?, None, None)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    // The upload computed and kept the disk's digest.
    let digest = daemon
        .client
        .get_snapshot("bench")
        .await?
        .artifacts
        .into_iter()
        .find(|a| a.id == disk.id)
        .and_then(|a| a.sha256_hex)
        .context("the upload recorded no digest for the disk")?;
    let t = Instant::now();
    svc.fetch_verified(
        "disk",
        &get_url,
        &digest,
        size,
        &hearthd::blobs::Leases::default(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e.message))?;
    let hearth_get = t.elapsed();
    daemon.client.delete_snapshot("bench").await?;

    println!(
        "transfer benchmark: a {} MiB artifact ({data_mib} MiB of data) on a local S3 server (moto)",
        size >> 20
    );
    println!(
        "  raw read of the file            {:>8.0} MiB/s  (local ceiling)",
        mib_s(size, read)
    );
    println!(
        "  sha256sum                       {:>8.0} MiB/s  (local ceiling)",
        mib_s(size, sha)
    );
    println!(
        "  curl -T (one PUT)               {:>8.0} MiB/s",
        mib_s(size, curl)
    );
    // The best baseline that puts the file into the same store; the local ceilings show
    // whether reading or hashing would hold an upload back.
    println!(
        "  hearth upload ({nparts} parts)        {:>8.0} MiB/s  = {:.0}% of curl -T (target ≥ 80%)",
        mib_s(size, upload),
        100.0 * curl.as_secs_f64() / upload.as_secs_f64()
    );
    println!(
        "  plain parallel ranged GET       {:>8.0} MiB/s",
        mib_s(size, plain_get)
    );
    println!(
        "  hearth download + verify        {:>8.0} MiB/s  = {:.0}% of the plain GET (target ≥ 80%)",
        mib_s(size, hearth_get),
        100.0 * plain_get.as_secs_f64() / hearth_get.as_secs_f64()
    );
    Ok(())
}

/// The naive download: 8 ranged GETs at a time into a file, nothing verified.
async fn plain_parallel_get(url: &str, size: u64, dest: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::sync::Arc::new(std::fs::File::create(dest)?);
    file.set_len(size)?;
    let http = reqwest::Client::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut set = tokio::task::JoinSet::new();
    for start in (0..size).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(size) - 1;
        let (http, url, file, sem) = (http.clone(), url.to_string(), file.clone(), sem.clone());
        set.spawn(async move {
            let _p = sem.acquire_owned().await?;
            let body = http
                .get(&url)
                .header("range", format!("bytes={start}-{end}"))
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            file.write_all_at(&body, start)?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}
