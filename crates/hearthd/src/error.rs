//! The daemon's error type: a kind (which alone picks the HTTP status) and a message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hearth_api::{ErrorBody, ErrorCode};
use std::path::Path;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

macro_rules! ctor {
    ($name:ident, $code:ident) => {
        pub fn $name(message: impl Into<String>) -> Error {
            Error {
                code: ErrorCode::$code,
                message: message.into(),
            }
        }
    };
}

impl Error {
    ctor!(invalid, Invalid);
    ctor!(not_found, NotFound);
    ctor!(forbidden, Forbidden);
    ctor!(conflict, Conflict);
    ctor!(too_large, TooLarge);
    ctor!(busy, Busy);
    ctor!(upstream, Upstream);
    ctor!(unavailable, Unavailable);
    ctor!(insufficient_storage, InsufficientStorage);
    ctor!(internal, Internal);

    /// An I/O error while `what` `path`: a full disk or an exhausted quota is 507 and says
    /// where; anything else is internal.
    pub fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
        if is_disk_full(&e) {
            Error::disk_full(path, &e)
        } else {
            Error::internal(format!("{what} {}: {e}", path.display()))
        }
    }

    /// The disk holding `path` has no room left.
    pub fn disk_full(path: &Path, e: &dyn std::fmt::Display) -> Error {
        Error::insufficient_storage(format!(
            "the disk is full: no space left on the filesystem holding {} ({e})",
            path.display()
        ))
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl std::fmt::Display) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

/// ENOSPC or EDQUOT.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        if is_disk_full(&e) {
            Error::insufficient_storage(format!("the disk is full: {e}"))
        } else {
            Error::internal(e.to_string())
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => {
                Error::insufficient_storage(format!("the disk is full: state store: {e}"))
            }
            _ => Error::internal(format!("state store: {e}")),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(code = ?self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: self.message,
            code: self.code,
        };
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_and_says_where() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = Error::from(std::io::Error::from_raw_os_error(errno));
            assert_eq!(e.code, ErrorCode::InsufficientStorage, "{e}");
            let e = Error::io(
                "writing",
                Path::new("/data/x"),
                std::io::Error::from_raw_os_error(errno),
            );
            assert_eq!(e.code.status(), 507);
            assert!(
                e.message.contains("disk is full") && e.message.contains("/data/x"),
                "{e}"
            );
        }
        let e = Error::io(
            "writing",
            Path::new("/x"),
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        assert_eq!(e.code, ErrorCode::Internal);
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert_eq!(Error::from(full).code, ErrorCode::InsufficientStorage);
    }
}
