//! Who may make the daemon read what. Artifact URLs are parsed strictly: what is checked is what
//! was written, never a spelling the URL parser quietly repaired. `file://` URLs reach only files
//! under the artifact directories, resolved (symlinks, `..`) before the check and checked again on
//! the opened descriptor, and callers on the TCP listener may not give them unless allowed.
//! Object-store URLs (a durable restore's downloads, an upload's parts) are `http(s)` only.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use url::Url;

/// Where a request came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The Unix socket: whoever may open it (its file mode guards it).
    Local,
    /// The TCP listener: whoever holds the bearer token, from wherever.
    Remote,
}

/// An artifact URL that passed the policy.
#[derive(Debug, PartialEq, Eq)]
pub enum ArtifactSource {
    /// The resolved path of a file under an artifact directory.
    File(PathBuf),
    Http(Url),
}

/// The rules for artifact URLs.
#[derive(Debug)]
pub struct UrlPolicy {
    /// Where `file://` artifacts may be, resolved.
    dirs: Vec<PathBuf>,
    /// The same, resolved and as configured (when absolute): a URL's path is resolved only
    /// when it lies under one of these.
    named: Vec<PathBuf>,
    /// The blob store's own directories, resolved: its files are not artifacts.
    internal: Vec<PathBuf>,
    file_urls_over_tcp: bool,
}

impl UrlPolicy {
    /// `dirs` must exist; `internal` are the blob store's directories.
    pub fn new(
        dirs: &[PathBuf],
        internal: &[&Path],
        file_urls_over_tcp: bool,
    ) -> Result<UrlPolicy> {
        let resolve = |d: &Path| {
            std::fs::canonicalize(d)
                .map_err(|e| Error::invalid(format!("artifact directory {}: {e}", d.display())))
        };
        let named = dirs.iter().filter(|d| d.is_absolute()).cloned();
        let dirs: Vec<PathBuf> = dirs
            .iter()
            .map(|d| {
                let dir = resolve(d)?;
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(Error::invalid(format!(
                        "artifact directory {} is not a directory",
                        d.display()
                    )))
                }
            })
            .collect::<Result<_>>()?;
        let internal = internal.iter().map(|d| resolve(d)).collect::<Result<_>>()?;
        Ok(UrlPolicy {
            named: dirs.iter().cloned().chain(named).collect(),
            dirs,
            internal,
            file_urls_over_tcp,
        })
    }

    /// Checks an artifact URL (`http`, `https` or `file`) that `caller` gave in `field`, touching
    /// nothing outside the artifact directories.
    pub fn artifact(&self, field: &str, url: &str, caller: Caller) -> Result<ArtifactSource> {
        let invalid = |why: String| Error::invalid(format!("{field}: {why}"));
        let parsed = parse_strict(url).map_err(invalid)?;
        match parsed.scheme() {
            "http" | "https" => Ok(ArtifactSource::Http(parsed)),
            "file" if caller == Caller::Remote && !self.file_urls_over_tcp => Err(invalid(
                "file URLs are not accepted on the TCP listener (hearthd \
                 --allow-file-urls-over-tcp allows them)"
                    .into(),
            )),
            "file" => self
                .file(&parsed, url)
                .map(ArtifactSource::File)
                .map_err(invalid),
            other => Err(invalid(format!(
                "unsupported URL scheme {other:?} in {url:?} (http, https, file)"
            ))),
        }
    }

    fn file(&self, parsed: &Url, url: &str) -> std::result::Result<PathBuf, String> {
        // The parser drops `localhost`, `.` and `..` segments, adds slashes and encodes
        // characters: a URL it had to repair is refused rather than guessed at.
        let path = match parsed.to_file_path() {
            Ok(path)
                if parsed.as_str() == url
                    && url.starts_with("file:///")
                    && parsed.query().is_none()
                    && parsed.fragment().is_none() =>
            {
                path
            }
            _ => {
                return Err(format!(
                    "{url:?} is not a file URL of the form file:///absolute/path \
                     (percent-encoded, no host, no `.` or `..`, no query or fragment)"
                ))
            }
        };
        // Decoded (`%2F..%2F`), a segment may still hide `..`.
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(format!("{}: `..` is not allowed", path.display()));
        }
        // Nothing is resolved outside the directories: no answer tells what exists elsewhere.
        if !self.named.iter().any(|d| path.starts_with(d)) {
            return Err(format!(
                "{} is not under an artifact directory ({})",
                path.display(),
                self.dirs_list()
            ));
        }
        let resolved =
            std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.allowed(&resolved).map_err(|why| match why {
            Refusal::Outside => format!(
                "{} leads outside the artifact directories ({})",
                path.display(),
                self.dirs_list()
            ),
            Refusal::Internal => format!("{} is a file of the blob store", path.display()),
        })?;
        Ok(resolved)
    }

    /// Opens a file that `artifact` let through and checks where the descriptor really leads,
    /// since a directory on the way may have been swapped for a symlink since. Only a regular
    /// file is opened for reading (without blocking, so a FIFO cannot hang the daemon).
    pub fn open(&self, field: &str, path: &Path) -> Result<(File, std::fs::Metadata)> {
        let invalid = |why: String| Error::invalid(format!("{field}: {why}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| Error::internal(format!("resolving {}: {e}", path.display())))?;
        if self.allowed(&opened).is_err() {
            return Err(invalid(format!(
                "{} moved outside the artifact directories while it was opened",
                path.display()
            )));
        }
        let meta = file
            .metadata()
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(invalid(format!("{} is not a file", path.display())));
        }
        Ok((file, meta))
    }

    fn allowed(&self, resolved: &Path) -> std::result::Result<(), Refusal> {
        if self.internal.iter().any(|d| resolved.starts_with(d)) {
            Err(Refusal::Internal)
        } else if self.dirs.iter().any(|d| resolved.starts_with(d)) {
            Ok(())
        } else {
            Err(Refusal::Outside)
        }
    }

    fn dirs_list(&self) -> String {
        let dirs: Vec<_> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        dirs.join(", ")
    }
}

