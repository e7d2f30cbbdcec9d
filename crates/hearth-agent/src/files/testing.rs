//! Helpers for the file tests: they run as root on the build host, with real files in
//! temporary directories and a real unprivileged user.

use crate::failure::Failure;
use hearth_proto::files::{FileOp, FileResult, Operation};
use hearth_proto::ErrorKind;
use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The unprivileged user the permission tests run as.
pub const NOBODY: &str = "65534";
pub const NOBODY_ID: u32 = 65534;

/// A temporary directory that everyone may enter (tempfile makes them 0700).
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A directory inside `dir` that belongs to nobody.
pub fn nobodys(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::create_dir(&path).unwrap();
    std::os::unix::fs::chown(&path, Some(NOBODY_ID), Some(NOBODY_ID)).unwrap();
    path
}

pub fn file_op(operation: Operation, path: &Path) -> FileOp {
    FileOp::new(operation, path.to_str().unwrap())
}

/// Runs an operation that must succeed.
pub fn ok(req: FileOp) -> FileResult {
    match super::op(&req) {
        Ok(result) => result,
        Err(failure) => panic!("{req:?} failed: {failure:?}"),
    }
}

/// Runs an operation that must fail, and says how.
pub fn fails(req: FileOp) -> ErrorKind {
    match super::op(&req) {
        Ok(result) => panic!("{req:?} succeeded: {result:?}"),
        Err(Failure { kind, .. }) => kind,
    }
}

pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The names in a directory, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
