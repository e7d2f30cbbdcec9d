//! The hearthd HTTP API: request and response types shared by the daemon, the CLI and the
//! tests, the error model, id rules, and a client for the daemon's Unix socket.

pub mod client;
mod error;
mod guest;
mod ids;
mod types;

pub use error::{ErrorBody, ErrorCode};
pub use guest::*;
pub use ids::{excerpt, validate_id};
pub use types::*;
