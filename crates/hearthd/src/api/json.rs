//! A JSON body extractor whose rejections use the API's error model: bad JSON, a wrong type and
//! an unknown field are all 400 `invalid` (axum's own `Json` answers some of them with 422).

use crate::error::Error;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 64 << 20;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let req = req.map(|b| axum::body::Body::new(http_body_util::Limited::new(b, MAX_BODY)));
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Error {
                    code: hearth_api::ErrorCode::TooLarge,
                    message: format!("request body is larger than {MAX_BODY} bytes"),
                }
            } else {
                Error::invalid(format!("reading the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| Error::invalid(format!("bad request body: {e}")))
    }
}
