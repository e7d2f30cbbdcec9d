//! `hearth cp`: files and directories between this host and a machine, by docker cp's rules,
//! as tar streams both ways (one path for files and directories; modes, mtimes, symlinks and
//! empty files kept).

use crate::Ctx;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use hearth_api::{Entry, EntryType, ErrorCode, FileOp, FileOperation};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

#[derive(Args)]
pub struct CpArgs {
    /// A local path or MACHINE:PATH (a path ending in `/.` copies a directory's contents).
    pub src: String,
    /// A local path or MACHINE:PATH: one side is a machine, the other local.
    pub dst: String,
}

enum Location {
    Local(PathBuf),
    Machine { name: String, path: String },
}

/// `MACHINE:PATH` when a colon comes before any slash (so `./a:b` is local), else a local path.
fn location(arg: &str) -> Location {
    match arg.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => Location::Machine {
            name: name.to_string(),
            // A relative path in a machine is taken from its root, as docker does.
            path: if path.starts_with('/') {
                path.to_string()
            } else {
                format!("/{path}")
            },
        },
        _ => Location::Local(PathBuf::from(arg)),
    }
}

/// `dir/.`: the directory's contents rather than the directory.
fn contents_only(path: &str) -> bool {
    path == "." || path.ends_with("/.")
}

/// The last component of a path, ignoring trailing slashes and a trailing `/.`.
fn base_name(path: &str) -> Option<String> {
    let trimmed = path
        .strip_suffix("/.")
        .unwrap_or(path)
        .trim_end_matches('/');
    Path::new(trimmed)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The directory a path is in (in a machine: absolute, `/` at the top).
fn parent_of(path: &str) -> String {
    let parent = Path::new(path.trim_end_matches('/'))
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if parent.is_empty() {
        "/".into()
    } else {
        parent
    }
}

pub async fn cp(ctx: &Ctx, args: CpArgs) -> Result<()> {
    match (location(&args.src), location(&args.dst)) {
        (Location::Machine { name, path }, Location::Local(dst)) => {
            copy_out(ctx, &name, &path, &args.dst, &dst).await
        }
        (Location::Local(src), Location::Machine { name, path }) => {
            copy_in(ctx, &args.src, &src, &name, &path).await
        }
        (Location::Local(_), Location::Local(_)) => {
            bail!("one of SRC and DST must be MACHINE:PATH")
        }
        (Location::Machine { .. }, Location::Machine { .. }) => {
            bail!("copying between two machines is not supported: one side must be local")
        }
    }
}

/// A byte counter on stderr when it is a terminal: a bar when the total is known.
fn progress_bar(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} {binary_bytes_per_sec}").unwrap(),
        ),
    };
    bar.set_message(what.to_string());
    bar
}

async fn stat(ctx: &Ctx, machine: &str, path: &str) -> Result<Option<Entry>> {
    match ctx
        .client
        .file_op(machine, &FileOp::new(FileOperation::Stat, path))
        .await
    {
        Ok(r) => Ok(Some(
            r.stat
                .context("hearthd answered a stat without the entry")?,
        )),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Machine → host.
async fn copy_out(ctx: &Ctx, machine: &str, src: &str, dst_arg: &str, dst: &Path) -> Result<()> {
    let entry = stat(ctx, machine, src)
        .await?
        .with_context(|| format!("{machine}:{src}: no such file or directory"))?;
    // A symlink is copied as the link, whatever it points to.
    let src_is_dir = entry.kind == EntryType::Directory && !entry.symlink;
    if !src_is_dir && (src.ends_with('/') || contents_only(src)) {
        bail!("{machine}:{src}: not a directory");
    }
    let target = match fs::metadata(dst) {
        Ok(m) if m.is_dir() => {
            if src_is_dir && contents_only(src) {
                dst.to_path_buf()
            } else {
                let name = base_name(src).with_context(|| {
                    format!("{machine}:{src} has no name to copy under: copy {src}/. instead")
                })?;
                dst.join(name)
            }
        }
        Ok(_) if src_is_dir => bail!("{}: cannot copy a directory to a file", dst.display()),
        Ok(_) => dst.to_path_buf(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !src_is_dir && dst_arg.ends_with('/') {
                bail!("{}: no such directory", dst.display());
            }
            match dst.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) if !parent.is_dir() => {
                    bail!("{}: no such directory", parent.display())
                }
                _ => dst.to_path_buf(),
            }
        }
        Err(e) => return Err(e).with_context(|| dst.display().to_string()),
    };
    let archive_path = src.strip_suffix("/.").unwrap_or(src);
    let archive_path = if archive_path.is_empty() {
        "/"
    } else {
        archive_path
    };
    let bar = progress_bar(
        (!src_is_dir).then_some(entry.size_bytes),
        &format!("{machine}:{src}"),
    );
    let (mut tx, rx) = tokio::io::duplex(256 * 1024);
    let unpacking = tokio::task::spawn_blocking(move || unpack(SyncIoBridge::new(rx), &target));
    let got = ctx
        .client
        .get_archive(machine, archive_path, None, &mut tx, |done, _| {
            bar.set_position(done)
        })
        .await;
    drop(tx);
    bar.finish_and_clear();
    // A failed unpack breaks the download too: its error is the one that says why.
    unpacking.await??;
    got?;
    Ok(())
}

