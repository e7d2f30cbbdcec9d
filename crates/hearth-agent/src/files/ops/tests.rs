use super::*;
use crate::files::testing::*;
use hearth_proto::files::Edit;
use hearth_proto::ErrorKind;
use std::os::unix::fs::symlink;

const ALL: [Operation; 16] = [
    Operation::ReadText,
    Operation::ReadBytes,
    Operation::WriteText,
    Operation::WriteBytes,
    Operation::Remove,
    Operation::List,
    Operation::Stat,
    Operation::Exists,
    Operation::Patch,
    Operation::ReadRange,
    Operation::WriteRange,
    Operation::Mkdir,
    Operation::Move,
    Operation::Grep,
    Operation::Chmod,
    Operation::Chown,
];

#[test]
fn every_operation_wants_an_absolute_path() {
    for operation in ALL {
        let mut req = FileOp::new(operation, "etc/passwd");
        req.to = Some("/tmp/x".into());
        assert_eq!(fails(req), ErrorKind::Invalid, "{operation:?}");
        let mut req = FileOp::new(operation, "");
        req.path = None;
        assert_eq!(
            fails(req),
            ErrorKind::Invalid,
            "{operation:?} without a path"
        );
    }
    let dir = scratch();
    let mut req = file_op(Operation::Move, &dir.path().join("a"));
    req.to = Some("relative".into());
    assert_eq!(fails(req), ErrorKind::Invalid);
}

#[test]
fn an_unknown_user_is_invalid() {
    let dir = scratch();
    let mut req = file_op(Operation::Stat, dir.path());
    req.user = Some("no-such-user-here".into());
    assert_eq!(fails(req), ErrorKind::Invalid);
}

#[test]
fn text_and_bytes_round_trip_with_their_version() {
    let dir = scratch();
    let path = dir.path().join("a.txt");
    let mut write = file_op(Operation::WriteText, &path);
    write.content = Some("abc".into());
    let version = ok(write).version.unwrap();
    // sha256("abc")
    assert_eq!(
        version,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    let read = ok(file_op(Operation::ReadText, &path));
    assert_eq!(read.content.as_deref(), Some("abc"));
    assert_eq!(read.version, Some(version));
    assert_eq!(mode_of(&path), 0o644 & !umask());

    let bin = dir.path().join("b.bin");
    let mut write = file_op(Operation::WriteBytes, &bin);
    write.content_base64 = Some(B64.encode([0u8, 255, 1]));
    write.mode = Some(0o640);
    ok(write);
    assert_eq!(fs::read(&bin).unwrap(), [0, 255, 1]);
    assert_eq!(mode_of(&bin), 0o640);
    let read = ok(file_op(Operation::ReadBytes, &bin));
    assert_eq!(read.content_base64, Some(B64.encode([0u8, 255, 1])));
    // Not text.
    assert_eq!(
        fails(file_op(Operation::ReadText, &bin)),
        ErrorKind::Invalid
    );

    // A rewrite truncates and keeps the mode.
    let mut write = file_op(Operation::WriteText, &bin);
    write.content = Some("x".into());
    write.mode = Some(0o600);
    ok(write);
    assert_eq!(fs::read(&bin).unwrap(), b"x");
    assert_eq!(mode_of(&bin), 0o640);
}

#[test]
fn a_mode_is_exact_whatever_the_umask() {
    let dir = scratch();
    let path = dir.path().join("shared");
    let mut write = file_op(Operation::WriteText, &path);
    write.content = Some(String::new());
    write.mode = Some(0o666);
    ok(write);
    assert_eq!(mode_of(&path), 0o666);
}

fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
}

