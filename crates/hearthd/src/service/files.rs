//! Files in a machine through its agent: buffered operations, and streaming transfers (file
//! contents, tar archives, watch events) that move through the daemon a credit window at a time,
//! never whole.

use super::processes::unexpected;
use super::Service;
use crate::agent::{Call, Content};
use crate::error::{Error, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hearth_api::{FileOp, FileResult};
use hearth_proto::files::{DownloadRequest, TarRequest, UploadRequest, WatchRequest, MAX_BUFFERED};
use hearth_proto::frame::MAX_PAYLOAD;
use hearth_proto::{Op, Reply};
use std::time::Duration;

/// A buffered operation walks or hashes at most 16 MiB or 100 000 entries; minutes are plenty.
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the agent may take to say why it stopped reading a body.
const ANSWER_AFTER_ABORT: Duration = Duration::from_secs(10);

/// A file's content as the guest sends it.
pub struct Download {
    /// The file's whole size.
    pub size: u64,
    /// Bytes in `body` (from the requested offset).
    pub length: u64,
    pub body: ByteStream,
}

pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

fn absolute(path: &str) -> Result<()> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "path {} is not absolute",
            hearth_api::excerpt(path)
        )))
    }
}

fn content_stream(content: Content) -> ByteStream {
    Box::pin(futures_util::stream::unfold(content, |mut c| async move {
        c.next().await.map(|item| (item, c))
    }))
}

/// A content of exactly `length` bytes: a guest that sends more or less breaks the stream (the
/// HTTP answer promised that length).
fn exact_stream(content: Content, length: u64) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        (content, length, false),
        |(mut c, left, done)| async move {
            if done {
                return None;
            }
            match c.next().await {
                Some(Ok(chunk)) => match left.checked_sub(chunk.len() as u64) {
                    Some(rest) => Some((Ok(chunk), (c, rest, false))),
                    None => Some((
                        Err(Error::upstream(
                            "the guest agent sent more than the file's length",
                        )),
                        (c, 0, true),
                    )),
                },
                Some(Err(e)) => Some((Err(e), (c, left, true))),
                None if left > 0 => Some((
                    Err(Error::upstream(format!(
                        "the guest agent's content ended {left} bytes short"
                    ))),
                    (c, left, true),
                )),
                None => None,
            }
        },
    ))
}

