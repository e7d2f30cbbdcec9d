//! The unprivileged user VMMs run as. The daemon stays root; it makes each VMM's files (disks,
//! RAM file, console) that user's, and hands it what it cannot open itself (its sockets, its
//! tap) as file descriptors.

use crate::error::{Error, Result};
use nix::unistd::{Gid, Group, Uid, User};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct VmmUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Its supplementary groups (`kvm`, for /dev/kvm), looked up once: the VMM's process sets
    /// them between fork and exec, where nothing may be read from /etc/group.
    pub groups: Vec<Gid>,
}

impl VmmUser {
    /// The user `name`; None for root (VMMs keep the daemon's privileges). A missing user is an
    /// error that says how to make it.
    pub fn lookup(name: &str) -> Result<Option<VmmUser>> {
        let user = User::from_name(name)
            .map_err(|e| Error::internal(format!("looking up user {name}: {e}")))?
            .ok_or_else(|| {
                Error::invalid(format!(
                    "the VMM user {name} does not exist: create it (scripts/install-deps does: \
                     useradd --system --no-create-home --shell /usr/sbin/nologin {name}), or \
                     give --vmm-user root to run VMMs as root"
                ))
            })?;
        if user.uid.is_root() {
            return Ok(None);
        }
        let cname = std::ffi::CString::new(name)
            .map_err(|_| Error::invalid(format!("user name {name:?} holds a NUL")))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| Error::internal(format!("the groups of {name}: {e}")))?;
        Ok(Some(VmmUser {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
        }))
    }

    /// Makes `path` this user's, readable and writable by it alone.
    pub fn own(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid.as_raw()), Some(self.gid.as_raw()))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| Error::io("giving the VMM user", path, e))
    }

    /// Lets this user read `path` (root's still, and its group's: a kernel or an initrd that
    /// other machines boot too, which no VMM may change).
    pub fn let_read(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, None, Some(self.gid.as_raw()))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)))
            .map_err(|e| Error::io("letting the VMM user read", path, e))
    }

    /// Whether this user may do `access` (`r`, `w`, `x` bits as 4, 2, 1) on `path`, by its
    /// mode, owner and group.
    pub fn may(&self, path: &Path, access: u32) -> bool {
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid.as_raw() {
            mode >> 6
        } else if self.groups.iter().any(|g| g.as_raw() == meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        bits & access == access
    }

    /// A clear error unless this user can reach files under `dir`: QEMU opens its disks, RAM
    /// file and kernel by path, as this user.
    pub fn check_reaches(&self, dir: &Path) -> Result<()> {
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| Error::internal(format!("{}: {e}", dir.display())))?;
        for d in dir.ancestors() {
            if !self.may(d, 1) {
                return Err(Error::invalid(format!(
                    "VMMs run as {}, which cannot enter {} (they open their disks and RAM \
                     files below it): give it search permission (chmod o+x), use another data \
                     root, or give --vmm-user root",
                    self.name,
                    d.display()
                )));
            }
        }
        Ok(())
    }

    /// A clear error unless this user can use /dev/kvm (usually through the `kvm` group).
    pub fn check_kvm(&self) -> Result<()> {
        let kvm = Path::new("/dev/kvm");
        if self.may(kvm, 6) {
            return Ok(());
        }
        let group = std::fs::metadata(kvm)
            .ok()
            .and_then(|m| Group::from_gid(Gid::from_raw(m.gid())).ok().flatten())
            .map_or_else(|| "its group".to_string(), |g| g.name);
        Err(Error::invalid(format!(
            "VMMs run as {}, which cannot open /dev/kvm: add it to {group} (usermod -aG {group} \
             {}), or use --accel tcg",
            self.name, self.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_no_vmm_user_and_a_missing_user_says_how_to_make_it() {
        assert!(VmmUser::lookup("root").unwrap().is_none());
        let e = VmmUser::lookup("hearth-no-such-user").unwrap_err();
        assert!(e.message.contains("useradd --system"), "{}", e.message);
        assert!(e.message.contains("--vmm-user root"), "{}", e.message);
    }

    #[test]
    fn permissions_by_owner_group_and_others() {
        let nobody = VmmUser {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
            groups: vec![Gid::from_raw(65534)],
        };
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "").unwrap();
        let mode =
            |m: u32| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert!(!nobody.may(&f, 4));
        mode(0o604);
        assert!(nobody.may(&f, 4) && !nobody.may(&f, 6));
        nobody.let_read(&f).unwrap();
        assert!(nobody.may(&f, 4) && !nobody.may(&f, 2));
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 0);
        nobody.own(&f).unwrap();
        assert!(nobody.may(&f, 6));
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = nobody.check_reaches(dir.path()).unwrap_err();
        assert!(e.message.contains("cannot enter"), "{}", e.message);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        nobody.check_reaches(dir.path()).unwrap();
    }
}
