//! A JSON body extractor whose rejections use the API's error model: bad JSON, a wrong type and
//! an unknown field are all 400 `invalid` (axum's own `Json` answers some of them with 422), and
//! a body over [`MAX_BODY`] is 413. This is the only limit on JSON bodies: the router disables
//! axum's default one.

use crate::error::Error;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// Request bodies larger than this are refused (413). The largest a valid request needs is a
/// buffered file write: 16 MiB of content, a third more as base64.
pub const MAX_BODY: usize = 32 << 20;

/// Error messages quote at most this much of what the parser said (which may quote the body).
const MAX_MESSAGE: usize = 1024;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_BODY)));
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error::too_large(format!(
                    "the request body is larger than {MAX_BODY} bytes, the most a JSON request \
                     may have"
                ))
            } else {
                Error::invalid(format!("reading the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            let mut message = format!("bad request body: {e}");
            if message.len() > MAX_MESSAGE {
                let end = message.floor_char_boundary(MAX_MESSAGE);
                message.truncate(end);
                message.push('…');
            }
            Error::invalid(message)
        })
    }
}
