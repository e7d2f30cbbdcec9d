/// IDs (machine, snapshot, volume, published port) match `^[a-z0-9][a-z0-9._-]{0,62}$` and are
/// never `.` or `..`; they become file names, so the rule is also what keeps paths safe.
pub fn validate_id(kind: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id != "."
        && id != ".."
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} id {id:?}: must match ^[a-z0-9][a-z0-9._-]{{0,62}}$"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_id;

    #[test]
    fn accepts_the_documented_shape() {
        for id in ["a", "m1", "0", "web-1.prod_2", &"x".repeat(63)] {
            assert!(validate_id("machine", id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for id in [
            "",
            ".",
            "..",
            "-a",
            ".a",
            "_a",
            "A",
            "a/b",
            "a b",
            "ä",
            &"x".repeat(64),
            "a\n",
        ] {
            assert!(validate_id("machine", id).is_err(), "{id:?}");
        }
    }
}
