//! Facts about the host: which accelerator works, and the TSC frequency TCG guests need.

use crate::config::AccelChoice;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// KVM only where the CPU flags show vmx or svm: a nested host may have /dev/kvm whose guests
/// die with "emulation failure".
pub fn choose_accel(choice: AccelChoice) -> Accel {
    match choice {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            if cpu_has_virt(&cpuinfo) && std::path::Path::new("/dev/kvm").exists() {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
    }
}

fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The host CPU's model name and flags, for snapshot manifests (a memory snapshot restores only
/// on a CPU with the features its guest saw).
pub fn cpu_model_and_flags() -> (String, Vec<String>) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (field("model name"), flags)
}

/// Measures the TSC against the monotonic clock. Under TCG the guest reads the host's TSC; a
/// guest told its rate (`tsc_early_khz`) skips a calibration that sometimes hangs.
pub fn measure_tsc_khz() -> u64 {
    let window = Duration::from_millis(50);
    let t0 = Instant::now();
    // SAFETY: rdtsc has no preconditions on x86_64.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    while t0.elapsed() < window {
        std::hint::spin_loop();
    }
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let elapsed = t0.elapsed();
    ((c1 - c0) as u128 * 1_000_000 / elapsed.as_nanos().max(1)) as u64
}

/// This boot of the host's kernel: what a page cache that survives a daemon's crash, and not
/// the host's, belongs to.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_a_virtualisation_flag() {
        assert!(!cpu_has_virt("flags\t\t: fpu vme sse2 hypervisor\n"));
        assert!(cpu_has_virt("flags\t\t: fpu svm sse2\n"));
        assert!(cpu_has_virt("flags\t\t: fpu vmx\n"));
        assert_eq!(choose_accel(AccelChoice::Tcg), Accel::Tcg);
    }

    #[test]
    fn tsc_rate_is_plausible() {
        let khz = measure_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
