//! Image manifests: `<images-dir>/<index>.json` next to `<index>.qcow2`, written by `image/build`
//! and read by the VMM, the QEMU launcher and the runner.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What an image manifest records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// The image index, `t0`, `i0`, … (what job names end with).
    pub index: String,
    /// What the image is for, in a sentence.
    pub description: String,
    /// The root disk, relative to the manifest's directory.
    pub disk: String,
    /// Format of the root disk (`qcow2`).
    pub disk_format: String,
    /// sha256 of the disk file.
    pub disk_sha256: String,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// The kernel it boots (ELF vmlinux with a PVH note), relative to the manifest's directory.
    pub kernel: String,
    /// sha256 of the kernel file.
    pub kernel_sha256: String,
    /// Default guest memory in MiB.
    pub memory_mib: u32,
    /// Default number of vCPUs.
    pub vcpus: u32,
    /// The guest init, as installed at `/sbin/init`, and its sha256.
    pub init_sha256: String,
    /// What is installed (Debian packages with versions, or a summary).
    pub installed: Vec<String>,
    /// The hash of the build inputs this image was made from.
    pub build_key: String,
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "no image {index:?} in {dir} (no {dir}/{index}.json; build it with `image/build {index}`)"
    )]
    Missing { index: String, dir: PathBuf },
    #[error("image index {0:?} is not valid (expected a letter and a number, like i0 or t0)")]
    BadIndex(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid image manifest")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub use crate::manifest_index::valid_index;

/// A manifest together with the directory it was read from.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: ImageManifest,
    pub dir: PathBuf,
}

impl Image {
    /// Loads image `index` from `dir`.
    pub fn load(dir: &Path, index: &str) -> Result<Self, ManifestError> {
        if !valid_index(index) {
            return Err(ManifestError::BadIndex(index.to_string()));
        }
        let path = dir.join(format!("{index}.json"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing {
                    index: index.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        let manifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse { path, source })?;
        Ok(Image {
            manifest,
            dir: dir.to_path_buf(),
        })
    }

    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk)
    }

    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel)
    }
}

/// The images directory: `$CONSTRUIR_IMAGES`, else `<cache>/images`, where the cache is
/// `$CONSTRUIR_CACHE`, else `$XDG_CACHE_HOME/construir`, else `~/.cache/construir`.
pub fn default_images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONSTRUIR_IMAGES") {
        return PathBuf::from(dir);
    }
    cache_dir().join("images")
}

/// construir's cache directory (see [`default_images_dir`]).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONSTRUIR_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("construir");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/construir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_validation() {
        for ok in ["i0", "t0", "i12"] {
            assert!(valid_index(ok), "{ok}");
        }
        for bad in ["", "i", "0", "I0", "i0a", "../i0", "i-1", "i123456789"] {
            assert!(!valid_index(bad), "{bad}");
        }
    }

    #[test]
    fn load_reports_missing_and_bad_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let err = Image::load(dir.path(), "i0").unwrap_err();
        assert!(err.to_string().contains("image/build i0"), "{err}");
        std::fs::write(dir.path().join("t0.json"), "{").unwrap();
        assert!(matches!(
            Image::load(dir.path(), "t0"),
            Err(ManifestError::Parse { .. })
        ));
        assert!(matches!(
            Image::load(dir.path(), "../x"),
            Err(ManifestError::BadIndex(_))
        ));
        let m = ImageManifest {
            index: "t1".into(),
            description: "test".into(),
            disk: "t1.qcow2".into(),
            disk_format: "qcow2".into(),
            disk_sha256: "00".into(),
            virtual_size: 1 << 20,
            kernel: "kernels/vmlinux-x".into(),
            kernel_sha256: "11".into(),
            memory_mib: 256,
            vcpus: 1,
            init_sha256: "22".into(),
            installed: vec!["busybox".into()],
            build_key: "k".into(),
        };
        std::fs::write(
            dir.path().join("t1.json"),
            serde_json::to_string(&m).unwrap(),
        )
        .unwrap();
        let img = Image::load(dir.path(), "t1").unwrap();
        assert_eq!(img.manifest, m);
        assert_eq!(img.disk_path(), dir.path().join("t1.qcow2"));
    }
}