#[test]
fn reads_and_writes_fail_as_they_should() {
    let dir = scratch();
    let missing = dir.path().join("missing");
    assert_eq!(
        fails(file_op(Operation::ReadText, &missing)),
        ErrorKind::NotFound
    );
    assert_eq!(
        fails(file_op(Operation::ReadBytes, dir.path())),
        ErrorKind::Conflict
    );
    let mut write = file_op(Operation::WriteText, &missing.join("child"));
    write.content = Some("x".into());
    assert_eq!(fails(write), ErrorKind::NotFound);
    let mut write = file_op(Operation::WriteText, dir.path());
    write.content = Some("x".into());
    assert_eq!(fails(write), ErrorKind::Conflict);
    // The content a write needs.
    assert_eq!(
        fails(file_op(Operation::WriteText, &missing)),
        ErrorKind::Invalid
    );
    let mut write = file_op(Operation::WriteBytes, &missing);
    write.content_base64 = Some("not base64!".into());
    assert_eq!(fails(write), ErrorKind::Invalid);
    // A file below a file.
    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    assert_eq!(
        fails(file_op(Operation::ReadText, &file.join("x"))),
        ErrorKind::Conflict
    );
}

#[test]
fn buffered_content_is_capped() {
    let dir = scratch();
    let big = dir.path().join("big");
    let file = File::create(&big).unwrap();
    file.set_len(MAX_BUFFERED + 1).unwrap();
    assert_eq!(
        fails(file_op(Operation::ReadText, &big)),
        ErrorKind::TooLarge
    );
    assert_eq!(
        fails(file_op(Operation::ReadBytes, &big)),
        ErrorKind::TooLarge
    );
    let mut range = file_op(Operation::ReadRange, &big);
    range.length = Some(MAX_BUFFERED + 1);
    assert_eq!(fails(range), ErrorKind::TooLarge);
    // To the end is too much as well, from 1 byte on it is not.
    assert_eq!(
        fails(file_op(Operation::ReadRange, &big)),
        ErrorKind::TooLarge
    );
    let mut range = file_op(Operation::ReadRange, &big);
    range.offset = Some(1);
    assert_eq!(
        ok(range).content_base64.unwrap().len(),
        (MAX_BUFFERED as usize).div_ceil(3) * 4
    );

    let mut write = file_op(Operation::WriteText, &dir.path().join("w"));
    write.content = Some("x".repeat(MAX_BUFFERED as usize + 1));
    assert_eq!(fails(write), ErrorKind::TooLarge);
    assert!(!dir.path().join("w").exists());

    let mut patch = file_op(Operation::Patch, &big);
    patch.edits = Some(vec![Edit {
        find: "a".into(),
        replace: "b".into(),
    }]);
    assert_eq!(fails(patch), ErrorKind::TooLarge);
}