/// The components of an archive entry's path after the first (the copied file or directory
/// itself); an entry that would leave it is refused.
fn below_top(path: &Path) -> Result<PathBuf> {
    let mut rest = PathBuf::new();
    for (i, c) in path.components().enumerate() {
        match c {
            Component::Normal(part) if i > 0 => rest.push(part),
            Component::Normal(_) | Component::CurDir => {}
            _ => bail!("archive entry {} leaves the copied tree", path.display()),
        }
    }
    Ok(rest)
}

/// Unpacks a tar stream whose entries all sit under one top-level name into `target` (the top
/// entry becomes `target`). The archive comes from the guest: no entry may be written outside
/// `target`, including through a symlink an earlier entry made.
fn unpack(reader: impl Read, target: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    // Directory modes go on last: a read-only directory must still take its entries.
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut root: Option<PathBuf> = None;
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let path = entry.path()?.into_owned();
        let rest = below_top(&path)?;
        let dest = if rest.as_os_str().is_empty() {
            target.to_path_buf()
        } else {
            let root = match &root {
                Some(r) => r.clone(),
                None => bail!(
                    "archive entry {} comes before its directory",
                    path.display()
                ),
            };
            let dest = target.join(&rest);
            let parent = dest.parent().expect("below the target");
            fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
            if !fs::canonicalize(parent)?.starts_with(&root) {
                bail!("archive entry {} leaves the copied tree", path.display());
            }
            dest
        };
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => bail!(
                    "{}: cannot overwrite a file with a directory",
                    dest.display()
                ),
                Err(_) => fs::create_dir(&dest).with_context(|| dest.display().to_string())?,
            }
            dirs.push((dest.clone(), entry.header().mode()? & 0o7777));
        } else if kind.is_hard_link() {
            let link = entry.link_name()?.context("hard link without a target")?;
            let from = target.join(below_top(&link)?);
            let from_dir = from.parent().expect("below the target");
            if root
                .as_ref()
                .is_none_or(|r| !fs::canonicalize(from_dir).is_ok_and(|d| d.starts_with(r)))
            {
                bail!(
                    "archive entry {} links from outside the copied tree",
                    path.display()
                );
            }
            let _ = fs::remove_file(&dest);
            fs::hard_link(&from, &dest).with_context(|| dest.display().to_string())?;
        } else {
            if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
                bail!(
                    "{}: cannot overwrite a directory with a file",
                    dest.display()
                );
            }
            entry
                .unpack(&dest)
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        if root.is_none() {
            root = Some(fs::canonicalize(&dest).unwrap_or(dest));
        }
    }
    for (dir, mode) in dirs.iter().rev() {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
            .with_context(|| dir.display().to_string())?;
    }
    // The rest of the stream (tar's zero padding) is read so that the sender finishes.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink())?;
    Ok(())
}

/// Host → machine.
async fn copy_in(ctx: &Ctx, src_arg: &str, src: &Path, machine: &str, dst: &str) -> Result<()> {
    let meta = fs::symlink_metadata(src).with_context(|| src.display().to_string())?;
    let src_is_dir = meta.is_dir();
    if !src_is_dir && (src_arg.ends_with('/') || contents_only(src_arg)) {
        bail!("{}: not a directory", src.display());
    }
    let src_name = || {
        let name = base_name(src_arg).or_else(|| {
            fs::canonicalize(src)
                .ok()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        });
        name.with_context(|| {
            format!("{src_arg} has no name to copy under: copy {src_arg}/. instead")
        })
    };
    // (directory to unpack into, name of the copied tree in it; None: the contents only)
    let (dir, name) = match stat(ctx, machine, dst).await? {
        Some(e) if e.kind == EntryType::Directory => {
            if src_is_dir && contents_only(src_arg) {
                (dst.to_string(), None)
            } else {
                (dst.to_string(), Some(src_name()?))
            }
        }
        Some(_) if src_is_dir => bail!("{machine}:{dst}: cannot copy a directory to a file"),
        Some(_) => (parent_of(dst), base_name(dst)),
        None => {
            if !src_is_dir && dst.ends_with('/') {
                bail!("{machine}:{dst}: no such directory");
            }
            let parent = parent_of(dst);
            match stat(ctx, machine, &parent).await? {
                Some(e) if e.kind == EntryType::Directory => {}
                _ => bail!("{machine}:{parent}: no such directory"),
            }
            (parent, base_name(dst))
        }
    };
    let total = tree_size(src)?;
    let bar = progress_bar(Some(total), &src.display().to_string());
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let src = src.to_path_buf();
    let packing_bar = bar.clone();
    let packing = tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, ChannelWriter(tx.clone()));
        let res = pack(&mut out, &src, name.as_deref(), &packing_bar)
            .and_then(|()| out.flush().map_err(anyhow::Error::from));
        if let Err(e) = &res {
            // The upload must fail rather than end as if the archive were complete.
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
        }
        res
    });
    let body = StreamReader::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let put = ctx
        .client
        .put_archive(machine, &dir, None, body, |_, _| {})
        .await;
    bar.finish_and_clear();
    let packed = packing.await?;
    // Our own read error explains a failed upload better than the broken upload does.
    packed?;
    put?;
    Ok(())
}

