use serde::{Deserialize, Serialize};

/// Every error body: `{"error": "<message>", "code": "<code>"}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
}

/// The kind of an error, which alone decides its HTTP status.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Invalid,
    NotFound,
    /// The guest refused: permission denied for the user an operation ran as.
    Forbidden,
    Conflict,
    TooLarge,
    /// A limit on work at once was reached (boots under way): try again shortly.
    Busy,
    Integrity,
    Upstream,
    Unavailable,
    /// The disk holding the data root is full (or a quota is exhausted).
    InsufficientStorage,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Invalid => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Forbidden => 403,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Busy => 429,
            ErrorCode::Integrity => 422,
            ErrorCode::Upstream => 502,
            ErrorCode::Unavailable => 503,
            ErrorCode::InsufficientStorage => 507,
            ErrorCode::Internal => 500,
        }
    }

    /// The code a bare status stands for (an answer without an error body).
    pub fn from_status(status: u16) -> Option<ErrorCode> {
        [
            ErrorCode::Invalid,
            ErrorCode::NotFound,
            ErrorCode::Forbidden,
            ErrorCode::Conflict,
            ErrorCode::TooLarge,
            ErrorCode::Busy,
            ErrorCode::Integrity,
            ErrorCode::Upstream,
            ErrorCode::Unavailable,
            ErrorCode::InsufficientStorage,
            ErrorCode::Internal,
        ]
        .into_iter()
        .find(|c| c.status() == status)
    }
}
