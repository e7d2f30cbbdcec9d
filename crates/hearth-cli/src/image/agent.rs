//! The agent is PID 1 of a guest whose root filesystem has no dynamic loader: an agent linked
//! dynamically cannot start, and the kernel panics at boot with no hint why. Refused here.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// How `scripts/build` makes the static agent.
const BUILD_STATIC: &str =
    "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" \
     cargo build --release -p hearth-agent --target x86_64-unknown-linux-gnu";
const STATIC_AGENT: &str = "target/x86_64-unknown-linux-gnu/release/hearth-agent";

/// Fails unless `path` is an ELF executable without an interpreter (`PT_INTERP`): linked
/// statically, static-pie included.
pub fn ensure_static(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("agent binary {}", path.display()))?;
    let elf = goblin::elf::Elf::parse(&bytes)
        .with_context(|| format!("agent binary {} is not an ELF executable", path.display()))?;
    if let Some(interp) = elf.interpreter {
        bail!(
            "agent binary {} is linked dynamically (interpreter {interp}); it is PID 1 of a guest \
             with no dynamic loader, so every machine would panic at boot. Build the static agent \
             and pass it:\n  {BUILD_STATIC}\n  hearth image build --agent {STATIC_AGENT}\n\
             (scripts/build does both)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_agent_is_refused_with_the_way_to_build_a_static_one() {
        let err = ensure_static(Path::new("/bin/true"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("linked dynamically"), "{err}");
        assert!(
            err.contains("+crt-static") && err.contains("--agent"),
            "{err}"
        );
    }

    #[test]
    fn a_static_binary_is_accepted() {
        // busybox-static, which the image needs anyway.
        ensure_static(Path::new("/bin/busybox")).unwrap();
    }

    #[test]
    fn a_file_that_is_not_elf_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "#!/bin/sh\n").unwrap();
        let err = ensure_static(f.path()).unwrap_err().to_string();
        assert!(err.contains("not an ELF"), "{err}");
    }
}
