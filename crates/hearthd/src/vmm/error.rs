//! What a VMM backend can fail with, kept with its sources; mapped to the API's error codes
//! once, where the service meets the backend.

use crate::error::Error;
use hearth_api::VmmKind;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A machine asked for a backend this daemon was not started with.
    #[error("the {0} backend is not enabled on this host")]
    NotConfigured(VmmKind),
    #[error("cannot run {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused the machine it was given (a kernel it cannot boot, a configuration it
    /// rejects): the request's fault.
    #[error("{vmm} refused to start the machine: {reason}")]
    Refused { vmm: &'static str, reason: String },
    #[error("{vmm} did not finish starting within {} s ({detail})", limit.as_secs())]
    StartTimeout {
        vmm: &'static str,
        limit: Duration,
        detail: String,
    },
    /// The VMM's control channel failed or answered with an error.
    #[error("{what}: {reason}")]
    Control { what: &'static str, reason: String },
    /// The VMM would not load a snapshot's state: it is corrupt or from another VMM.
    #[error("{vmm} could not load the snapshot's state (corrupt, or written by another version?): {reason}")]
    StateRejected { vmm: &'static str, reason: String },
    #[error("the VMM process is gone")]
    Gone,
    /// What the host gave the backend failed: the machine's namespace, tap, cgroup or files.
    #[error(transparent)]
    Host(#[from] Error),
}

impl VmmError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> VmmError {
        VmmError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub fn control(what: &'static str, reason: impl std::fmt::Display) -> VmmError {
        VmmError::Control {
            what,
            reason: reason.to_string(),
        }
    }
}

impl From<VmmError> for Error {
    fn from(e: VmmError) -> Error {
        let message = e.to_string();
        match e {
            VmmError::NotConfigured(_) | VmmError::Refused { .. } => Error::invalid(message),
            VmmError::Io { what, path, source } => Error::io(what, &path, source),
            VmmError::StartTimeout { .. } | VmmError::Control { .. } | VmmError::Gone => {
                Error::unavailable(message)
            }
            VmmError::StateRejected { .. } => Error {
                code: hearth_api::ErrorCode::Integrity,
                message,
            },
            VmmError::Spawn { .. } => Error::internal(message),
            VmmError::Host(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::ErrorCode;

    #[test]
    fn each_failure_gets_the_code_of_whose_fault_it_is() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        for (e, code) in [
            (
                VmmError::NotConfigured(VmmKind::Firecracker),
                ErrorCode::Invalid,
            ),
            (
                VmmError::Refused {
                    vmm: "QEMU",
                    reason: "no kernel".into(),
                },
                ErrorCode::Invalid,
            ),
            (
                VmmError::io("writing", "/x", full),
                ErrorCode::InsufficientStorage,
            ),
            (
                VmmError::control("pausing", "closed"),
                ErrorCode::Unavailable,
            ),
            (
                VmmError::StateRejected {
                    vmm: "QEMU",
                    reason: "bad".into(),
                },
                ErrorCode::Integrity,
            ),
            (VmmError::Host(Error::forbidden("no")), ErrorCode::Forbidden),
        ] {
            assert_eq!(Error::from(e).code, code);
        }
    }
}