enum Refusal {
    Outside,
    Internal,
}

/// A presigned object-store URL given in `field`: `http` or `https`, strictly parsed.
pub fn object_url(field: &str, url: &str) -> Result<Url> {
    let parsed = parse_strict(url).map_err(|why| Error::invalid(format!("{field}: {why}")))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        other => Err(Error::invalid(format!(
            "{field}: unsupported URL scheme {other:?} (object-store URLs are http or https)"
        ))),
    }
}

/// Parses `url`, refusing what the parser would silently repair in a way that changes what the
/// URL names: surrounding or embedded whitespace and control characters (stripped or dropped),
/// backslashes (read as slashes), a scheme not written in lowercase, and an http(s) URL not
/// written `scheme://host…`.
fn parse_strict(url: &str) -> std::result::Result<Url, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{url:?}: whitespace and control characters are not allowed in a URL"
        ));
    }
    if url.contains('\\') {
        return Err(format!("{url:?}: backslashes are not allowed in a URL"));
    }
    let parsed = Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
    let scheme = parsed.scheme();
    if url.as_bytes().get(..scheme.len() + 1) != Some(format!("{scheme}:").as_bytes()) {
        return Err(format!("{url:?}: write the scheme in lowercase"));
    }
    // `http:host` and `http:///host` parse as `http://host/`.
    if matches!(scheme, "http" | "https")
        && (!url[scheme.len()..].starts_with("://")
            || url[scheme.len() + 3..].starts_with('/')
            || parsed.host_str().is_none_or(str::is_empty))
    {
        return Err(format!("{url:?} is not of the form {scheme}://host/…"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        policy: UrlPolicy,
    }

    /// An artifact directory `art` with a file, a symlink out and a symlink in; a blob store.
    fn fixture(over_tcp: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let art = root.join("art");
        std::fs::create_dir_all(art.join("sub")).unwrap();
        std::fs::create_dir_all(art.join("blobs")).unwrap();
        std::fs::write(art.join("blobs/x"), b"b").unwrap();
        std::fs::write(art.join("kernel"), b"k").unwrap();
        std::fs::write(root.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), art.join("out")).unwrap();
        std::os::unix::fs::symlink(art.join("kernel"), art.join("sub/in")).unwrap();
        let policy = UrlPolicy::new(
            std::slice::from_ref(&art),
            &[art.join("blobs").as_path()],
            over_tcp,
        )
        .unwrap();
        Fixture {
            _dir: dir,
            root,
            policy,
        }
    }

    fn url(path: &Path) -> String {
        Url::from_file_path(path).unwrap().to_string()
    }

    #[test]
    fn odd_spellings_are_refused() {
        let f = fixture(false);
        let kernel = f.root.join("art/kernel");
        let k = kernel.display();
        for bad in [
            "file:etc/passwd".to_string(),
            "file:/etc/passwd".to_string(),
            "file://localhost/etc/passwd".to_string(),
            format!("file://localhost{k}"),
            format!(" file://{k}"),
            format!("file://{k} "),
            format!("\tfile://{k}"),
            format!("FILE://{k}"),
            format!("File://{k}"),
            format!("file://{k}?x"),
            format!("file://{k}#x"),
            format!("file:\\\\{k}"),
            format!("file://{k}/../kernel"),
            format!("file://{k}/%2e%2e/kernel"),
            format!("file://{}/art/sub%2F..%2F..%2Fsecret", f.root.display()),
            format!("file://{}/art/./kernel", f.root.display()),
            "file:///etc/shadow".to_string(),
            "file:///proc/self/environ".to_string(),
            url(&f.root.join("art/out")),
            url(&f.root.join("art/blobs/x")),
            format!("file://{}/art/../secret", f.root.display()),
            "ftp://x/y".to_string(),
            "http:///nohost".to_string(),
            "http:nohost/x".to_string(),
            "data:text/plain,hi".to_string(),
            "not a url".to_string(),
        ] {
            let err = f
                .policy
                .artifact("kernel_image_url", &bad, Caller::Local)
                .unwrap_err();
            assert_eq!(err.code, hearth_api::ErrorCode::Invalid, "{bad}");
            assert!(
                err.message.starts_with("kernel_image_url: "),
                "{bad}: {err}"
            );
        }
        let link = f
            .policy
            .artifact("k", &url(&f.root.join("art/out")), Caller::Local)
            .unwrap_err();
        assert!(link.message.contains("leads outside"), "{link}");
        let blob = f
            .policy
            .artifact("k", &url(&f.root.join("art/blobs/x")), Caller::Local)
            .unwrap_err();
        assert!(blob.message.contains("blob store"), "{blob}");
        // A path outside is refused without being looked at: no answer tells what exists.
        let a = f
            .policy
            .artifact("k", "file:///nonexistent", Caller::Local)
            .unwrap_err();
        let b = f
            .policy
            .artifact("k", "file:///etc/shadow", Caller::Local)
            .unwrap_err();
        assert!(a.message.contains("not under an artifact directory"), "{a}");
        assert!(b.message.contains("not under an artifact directory"), "{b}");
    }

    #[test]
    fn files_under_the_directories_pass_resolved() {
        let f = fixture(false);
        let kernel = f.root.join("art/kernel");
        for good in [url(&kernel), url(&f.root.join("art/sub/in"))] {
            assert_eq!(
                f.policy.artifact("k", &good, Caller::Local).unwrap(),
                ArtifactSource::File(kernel.clone()),
                "{good}"
            );
        }
        let (_, meta) = f.policy.open("k", &kernel).unwrap();
        assert_eq!(meta.len(), 1);
        // A name with a space, percent-encoded as a URL has it.
        let spaced = f.root.join("art/a b");
        std::fs::write(&spaced, b"x").unwrap();
        assert!(url(&spaced).contains("a%20b"));
        assert_eq!(
            f.policy
                .artifact("k", &url(&spaced), Caller::Local)
                .unwrap(),
            ArtifactSource::File(spaced)
        );
        let http = "https://store.example/bucket/key?X-Amz-Signature=abc%2F";
        assert!(matches!(
            f.policy.artifact("k", http, Caller::Remote).unwrap(),
            ArtifactSource::Http(_)
        ));
    }

    #[test]
    fn a_directory_configured_through_a_symlink_takes_either_name() {
        let f = fixture(false);
        let alias = f.root.join("alias");
        std::os::unix::fs::symlink(f.root.join("art"), &alias).unwrap();
        let policy = UrlPolicy::new(std::slice::from_ref(&alias), &[], false).unwrap();
        let kernel = f.root.join("art/kernel");
        for name in [alias.join("kernel"), kernel.clone()] {
            assert_eq!(
                policy.artifact("k", &url(&name), Caller::Local).unwrap(),
                ArtifactSource::File(kernel.clone()),
                "{}",
                name.display()
            );
        }
        let err = policy
            .artifact("k", &url(&alias.join("out")), Caller::Local)
            .unwrap_err();
        assert!(err.message.contains("leads outside"), "{err}");
    }

    #[test]
    fn tcp_callers_get_no_file_urls_unless_allowed() {
        for allowed in [false, true] {
            let f = fixture(allowed);
            let kernel = url(&f.root.join("art/kernel"));
            let res = f.policy.artifact("rootfs_url", &kernel, Caller::Remote);
            match res {
                Err(e) => assert!(!allowed && e.message.contains("TCP listener"), "{e}"),
                Ok(_) => assert!(allowed),
            }
        }
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_caught_on_the_descriptor() {
        let f = fixture(false);
        let sub = f.root.join("art/sub");
        std::fs::write(sub.join("file"), b"f").unwrap();
        let ArtifactSource::File(path) = f
            .policy
            .artifact("k", &url(&sub.join("file")), Caller::Local)
            .unwrap()
        else {
            panic!("a file")
        };
        // Between the check and the open, `sub` becomes a link to a directory outside.
        std::fs::create_dir(f.root.join("elsewhere")).unwrap();
        std::fs::write(f.root.join("elsewhere/file"), b"e").unwrap();
        std::fs::rename(&sub, f.root.join("sub.old")).unwrap();
        std::os::unix::fs::symlink(f.root.join("elsewhere"), &sub).unwrap();
        let err = f.policy.open("k", &path).unwrap_err();
        assert!(err.message.contains("moved outside"), "{err}");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let f = fixture(false);
        let fifo = f.root.join("art/fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let ArtifactSource::File(path) =
            f.policy.artifact("k", &url(&fifo), Caller::Local).unwrap()
        else {
            panic!("a file")
        };
        let err = f.policy.open("k", &path).unwrap_err();
        assert!(err.message.contains("not a file"), "{err}");
    }

    #[test]
    fn object_urls_are_http_only() {
        assert!(object_url("download_url", "http://127.0.0.1:9000/b/k?sig=1").is_ok());
        for bad in [
            "file:///etc/passwd",
            "file:etc/passwd",
            " http://127.0.0.1/x",
            "HTTP://127.0.0.1/x",
            "ftp://x/y",
        ] {
            let err = object_url("download_url", bad).unwrap_err();
            assert_eq!(err.code, hearth_api::ErrorCode::Invalid, "{bad}");
        }
    }
}
