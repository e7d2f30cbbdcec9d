//! Users of the guest, from its /etc/passwd.

pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Resolves a user name or numeric uid; a uid with no passwd entry is its own group, home `/`.
pub fn lookup(user: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 6 && (f[0] == user || f[2] == user) {
            let uid = f[2].parse().map_err(|_| format!("bad uid for {user}"))?;
            let gid = f[3].parse().map_err(|_| format!("bad gid for {user}"))?;
            return Ok(User {
                uid,
                gid,
                home: f[5].to_string(),
            });
        }
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok(User {
            uid,
            gid: uid,
            home: "/".into(),
        }),
        Err(_) => Err(format!("no such user: {user}")),
    }
}
