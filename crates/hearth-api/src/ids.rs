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
            "invalid {kind} id {}: must match ^[a-z0-9][a-z0-9._-]{{0,62}}$",
            excerpt(id)
        ))
    }
}

/// A value a client sent, quoted for an error message: whole when short, else its start and
/// its length, so an error never echoes megabytes back.
pub fn excerpt(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::{excerpt, validate_id};

    #[test]
    fn errors_quote_only_the_start_of_a_long_value() {
        assert_eq!(excerpt("m1"), "\"m1\"");
        let long = "é".repeat(1 << 20);
        let shown = excerpt(&long);
        assert!(
            shown.len() < 200 && shown.ends_with("(2097152 bytes)"),
            "{shown}"
        );
        let err = validate_id("machine", &long).unwrap_err();
        assert!(err.len() < 300, "{err}");
    }

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
