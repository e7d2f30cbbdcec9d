//! The pages a VMM wrote through a private mapping of a file: what a restored machine changed
//! of the snapshot it was restored from.
//!
//! A restored machine maps its snapshot's memory file private, so the pages it writes are
//! copied into its own anonymous memory and every other page still reads from the file (and is
//! shared with every other machine restored from it). `/proc/PID/pagemap` tells the two apart:
//! a written page is present and not a file page, or swapped out (file pages are dropped, never
//! swapped). Copying those pages over a clone of the file gives the machine's whole RAM without
//! reading the rest of it.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// Pagemap entries read at once (8 bytes each).
const ENTRIES_PER_READ: usize = 8192;
/// The largest run of pages copied in one read and one write.
const MAX_RUN_BYTES: usize = 4 << 20;

/// One mapping of the file in the process: `[start, end)` at file offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
}

/// Parses `/proc/PID/maps` for the mappings of the file with device `dev`, inode `ino` and
/// path `path`: the inode and either the device or the path must agree (on btrfs the device
/// `stat` reports is the subvolume's, not the one the maps show).
fn mappings(maps: &str, dev: u64, ino: u64, path: &str) -> Vec<Mapping> {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    maps.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, char::is_whitespace);
            let (range, _perms, offset, device, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let name = f.next().unwrap_or("").trim_start();
            let (maj, min) = device.split_once(':')?;
            let same_dev = u64::from_str_radix(maj, 16).ok()? == major
                && u64::from_str_radix(min, 16).ok()? == minor;
            let same = inode.parse::<u64>().ok()? == ino && (same_dev || name == path);
            if !same {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
            })
        })
        .collect()
}

/// Whether a pagemap entry is a page the process wrote (its own copy, in memory or swap).
fn written(entry: u64) -> bool {
    (entry & PRESENT != 0 && entry & FILE_OR_SHARED == 0) || entry & SWAPPED != 0
}

/// Copies into `dest`, at their offsets in `file`, the pages that process `pid` wrote through
/// private mappings of `file`; returns the bytes copied. The process must not run meanwhile
/// (a paused VMM's vCPUs and devices write nothing). `dest` is expected to hold a clone of
/// `file` already. The copy runs on every core: a paused machine waits for it.
pub fn copy_written_pages(pid: i32, file: &Path, dest: &Path) -> io::Result<u64> {
    let runs = written_runs(pid, file)?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let out = std::fs::OpenOptions::new().write(true).open(dest)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(runs.len().max(1));
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> io::Result<u64> {
                    let mut buf = vec![0; MAX_RUN_BYTES];
                    let mut copied = 0;
                    while let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let buf = &mut buf[..run.len as usize];
                        mem.read_exact_at(buf, run.addr)?;
                        out.write_all_at(buf, run.at)?;
                        copied += run.len;
                    }
                    Ok(copied)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a page copier panicked"))
            .sum()
    })
}

/// A run of written pages: `len` bytes at `addr` in the process, at `at` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    addr: u64,
    len: u64,
    at: u64,
}

/// The runs of pages `pid` wrote through its private mappings of `file`, each at most
/// [`MAX_RUN_BYTES`].
fn written_runs(pid: i32, file: &Path) -> io::Result<Vec<Run>> {
    let meta = std::fs::metadata(file)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let canonical = std::fs::canonicalize(file)?;
    let found = mappings(&maps, meta.dev(), meta.ino(), &canonical.to_string_lossy());
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} does not map {}", file.display()),
        ));
    }
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let mut runs: Vec<Run> = Vec::new();
    let mut entries = vec![0u8; ENTRIES_PER_READ * 8];
    for m in found {
        let mut addr = m.start;
        while addr < m.end {
            let count = (((m.end - addr) / page) as usize).min(ENTRIES_PER_READ);
            let bytes = &mut entries[..count * 8];
            pagemap.read_exact_at(bytes, addr / page * 8)?;
            for chunk in bytes.chunks_exact(8) {
                let entry = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                if written(entry) {
                    let at = m.offset + (addr - m.start);
                    match runs.last_mut() {
                        Some(r)
                            if r.addr + r.len == addr
                                && r.at + r.len == at
                                && r.len < MAX_RUN_BYTES as u64 =>
                        {
                            r.len += page
                        }
                        _ => runs.push(Run {
                            addr,
                            len: page,
                            at,
                        }),
                    }
                }
                addr += page;
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn finds_the_mappings_of_one_file() {
        let dev = libc::makedev(0xfd, 0x01);
        let maps = "\
7f0000000000-7f0000200000 rw-p 00000000 fd:01 1234   /m/memory
7f0000200000-7f0000400000 rw-p 00200000 fd:01 1234   /m/memory
7f0000400000-7f0000401000 r--p 00000000 fd:01 999    /usr/lib/x.so
7f0000500000-7f0000600000 rw-p 00000000 00:00 0 
";
        assert_eq!(
            mappings(maps, dev, 1234, "/m/memory"),
            vec![
                Mapping {
                    start: 0x7f0000000000,
                    end: 0x7f0000200000,
                    offset: 0
                },
                Mapping {
                    start: 0x7f0000200000,
                    end: 0x7f0000400000,
                    offset: 0x200000
                },
            ]
        );
        // Another device and another path: another file with the same inode number.
        assert!(mappings(maps, libc::makedev(0xfd, 0x02), 1234, "/other").is_empty());
        // The device differs but the path agrees (btrfs subvolumes): the same file.
        assert_eq!(
            mappings(maps, libc::makedev(0, 0x2a), 1234, "/m/memory").len(),
            2
        );
    }

    /// A private mapping of a file in this very process: the pages written through it (and
    /// only those) land in the destination, at their offsets.
    #[test]
    fn copies_exactly_the_pages_written_through_a_private_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("base"), dir.path().join("copy"));
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = 64;
        let base: Vec<u8> = (0..page * pages).map(|i| (i / page) as u8).collect();
        std::fs::write(&src, &base).unwrap();
        std::fs::write(&dest, &base).unwrap();
        let f = File::open(&src).unwrap();
        // SAFETY: a fresh private mapping of a file of that length, unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page * pages,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: within the mapping.
        let mem = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, page * pages) };
        // Read some pages (they stay the file's), write others (they become the process's).
        let read: u64 = mem[page * 3..page * 4].iter().map(|&b| b as u64).sum();
        assert_eq!(read, 3 * page as u64);
        for p in [1usize, 2, 10, 63] {
            mem[p * page..(p + 1) * page].fill(0xee);
        }
        let copied = copy_written_pages(std::process::id() as i32, &src, &dest).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(ptr, page * pages) };
        assert_eq!(copied, 4 * page as u64);
        let out = std::fs::read(&dest).unwrap();
        for p in 0..pages {
            let want = if [1, 2, 10, 63].contains(&p) {
                0xee
            } else {
                p as u8
            };
            assert!(
                out[p * page..(p + 1) * page].iter().all(|&b| b == want),
                "page {p}"
            );
        }
        // The file itself is untouched.
        assert_eq!(std::fs::read(&src).unwrap(), base);
    }
}