impl Service {
    pub async fn file_op(&self, id: &str, op: FileOp) -> Result<FileResult> {
        for p in [&op.path, &op.to].into_iter().flatten() {
            absolute(p)?;
        }
        let content_len = op.content.as_ref().map_or(0, |c| c.len() as u64)
            + op.content_base64
                .as_ref()
                .map_or(0, |c| (c.len() as u64).div_ceil(4) * 3);
        if content_len > MAX_BUFFERED {
            return Err(Error::too_large(format!(
                "buffered content is limited to {MAX_BUFFERED} bytes; upload larger files to \
                 /machines/{id}/files/content"
            )));
        }
        if let Some(b) = &op.content_base64 {
            B64.decode(b)
                .map_err(|e| Error::invalid(format!("content_base64: {e}")))?;
        }
        let agent = self.running_agent(id).await?;
        match agent.call(Op::Files(op), Some(FILE_OP_TIMEOUT)).await? {
            Reply::Files(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    /// Streams `body` into a file of the guest, atomically; an error in `body` (the client went
    /// away) cancels the upload and the guest removes what it wrote.
    pub async fn upload_file(
        &self,
        id: &str,
        req: UploadRequest,
        body: impl Stream<Item = std::result::Result<Bytes, impl std::fmt::Display>> + Unpin,
    ) -> Result<u64> {
        absolute(&req.path)?;
        let agent = self.running_agent(id).await?;
        let mut call = agent.request(Op::Upload(req), true).await?;
        match send_body(&mut call, body).await? {
            Reply::Written { bytes } => Ok(bytes),
            other => Err(unexpected(other)),
        }
    }

    pub async fn download_file(&self, id: &str, req: DownloadRequest) -> Result<Download> {
        absolute(&req.path)?;
        let (offset, asked) = (req.offset, req.length);
        let agent = self.running_agent(id).await?;
        let mut call = agent.request(Op::Download(req), false).await?;
        match call.answer(Some(FILE_OP_TIMEOUT)).await? {
            (Reply::Download { size, length }, Some(content)) => {
                // The guest's numbers go into HTTP headers: they must make sense.
                let fits = offset.checked_add(length).is_some_and(|end| end <= size)
                    && asked.is_none_or(|a| length <= a);
                if !fits {
                    return Err(Error::upstream(format!(
                        "the guest agent offered {length} bytes at {offset} of a {size}-byte file"
                    )));
                }
                Ok(Download {
                    size,
                    length,
                    body: exact_stream(content, length),
                })
            }
            (other, _) => Err(unexpected(other)),
        }
    }

    /// A tar archive of a file or directory of the guest.
    pub async fn get_archive(&self, id: &str, req: TarRequest) -> Result<ByteStream> {
        absolute(&req.path)?;
        let agent = self.running_agent(id).await?;
        let mut call = agent.request(Op::TarCreate(req), false).await?;
        match call.answer(Some(FILE_OP_TIMEOUT)).await? {
            (Reply::Streaming, Some(content)) => Ok(content_stream(content)),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Unpacks a tar archive into a directory of the guest.
    pub async fn put_archive(
        &self,
        id: &str,
        req: TarRequest,
        body: impl Stream<Item = std::result::Result<Bytes, impl std::fmt::Display>> + Unpin,
    ) -> Result<()> {
        absolute(&req.path)?;
        let agent = self.running_agent(id).await?;
        let mut call = agent.request(Op::TarExtract(req), true).await?;
        send_body(&mut call, body).await.map(|_| ())
    }

    /// File system events under a directory of the guest, one JSON line each.
    pub async fn watch(&self, id: &str, req: WatchRequest) -> Result<ByteStream> {
        absolute(&req.path)?;
        let agent = self.running_agent(id).await?;
        let mut call = agent.request(Op::Watch(req), false).await?;
        match call.answer(Some(FILE_OP_TIMEOUT)).await? {
            (Reply::Streaming, Some(content)) => Ok(content_stream(content)),
            (other, _) => Err(unexpected(other)),
        }
    }
}

/// Sends a request body and returns the answer. A client that goes away returns at once
/// (dropping the call cancels the body); when the agent stops reading early, its answer says why.
async fn send_body(
    call: &mut Call,
    mut body: impl Stream<Item = std::result::Result<Bytes, impl std::fmt::Display>> + Unpin,
) -> Result<Reply> {
    // HTTP hands over small chunks; the channel carries full frames.
    let mut pending = bytes::BytesMut::new();
    loop {
        let chunk = body
            .next()
            .await
            .transpose()
            .map_err(|e| Error::invalid(format!("reading the request body: {e}")))?;
        if let Some(chunk) = &chunk {
            pending.extend_from_slice(chunk);
        }
        if pending.len() >= MAX_PAYLOAD || (chunk.is_none() && !pending.is_empty()) {
            if let Err(e) = call.send(&pending).await {
                return agent_reason(call, e).await;
            }
            pending.clear();
        }
        if chunk.is_none() {
            break;
        }
    }
    if let Err(e) = call.finish().await {
        return agent_reason(call, e).await;
    }
    call.answer(None).await.map(|(reply, _)| reply)
}

/// The agent stopped reading the body: its answer says why (a permission denied, a full disk),
/// or that it had all it needed (a tar archive's end comes before the stream's).
async fn agent_reason(call: &mut Call, e: Error) -> Result<Reply> {
    match tokio::time::timeout(ANSWER_AFTER_ABORT, call.answer(None)).await {
        Ok(Ok((reply, _))) => Ok(reply),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err(e),
    }
}
