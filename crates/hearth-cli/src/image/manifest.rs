//! `manifest.json` beside the image files: what was built, from what, with sizes and sha256.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

pub const MANIFEST: &str = "manifest.json";
pub const FILES: [&str; 3] = ["vmlinux", "initrd.img", "rootfs.ext4"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub recipe: u32,
    pub kernel_package_version: String,
    pub busybox_sha256: String,
    pub agent_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFile {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kernel_release: String,
    pub inputs: Inputs,
    pub files: Vec<ImageFile>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl Manifest {
    pub fn create(dir: &Path, kernel_release: &str, inputs: Inputs) -> Result<Manifest> {
        let files = FILES
            .iter()
            .map(|name| {
                let path = dir.join(name);
                Ok(ImageFile {
                    name: name.to_string(),
                    size_bytes: std::fs::metadata(&path)?.len(),
                    sha256: sha256_file(&path)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest = Manifest {
            name: "default".into(),
            kernel_release: kernel_release.to_string(),
            inputs,
            files,
            created_at: chrono::Utc::now(),
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
        Ok(manifest)
    }

    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Every file is there with the size the manifest gives.
    pub fn files_present(&self, dir: &Path) -> bool {
        self.files
            .iter()
            .all(|f| std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size_bytes))
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