/// Writes into the upload's channel, chunk by chunk.
struct ChannelWriter(mpsc::Sender<std::io::Result<Bytes>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload ended"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of the regular files under `path` (symlinks not followed).
fn tree_size(path: &Path) -> Result<u64> {
    let meta = fs::symlink_metadata(path).with_context(|| path.display().to_string())?;
    if !meta.is_dir() {
        return Ok(if meta.is_file() { meta.len() } else { 0 });
    }
    let mut total = 0;
    for child in fs::read_dir(path).with_context(|| path.display().to_string())? {
        total += tree_size(&child?.path())?;
    }
    Ok(total)
}

/// Archives `src` named `name` (its contents at the top when None), links as links, owned by
/// root: in the machine the files belong to whoever unpacks them, as with docker cp.
fn pack(out: impl Write, src: &Path, name: Option<&str>, bar: &ProgressBar) -> Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    match name {
        Some(name) => append(&mut builder, src, Path::new(name), bar)?,
        None => {
            for child in sorted_children(src)? {
                let name = PathBuf::from(child.file_name().expect("a directory entry"));
                append(&mut builder, &child, &name, bar)?;
            }
        }
    }
    builder.into_inner()?.flush()?;
    Ok(())
}

fn sorted_children(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut children = fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()?;
    children.sort();
    Ok(children)
}

fn append(
    builder: &mut tar::Builder<impl Write>,
    path: &Path,
    name: &Path,
    bar: &ProgressBar,
) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| path.display().to_string())?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    header.set_uid(0);
    header.set_gid(0);
    let kind = meta.file_type();
    if kind.is_dir() {
        builder.append_data(&mut header, name, std::io::empty())?;
        for child in sorted_children(path)? {
            let child_name = name.join(child.file_name().expect("a directory entry"));
            append(builder, &child, &child_name, bar)?;
        }
    } else if kind.is_symlink() {
        let target = fs::read_link(path)?;
        builder.append_link(&mut header, name, target)?;
    } else if kind.is_file() {
        let file = fs::File::open(path).with_context(|| path.display().to_string())?;
        // The header holds the size from the stat: a file that grows meanwhile is cut there.
        let reader = bar.wrap_read(file.take(meta.len()));
        builder
            .append_data(&mut header, name, reader)
            .with_context(|| path.display().to_string())?;
    } else {
        eprintln!(
            "hearth: skipping {}: not a file, directory or symlink",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert!(
            matches!(location("m1:/srv"), Location::Machine { name, path } if name == "m1" && path == "/srv")
        );
        assert!(matches!(location("m1:srv"), Location::Machine { path, .. } if path == "/srv"));
        assert!(matches!(location("./a:b"), Location::Local(_)));
        assert!(matches!(location("dir/x"), Location::Local(_)));
    }

    #[test]
    fn names() {
        assert_eq!(base_name("/a/b/").as_deref(), Some("b"));
        assert_eq!(base_name("/a/b/.").as_deref(), Some("b"));
        assert_eq!(base_name("/"), None);
        assert_eq!(parent_of("/a/b"), "/a");
        assert_eq!(parent_of("/a"), "/");
        assert!(contents_only("d/.") && !contents_only("d/"));
    }

    #[test]
    fn entries_stay_below_the_top() {
        assert_eq!(below_top(Path::new("top/a/b")).unwrap(), Path::new("a/b"));
        assert_eq!(below_top(Path::new("top")).unwrap(), Path::new(""));
        assert!(below_top(Path::new("top/../x")).is_err());
        assert!(below_top(Path::new("/etc/passwd")).is_err());
    }

    /// A tree packed and unpacked again keeps its modes, links and empty files; an archive
    /// that writes through a symlink it made is refused.
    #[test]
    fn round_trip_and_escape() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("secret"), "s").unwrap();
        fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(src.join("empty"), "").unwrap();
        std::os::unix::fs::symlink("secret", src.join("link")).unwrap();
        let mut tar = Vec::new();
        pack(&mut tar, &src, Some("src"), &ProgressBar::hidden()).unwrap();
        let out = tmp.path().join("out");
        unpack(&tar[..], &out).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join("secret")), 0o600);
        assert_eq!(fs::read(out.join("empty")).unwrap(), b"");
        assert_eq!(
            fs::read_link(out.join("link")).unwrap(),
            Path::new("secret")
        );

        let mut evil = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        evil.append_data(&mut h, "top", std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        evil.append_link(&mut h, "top/up", tmp.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        evil.append_data(&mut h, "top/up/escaped", &b"x"[..])
            .unwrap();
        let evil = evil.into_inner().unwrap();
        assert!(unpack(&evil[..], &tmp.path().join("evil")).is_err());
        assert!(!tmp.path().join("escaped").exists());
    }
}
