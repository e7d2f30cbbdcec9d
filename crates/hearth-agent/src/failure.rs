//! What a handler that fails answers: a kind (the host maps it to an HTTP status) and a message.

use hearth_proto::{ErrorKind, Reply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(ErrorKind::Invalid, message)
    }

    /// An I/O error while `what`, with its kind.
    pub fn io(what: impl std::fmt::Display, e: &std::io::Error) -> Failure {
        Failure::new(ErrorKind::of_io(e), format!("{what}: {e}"))
    }

    pub fn into_reply(self) -> Reply {
        Reply::Error {
            message: self.message,
            kind: self.kind,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(ErrorKind::Failed, message)
    }
}
