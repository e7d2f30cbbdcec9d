//! Running a file operation with a user's permissions: the calling thread's filesystem uid and
//! gid and its supplementary groups become the user's, so the kernel checks every access as it
//! would for that user (a filesystem uid other than 0 also drops the thread's CAP_DAC_OVERRIDE,
//! CAP_FOWNER and the like).
//!
//! Only raw syscalls are used: they change the calling thread alone, where glibc's `setgroups`
//! would change every thread of the process. Each request runs on a thread of its own, so the
//! switch never leaks into another request; the guard switches back when it is dropped.

use crate::failure::Failure;
use crate::users;
use std::io;
use std::marker::PhantomData;

/// The thread runs as a user until this is dropped.
pub struct AsUser {
    /// What to go back to; `None` when nothing was switched (root).
    saved: Option<Saved>,
    uid: u32,
    /// Credentials belong to a thread: the guard must be dropped on the thread that made it.
    _thread: PhantomData<*const ()>,
}

struct Saved {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<libc::gid_t>,
}

/// Switches the calling thread to `user` (a name or a uid); root when `None`.
pub fn as_user(user: Option<&str>) -> Result<AsUser, Failure> {
    let root = AsUser {
        saved: None,
        uid: 0,
        _thread: PhantomData,
    };
    let Some(name) = user else { return Ok(root) };
    let user = users::lookup(name).map_err(Failure::invalid)?;
    if user.uid == 0 && user.gid == 0 {
        return Ok(root);
    }
    let groups = supplementary_groups(name, user.uid, user.gid);
    let fail = |e: io::Error| {
        Failure::new(
            hearth_proto::ErrorKind::Failed,
            format!("run as {name}: {e}"),
        )
    };
    let saved = Saved {
        fsuid: current_fsuid(),
        fsgid: set_fsgid_raw(u32::MAX),
        groups: get_groups().map_err(fail)?,
    };
    // From here on, dropping the guard undoes whatever part of the switch happened.
    let guard = AsUser {
        saved: Some(saved),
        uid: user.uid,
        _thread: PhantomData,
    };
    set_groups(&groups).map_err(fail)?;
    set_fsgid(user.gid).map_err(fail)?;
    set_fsuid(user.uid).map_err(fail)?;
    Ok(guard)
}

impl AsUser {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let Some(saved) = self.saved.take() else {
            return;
        };
        // The filesystem uid first: going back to 0 gives back the capabilities dropped with it.
        // If a step fails, the thread ends with its request anyway, and its credentials with it.
        for result in [
            set_fsuid(saved.fsuid),
            set_fsgid(saved.fsgid),
            set_groups(&saved.groups),
        ] {
            if let Err(e) = result {
                eprintln!("hearth-agent: restoring file credentials: {e}");
            }
        }
    }
}

/// The calling thread's filesystem uid.
pub fn current_fsuid() -> u32 {
    // An invalid id (-1) changes nothing; the call answers with the current one.
    set_fsuid_raw(u32::MAX)
}

fn set_fsuid_raw(uid: u32) -> u32 {
    // SAFETY: setfsuid takes one integer and touches no memory.
    unsafe { libc::syscall(libc::SYS_setfsuid, libc::c_long::from(uid)) as u32 }
}

fn set_fsgid_raw(gid: u32) -> u32 {
    // SAFETY: setfsgid takes one integer and touches no memory.
    unsafe { libc::syscall(libc::SYS_setfsgid, libc::c_long::from(gid)) as u32 }
}

// setfsuid and setfsgid report no errors: they answer with the previous id whatever happened,
// so the result is checked by asking again.
fn set_fsuid(uid: u32) -> io::Result<()> {
    set_fsuid_raw(uid);
    match current_fsuid() {
        now if now == uid => Ok(()),
        now => Err(io::Error::other(format!("setfsuid({uid}) left {now}"))),
    }
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    set_fsgid_raw(gid);
    match set_fsgid_raw(u32::MAX) {
        now if now == gid => Ok(()),
        now => Err(io::Error::other(format!("setfsgid({gid}) left {now}"))),
    }
}

fn get_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a size of 0 asks for the count and writes nothing.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getgroups,
            0 as libc::c_long,
            std::ptr::null_mut::<libc::gid_t>(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: the buffer holds `n` gids.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, n, groups.as_mut_ptr()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(n as usize);
    Ok(groups)
}

fn set_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the kernel reads `len` gids from the slice.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Most supplementary groups the kernel accepts (NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;

/// The user's primary group and the groups of /etc/group that list it as a member.
fn supplementary_groups(user: &str, uid: u32, gid: u32) -> Vec<libc::gid_t> {
    let mut groups = vec![gid];
    let Some(name) = user_name(user, uid) else {
        return groups;
    };
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for line in group.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
            continue;
        }
        if let Ok(g) = f[2].parse() {
            if !groups.contains(&g) && groups.len() < MAX_GROUPS {
                groups.push(g);
            }
        }
    }
    groups
}

/// The login name of a user given by name or uid, from /etc/passwd.
fn user_name(user: &str, uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let uid = uid.to_string();
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && (f[0] == user || f[2] == uid)).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::{NOBODY, NOBODY_ID};
    use std::sync::mpsc::channel;

    #[test]
    fn the_switch_is_the_threads_own_and_is_undone() {
        // A thread started before the switch; one started during it would inherit it.
        let (ask, asked) = channel::<()>();
        let (tell, told) = channel();
        let other = std::thread::spawn(move || {
            while asked.recv().is_ok() {
                tell.send((current_fsuid(), get_groups().unwrap())).unwrap();
            }
        });
        let before = get_groups().unwrap();

        let guard = as_user(Some(NOBODY)).unwrap();
        assert!(!guard.is_root());
        assert_eq!(current_fsuid(), NOBODY_ID);
        assert_eq!(set_fsgid_raw(u32::MAX), NOBODY_ID);
        assert_eq!(get_groups().unwrap(), [NOBODY_ID]);
        ask.send(()).unwrap();
        assert_eq!(told.recv().unwrap(), (0, before.clone()));

        drop(guard);
        assert_eq!(current_fsuid(), 0);
        assert_eq!(set_fsgid_raw(u32::MAX), 0);
        assert_eq!(get_groups().unwrap(), before);
        drop(ask);
        other.join().unwrap();

        assert!(as_user(None).unwrap().is_root());
        assert!(as_user(Some("root")).unwrap().is_root());
        assert_eq!(current_fsuid(), 0);
    }
}