#[test]
fn operations_run_with_the_users_permissions() {
    let dir = scratch();
    let secret = dir.path().join("secret");
    fs::write(&secret, "root only").unwrap();
    fs::set_permissions(&secret, Permissions::from_mode(0o600)).unwrap();

    let as_nobody = |mut req: FileOp| {
        req.user = Some(NOBODY.into());
        req
    };
    let read = as_nobody(file_op(Operation::ReadText, &secret));
    assert_eq!(fails(read), ErrorKind::PermissionDenied);
    // The thread is root again afterwards.
    assert_eq!(creds::current_fsuid(), 0);
    assert_eq!(
        ok(file_op(Operation::ReadText, &secret)).content.unwrap(),
        "root only"
    );

    let mut write = as_nobody(file_op(Operation::WriteText, &dir.path().join("new")));
    write.content = Some("x".into());
    assert_eq!(fails(write), ErrorKind::PermissionDenied);
    let mut chmod = as_nobody(file_op(Operation::Chmod, &secret));
    chmod.mode = Some(0o644);
    assert_eq!(fails(chmod), ErrorKind::PermissionDenied);
    let mut chown = as_nobody(file_op(Operation::Chown, &secret));
    chown.uid = Some(NOBODY_ID);
    assert_eq!(fails(chown), ErrorKind::PermissionDenied);
    assert_eq!(
        fails(as_nobody(file_op(Operation::Remove, &secret))),
        ErrorKind::PermissionDenied
    );
    let mut grep = as_nobody(file_op(Operation::Grep, &secret));
    grep.pattern = Some("root".into());
    assert_eq!(fails(grep), ErrorKind::PermissionDenied);

    // What nobody writes, nobody owns.
    let own = nobodys(dir.path(), "own");
    let mut write = as_nobody(file_op(Operation::WriteText, &own.join("mine")));
    write.content = Some("x".into());
    ok(write);
    let meta = fs::metadata(own.join("mine")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY_ID, NOBODY_ID));
    let mut mkdir = as_nobody(file_op(Operation::Mkdir, &own.join("d")));
    mkdir.mode = Some(0o700);
    ok(mkdir);
    assert_eq!(fs::metadata(own.join("d")).unwrap().uid(), NOBODY_ID);
    // A root-only directory cannot be listed, one's own can.
    let closed = dir.path().join("closed");
    fs::create_dir(&closed).unwrap();
    fs::set_permissions(&closed, Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        fails(as_nobody(file_op(Operation::List, &closed))),
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        ok(as_nobody(file_op(Operation::List, &own)))
            .entries
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn remove_wants_recursive_for_a_full_directory() {
    let dir = scratch();
    let full = dir.path().join("full");
    fs::create_dir_all(full.join("sub")).unwrap();
    fs::write(full.join("sub/f"), "x").unwrap();
    assert_eq!(
        fails(file_op(Operation::Remove, &full)),
        ErrorKind::Conflict
    );
    let mut req = file_op(Operation::Remove, &full);
    req.recursive = Some(true);
    ok(req);
    assert!(!full.exists());

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    ok(file_op(Operation::Remove, &empty));
    let file = dir.path().join("f");
    fs::write(&file, "").unwrap();
    ok(file_op(Operation::Remove, &file));
    assert_eq!(
        fails(file_op(Operation::Remove, &file)),
        ErrorKind::NotFound
    );
    // A symlink goes, not what it points to.
    let target = dir.path().join("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("kept"), "").unwrap();
    symlink(&target, dir.path().join("link")).unwrap();
    let mut req = file_op(Operation::Remove, &dir.path().join("link"));
    req.recursive = Some(true);
    ok(req);
    assert!(target.join("kept").exists());
    assert_eq!(
        fails(FileOp::new(Operation::Remove, "/")),
        ErrorKind::Invalid
    );
}

/// a/ (0750) with a/f (0600, "hi") and a/sub/g; b -> a; c (empty file); d -> missing.
fn listed_tree() -> tempfile::TempDir {
    let dir = scratch();
    let a = dir.path().join("a");
    fs::create_dir_all(a.join("sub")).unwrap();
    fs::set_permissions(&a, Permissions::from_mode(0o750)).unwrap();
    fs::write(a.join("f"), "hi").unwrap();
    fs::set_permissions(a.join("f"), Permissions::from_mode(0o600)).unwrap();
    fs::write(a.join("sub/g"), "").unwrap();
    symlink(&a, dir.path().join("b")).unwrap();
    fs::write(dir.path().join("c"), "").unwrap();
    symlink("missing", dir.path().join("d")).unwrap();
    dir
}

fn listed(req: FileOp, root: &Path) -> Vec<String> {
    let result = ok(req);
    assert!(!result.truncated);
    result
        .entries
        .unwrap()
        .iter()
        .map(|e| {
            e.path
                .strip_prefix(root.to_str().unwrap())
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn list_goes_as_deep_as_asked_and_never_through_symlinks() {
    let dir = listed_tree();
    let root = dir.path();
    assert_eq!(
        listed(file_op(Operation::List, root), root),
        ["/a", "/b", "/c", "/d"]
    );
    let mut req = file_op(Operation::List, root);
    req.depth = Some(2);
    assert_eq!(
        listed(req, root),
        ["/a", "/a/f", "/a/sub", "/b", "/c", "/d"]
    );
    let mut req = file_op(Operation::List, root);
    req.recursive = Some(true);
    assert_eq!(
        listed(req, root),
        ["/a", "/a/f", "/a/sub", "/a/sub/g", "/b", "/c", "/d"]
    );
    let mut req = file_op(Operation::List, root);
    req.depth = Some(0);
    assert_eq!(fails(req), ErrorKind::Invalid);
    assert_eq!(
        fails(file_op(Operation::List, &root.join("c"))),
        ErrorKind::Conflict
    );
    assert_eq!(
        fails(file_op(Operation::List, &root.join("x"))),
        ErrorKind::NotFound
    );
    // Through a symlink at the root: it lists what the link names.
    assert_eq!(
        listed(file_op(Operation::List, &root.join("b")), &root.join("b")),
        ["/f", "/sub"]
    );
}

#[test]
fn entries_describe_files_links_and_directories() {
    let dir = listed_tree();
    let root = dir.path();
    let result = ok(file_op(Operation::List, root));
    let entries = result.entries.unwrap();
    let a = &entries[0];
    assert_eq!(a.name, "a");
    assert_eq!(a.path, root.join("a").to_str().unwrap());
    assert_eq!(a.kind, EntryType::Directory);
    assert_eq!(a.mode, 0o750);
    assert!(!a.symlink && a.target.is_none());
    assert_eq!((a.uid, a.gid), (0, 0));
    let b = &entries[1];
    assert_eq!(b.kind, EntryType::Directory);
    assert!(b.symlink);
    assert_eq!(b.target.as_deref(), root.join("a").to_str());
    let d = &entries[3];
    assert_eq!((d.kind, d.symlink), (EntryType::File, true));
    assert_eq!(d.target.as_deref(), Some("missing"));

    let stat = ok(file_op(Operation::Stat, &root.join("a/f")))
        .stat
        .unwrap();
    assert_eq!(
        (stat.kind, stat.size_bytes, stat.mode),
        (EntryType::File, 2, 0o600)
    );
    let mtime = DateTime::parse_from_rfc3339(&stat.mtime).unwrap();
    let meta = fs::metadata(root.join("a/f")).unwrap();
    assert_eq!(mtime.timestamp(), meta.mtime());
    assert!(stat.mtime.ends_with('Z'), "{}", stat.mtime);
    let stat = ok(file_op(Operation::Stat, &root.join("b"))).stat.unwrap();
    assert!(stat.symlink && stat.kind == EntryType::Directory);
    assert_eq!(
        fails(file_op(Operation::Stat, &root.join("x"))),
        ErrorKind::NotFound
    );
}

#[test]
fn exists_answers_without_not_found() {
    let dir = listed_tree();
    let root = dir.path();
    let exists = |p: &Path| ok(file_op(Operation::Exists, p)).exists.unwrap();
    assert!(exists(&root.join("a/f")));
    assert!(exists(&root.join("d")), "a dangling symlink exists");
    assert!(!exists(&root.join("x")));
    assert!(!exists(&root.join("c/below-a-file")));
}

fn edit(find: &str, replace: &str) -> Edit {
    Edit {
        find: find.into(),
        replace: replace.into(),
    }
}

#[test]
fn patch_replaces_unique_occurrences_atomically() {
    let dir = scratch();
    let path = dir.path().join("conf");
    fs::write(&path, "a = 1\nb = 2\nc = 2\n").unwrap();
    fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&path, Some(NOBODY_ID), Some(NOBODY_ID)).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();

    let mut req = file_op(Operation::Patch, &path);
    req.edits = Some(vec![edit("a = 1", "a = 10"), edit("b = 2", "b = 20")]);
    req.set_contents = Some(true);
    let result = ok(req);
    let expected = "a = 10\nb = 20\nc = 2\n";
    assert_eq!(result.content.as_deref(), Some(expected));
    assert_eq!(result.version, Some(version(expected.as_bytes())));
    assert_eq!(fs::read_to_string(&path).unwrap(), expected);
    let meta = fs::metadata(&path).unwrap();
    assert_ne!(meta.ino(), inode, "replaced by a rename");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o640, NOBODY_ID, NOBODY_ID)
    );
    assert_eq!(names(dir.path()), ["conf"], "no temporary file left");

    // Edits see the ones before them; none may be missing or ambiguous, and then nothing changes.
    for edits in [
        vec![edit("a = 10", "x"), edit("= 2", "y")],
        vec![edit("nowhere", "x")],
        vec![edit("a = 10", "z"), edit("a = 10", "again")],
    ] {
        let mut req = file_op(Operation::Patch, &path);
        req.edits = Some(edits);
        assert_eq!(fails(req), ErrorKind::Conflict);
        assert_eq!(fs::read_to_string(&path).unwrap(), expected);
    }
    let mut req = file_op(Operation::Patch, &path);
    req.edits = Some(vec![edit("", "x")]);
    assert_eq!(fails(req), ErrorKind::Invalid);
    assert_eq!(fails(file_op(Operation::Patch, &path)), ErrorKind::Invalid);
    let mut req = file_op(Operation::Patch, &dir.path().join("missing"));
    req.edits = Some(vec![edit("a", "b")]);
    assert_eq!(fails(req), ErrorKind::NotFound);
}

#[test]
fn patch_through_a_symlink_keeps_the_link() {
    let dir = scratch();
    fs::write(dir.path().join("real"), "old").unwrap();
    symlink("real", dir.path().join("link")).unwrap();
    let mut req = file_op(Operation::Patch, &dir.path().join("link"));
    req.edits = Some(vec![edit("old", "new")]);
    ok(req);
    assert!(fs::symlink_metadata(dir.path().join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(dir.path().join("real")).unwrap(), "new");
}

#[test]
fn patch_in_place_where_the_user_cannot_replace_the_file() {
    // Nobody may write the file but not the root-owned directory it is in.
    let dir = scratch();
    let path = dir.path().join("shared");
    fs::write(&path, "one").unwrap();
    fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();
    let mut req = file_op(Operation::Patch, &path);
    req.edits = Some(vec![edit("one", "two")]);
    req.user = Some(NOBODY.into());
    ok(req);
    assert_eq!(fs::read_to_string(&path).unwrap(), "two");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.ino(), meta.uid()), (inode, 0));
}

#[test]
fn ranges_read_and_write_in_place() {
    let dir = scratch();
    let path = dir.path().join("r");
    let mut req = file_op(Operation::WriteRange, &path);
    req.offset = Some(4);
    req.content = Some("tail".into());
    req.mode = Some(0o600);
    ok(req);
    assert_eq!(fs::read(&path).unwrap(), b"\0\0\0\0tail");
    assert_eq!(mode_of(&path), 0o600);
    let mut req = file_op(Operation::WriteRange, &path);
    req.content_base64 = Some(B64.encode("head"));
    ok(req);
    assert_eq!(fs::read(&path).unwrap(), b"headtail", "not truncated");

    let mut req = file_op(Operation::ReadRange, &path);
    req.offset = Some(2);
    req.length = Some(4);
    assert_eq!(ok(req).content_base64, Some(B64.encode("adta")));
    let mut req = file_op(Operation::ReadRange, &path);
    req.offset = Some(6);
    req.length = Some(100);
    assert_eq!(ok(req).content_base64, Some(B64.encode("il")));
    let mut req = file_op(Operation::ReadRange, &path);
    req.offset = Some(100);
    assert_eq!(ok(req).content_base64, Some(String::new()));

    let mut req = file_op(Operation::WriteRange, &path);
    req.content = Some("a".into());
    req.content_base64 = Some(B64.encode("b"));
    assert_eq!(fails(req), ErrorKind::Invalid);
    assert_eq!(
        fails(file_op(Operation::ReadRange, &dir.path().join("x"))),
        ErrorKind::NotFound
    );
}

#[test]
fn mkdir_makes_one_or_all() {
    let dir = scratch();
    let one = dir.path().join("one");
    let mut req = file_op(Operation::Mkdir, &one);
    req.mode = Some(0o775);
    ok(req.clone());
    assert_eq!(mode_of(&one), 0o775);
    assert_eq!(fails(req.clone()), ErrorKind::Conflict);
    req.recursive = Some(true);
    req.mode = Some(0o700);
    ok(req);
    assert_eq!(
        mode_of(&one),
        0o775,
        "an existing directory is left as it is"
    );

    let deep = dir.path().join("x/y/z");
    assert_eq!(fails(file_op(Operation::Mkdir, &deep)), ErrorKind::NotFound);
    let mut req = file_op(Operation::Mkdir, &deep);
    req.recursive = Some(true);
    req.mode = Some(0o700);
    ok(req);
    assert_eq!(mode_of(&deep), 0o700);

    let file = dir.path().join("file");
    fs::write(&file, "").unwrap();
    let mut req = file_op(Operation::Mkdir, &file);
    req.recursive = Some(true);
    assert_eq!(fails(req), ErrorKind::Conflict);
}

#[test]
fn move_renames_within_a_file_system() {
    let dir = scratch();
    let from = dir.path().join("from");
    fs::write(&from, "x").unwrap();
    let to = dir.path().join("to");
    let mut req = file_op(Operation::Move, &from);
    req.to = Some(to.to_str().unwrap().into());
    ok(req.clone());
    assert_eq!(fs::read_to_string(&to).unwrap(), "x");
    assert_eq!(fails(req), ErrorKind::NotFound);
    // Over a directory that is not empty.
    let full = dir.path().join("full");
    fs::create_dir_all(full.join("x")).unwrap();
    let d = dir.path().join("d");
    fs::create_dir(&d).unwrap();
    let mut req = file_op(Operation::Move, &d);
    req.to = Some(full.to_str().unwrap().into());
    assert_eq!(fails(req), ErrorKind::Conflict);
}

#[test]
fn move_across_file_systems_is_a_conflict() {
    // /proc is always another file system; renaming into it fails with EXDEV.
    let dir = scratch();
    let from = dir.path().join("f");
    fs::write(&from, "x").unwrap();
    let mut req = file_op(Operation::Move, &from);
    req.to = Some("/proc/hearth-test".into());
    assert_eq!(fails(req), ErrorKind::Conflict);
    assert!(from.exists());
}

fn grep_req(path: &Path, pattern: &str) -> FileOp {
    let mut req = file_op(Operation::Grep, path);
    req.pattern = Some(pattern.into());
    req
}

fn found(req: FileOp, root: &Path) -> (Vec<(String, u64, String)>, bool) {
    let result = ok(req);
    let matches = result
        .matches
        .unwrap()
        .into_iter()
        .map(|m| {
            let path = Path::new(&m.path).strip_prefix(root).unwrap();
            (path.display().to_string(), m.line_number, m.line)
        })
        .collect();
    (matches, result.truncated)
}

#[test]
fn grep_finds_lines_in_a_file_or_a_tree() {
    let dir = scratch();
    let root = dir.path();
    fs::create_dir_all(root.join("src/deep")).unwrap();
    fs::write(
        root.join("src/a.rs"),
        "fn main() {}\n// TODO: more\nfn x() {}\n",
    )
    .unwrap();
    fs::write(root.join("src/deep/b.rs"), "todo!()\nfn b() {}\n").unwrap();
    fs::write(root.join("src/bin"), b"fn \0binary").unwrap();
    fs::create_dir(root.join("elsewhere")).unwrap();
    fs::write(root.join("elsewhere/c.rs"), "fn c() {}\n").unwrap();
    symlink(root.join("elsewhere"), root.join("src/link")).unwrap();
    symlink(root.join("elsewhere/c.rs"), root.join("src/c.rs")).unwrap();
    let big = File::create(root.join("src/zbig")).unwrap();
    big.set_len(MAX_BUFFERED + 1).unwrap();

    let (matches, truncated) = found(grep_req(&root.join("src"), "fn "), root);
    assert_eq!(
        matches,
        [
            ("src/a.rs".into(), 1, "fn main() {}".into()),
            ("src/a.rs".into(), 3, "fn x() {}".into()),
            ("src/deep/b.rs".into(), 2, "fn b() {}".into()),
        ]
    );
    assert!(!truncated);

    let (matches, _) = found(grep_req(&root.join("src"), "todo"), root);
    assert_eq!(matches, [("src/deep/b.rs".into(), 1, "todo!()".into())]);
    let mut req = grep_req(&root.join("src"), "todo");
    req.case_insensitive = Some(true);
    assert_eq!(found(req, root).0.len(), 2);
    // Literal unless asked: "()" is not an empty group.
    let (matches, _) = found(grep_req(&root.join("src/a.rs"), "x()"), root);
    assert_eq!(matches, [("src/a.rs".into(), 3, "fn x() {}".into())]);
    let mut req = grep_req(&root.join("src/a.rs"), r"^fn \w+\(\)");
    req.regex = Some(true);
    assert_eq!(found(req, root).0.len(), 2);

    let mut req = grep_req(&root.join("src"), "fn ");
    req.max_matches = Some(2);
    let (matches, truncated) = found(req, root);
    assert_eq!(matches.len(), 2);
    assert!(truncated);

    let mut req = grep_req(&root.join("src"), "(");
    req.regex = Some(true);
    assert_eq!(fails(req), ErrorKind::Invalid);
    assert_eq!(fails(file_op(Operation::Grep, root)), ErrorKind::Invalid);
    assert_eq!(
        fails(grep_req(&root.join("src/zbig"), "x")),
        ErrorKind::TooLarge
    );
    assert_eq!(
        fails(grep_req(&root.join("nope"), "x")),
        ErrorKind::NotFound
    );
}

#[test]
fn chmod_and_chown_reach_under_a_directory_but_not_through_links() {
    let dir = scratch();
    let root = dir.path();
    let tree = root.join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/f"), "").unwrap();
    let outside = root.join("outside");
    fs::write(&outside, "").unwrap();
    fs::set_permissions(&outside, Permissions::from_mode(0o600)).unwrap();
    symlink(&outside, tree.join("link")).unwrap();

    let mut req = file_op(Operation::Chmod, &tree);
    req.mode = Some(0o700);
    req.recursive = Some(true);
    ok(req);
    for p in ["tree", "tree/sub", "tree/sub/f"] {
        assert_eq!(mode_of(&root.join(p)), 0o700, "{p}");
    }
    assert_eq!(mode_of(&outside), 0o600);
    let mut req = file_op(Operation::Chmod, &tree.join("sub/f"));
    req.mode = Some(0o4755);
    ok(req);
    assert_eq!(mode_of(&tree.join("sub/f")), 0o4755);
    assert_eq!(fails(file_op(Operation::Chmod, &tree)), ErrorKind::Invalid);

    let mut req = file_op(Operation::Chown, &tree);
    req.uid = Some(NOBODY_ID);
    req.recursive = Some(true);
    ok(req);
    for p in ["tree", "tree/sub", "tree/sub/f", "tree/link"] {
        let meta = fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (NOBODY_ID, 0), "{p}");
    }
    assert_eq!(fs::metadata(&outside).unwrap().uid(), 0);
    let mut req = file_op(Operation::Chown, &tree.join("sub"));
    req.gid = Some(NOBODY_ID);
    ok(req);
    assert_eq!(fs::metadata(tree.join("sub")).unwrap().gid(), NOBODY_ID);
    assert_eq!(fails(file_op(Operation::Chown, &tree)), ErrorKind::Invalid);
    let mut req = file_op(Operation::Chown, &root.join("missing"));
    req.uid = Some(1);
    assert_eq!(fails(req), ErrorKind::NotFound);
}
