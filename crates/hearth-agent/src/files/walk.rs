//! Walking directory trees without following symlinks, in bounded memory.

use std::collections::{BinaryHeap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io;
use std::path::{Path, PathBuf};

/// What a walk does with an error below its root (the root's own errors always end it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Errors {
    Stop,
    /// Leave out what cannot be read (it vanished, or the user may not read it).
    Skip,
}

/// Visits `root` (at depth 0) and, when it is a directory, everything under it, parents before
/// their children, in directory order. Symlinks are visited, never followed. Memory grows with
/// the depth only: one open directory per level.
pub fn each(
    root: &Path,
    errors: Errors,
    visit: &mut dyn FnMut(&Path, &Metadata, usize) -> io::Result<()>,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(root)?;
    visit(root, &meta, 0)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mut stack = vec![fs::read_dir(root)?];
    while let Some(dir) = stack.last_mut() {
        let Some(entry) = dir.next() else {
            stack.pop();
            continue;
        };
        let found = entry.and_then(|e| {
            let path = e.path();
            // A directory entry's metadata is the entry's own (lstat).
            e.metadata().map(|m| (path, m))
        });
        let (path, meta) = match found {
            Ok(found) => found,
            Err(_) if errors == Errors::Skip => continue,
            Err(e) => return Err(e),
        };
        visit(&path, &meta, stack.len())?;
        if meta.is_dir() {
            match fs::read_dir(&path) {
                Ok(dir) => stack.push(dir),
                Err(_) if errors == Errors::Skip => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// A walk in path order (each directory's names sorted, children right after their parent) that
/// holds at most `cap` names waiting to be visited: past that it leaves out the names that would
/// come last and says so in `truncated`. The caller decides which directories to descend into.
pub struct Sorted {
    cap: usize,
    /// Innermost last; each level's names ascending.
    levels: Vec<Level>,
    pending: usize,
    pub truncated: bool,
}

struct Level {
    dir: PathBuf,
    depth: u32,
    names: VecDeque<OsString>,
}

impl Sorted {
    /// Starts at the entries of directory `root` (depth 1).
    pub fn new(root: &Path, cap: usize) -> io::Result<Sorted> {
        let mut walk = Sorted {
            cap,
            levels: Vec::new(),
            pending: 0,
            truncated: false,
        };
        walk.push(root, 1)?;
        Ok(walk)
    }

    /// The next path in order and its depth below the root.
    pub fn next_path(&mut self) -> Option<(PathBuf, u32)> {
        loop {
            let level = self.levels.last_mut()?;
            if let Some(name) = level.names.pop_front() {
                self.pending -= 1;
                return Some((level.dir.join(name), level.depth));
            }
            self.levels.pop();
        }
    }

    /// Whether names are still waiting.
    pub fn has_more(&self) -> bool {
        self.pending > 0
    }

    /// Visits the entries of `dir` (just returned, at `depth - 1`) next; an unreadable one is
    /// left out.
    pub fn descend(&mut self, dir: &Path, depth: u32) {
        let _ = self.push(dir, depth);
    }

    fn push(&mut self, dir: &Path, depth: u32) -> io::Result<()> {
        // The smallest `cap` names, in a max-heap so the largest goes when it overflows.
        let mut heap = BinaryHeap::new();
        for entry in fs::read_dir(dir)? {
            let Ok(entry) = entry else { continue };
            heap.push(entry.file_name());
            if heap.len() > self.cap {
                heap.pop();
                self.truncated = true;
            }
        }
        let names = VecDeque::from(heap.into_sorted_vec());
        self.pending += names.len();
        // The names of outer levels come after everything under this one: past the cap, the
        // outermost level's last names go first.
        for level in &mut self.levels {
            while self.pending > self.cap && level.names.pop_back().is_some() {
                self.pending -= 1;
                self.truncated = true;
            }
        }
        self.levels.push(Level {
            dir: dir.to_path_buf(),
            depth,
            names,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in ["a", "a/x", "b", "b-c"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        for f in ["a/x/1", "a/2", "b/3", "b-c/4", "z"] {
            fs::write(dir.path().join(f), "").unwrap();
        }
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
        dir
    }

    fn relative(root: &Path, paths: Vec<PathBuf>) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    fn sorted(root: &Path, cap: usize) -> (Vec<String>, bool) {
        let mut walk = Sorted::new(root, cap).unwrap();
        let mut seen = Vec::new();
        while let Some((path, depth)) = walk.next_path() {
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                walk.descend(&path, depth + 1);
            }
            seen.push(path);
        }
        (relative(root, seen), walk.truncated)
    }

    #[test]
    fn sorted_walk_visits_in_path_order_without_following_links() {
        let dir = tree();
        let (seen, truncated) = sorted(dir.path(), 100);
        assert_eq!(
            seen,
            ["a", "a/2", "a/x", "a/x/1", "b", "b/3", "b-c", "b-c/4", "link", "z"]
        );
        assert!(!truncated);
    }

    #[test]
    fn sorted_walk_drops_what_comes_last_past_its_cap() {
        let dir = tree();
        let (seen, truncated) = sorted(dir.path(), 3);
        assert!(truncated);
        // Never more than 3 names waiting: the root's first three, then the inner ones first.
        assert_eq!(seen[..3], ["a", "a/2", "a/x"]);
        assert!(seen.len() < 10, "{seen:?}");
    }

    #[test]
    fn each_visits_parents_first_and_not_through_links() {
        let dir = tree();
        let mut seen = Vec::new();
        each(dir.path(), Errors::Stop, &mut |p, _, depth| {
            seen.push((p.to_path_buf(), depth));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 11);
        assert_eq!(seen[0], (dir.path().to_path_buf(), 0));
        for (path, depth) in &seen[1..] {
            let rel = path.strip_prefix(dir.path()).unwrap();
            assert_eq!(rel.components().count(), *depth, "{}", rel.display());
            let parent = path.parent().unwrap();
            let at = |p: &Path| seen.iter().position(|(s, _)| s == p).unwrap();
            assert!(at(parent) < at(path), "{} before its parent", rel.display());
        }
        assert!(
            !seen
                .iter()
                .any(|(p, _)| p.starts_with(dir.path().join("link/"))
                    && p != &dir.path().join("link"))
        );
    }
}
