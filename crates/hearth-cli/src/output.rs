//! Output for people (aligned tables) and for scripts (`--json`).

use crate::image::Manifest;
use crate::size::human;
use hearth_api::Machine;
use serde::Serialize;

pub fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn machines(list: &[Machine]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.phase.as_str().to_string(),
                format!("{} MiB", m.memory_mib),
                m.vcpus.to_string(),
                human(m.storage_bytes),
                m.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "PHASE", "MEMORY", "VCPUS", "DISK", "CREATED"],
        &rows,
    );
}

pub fn machine(m: &Machine) {
    let mut rows = vec![
        ("name", m.id.clone()),
        ("phase", m.phase.as_str().to_string()),
        ("memory", format!("{} MiB", m.memory_mib)),
        ("vcpus", m.vcpus.to_string()),
        ("disk", human(m.storage_bytes)),
        ("vmm", format!("{:?}", m.vmm).to_lowercase()),
        ("kernel", m.artifact.kernel_image_url.clone()),
        ("rootfs", m.artifact.rootfs_url.clone()),
        ("created", m.created_at.to_rfc3339()),
    ];
    if let Some(initrd) = &m.artifact.initrd_url {
        rows.push(("initrd", initrd.clone()));
    }
    if let Some(t) = m.started_at {
        rows.push(("started", t.to_rfc3339()));
    }
    if let Some(from) = &m.restored_from {
        rows.push(("restored from", from.clone()));
    }
    match &m.network {
        Some(n) => {
            rows.push(("guest ip", n.guest_ip.clone()));
            rows.push(("host ip", n.host_ip.clone()));
            rows.push(("namespace", n.namespace.clone()));
            let mut egress = format!("{:?}", n.egress).to_lowercase();
            if !n.allow_cidrs.is_empty() {
                egress.push_str(&format!(", allow {}", n.allow_cidrs.join(" ")));
            }
            if !n.deny_cidrs.is_empty() {
                egress.push_str(&format!(", deny {}", n.deny_cidrs.join(" ")));
            }
            rows.push(("egress", egress));
        }
        None => rows.push(("network", "none".into())),
    }
    for p in &m.ports {
        let host = p.host_port.map(|h| h.to_string()).unwrap_or_default();
        rows.push(("port", format!("{host} → {} ({})", p.port, p.name)));
    }
    if let Some(err) = &m.error {
        rows.push(("error", err.clone()));
    }
    for (k, v) in rows {
        println!("{k:<14}{v}");
    }
}

pub fn print_manifest(m: &Manifest) {
    println!("image {} (kernel {})", m.name, m.kernel_release);
    let rows: Vec<Vec<String>> = m
        .files
        .iter()
        .map(|f| vec![f.name.clone(), human(f.size_bytes), f.sha256.clone()])
        .collect();
    table(&["FILE", "SIZE", "SHA256"], &rows);
}
