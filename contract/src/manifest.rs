//! Image manifests: `<images-dir>/<index>.json` next to `<index>.qcow2`, written by `image/build`
//! and read by the VMM, the QEMU launcher and the runner.
//!
//! A manifest is checked when it is loaded ([`ImageManifest::check`]), since its fields become
//! paths and sizes: `disk` must be a plain file name in the images directory and `kernel` one
//! too, or `kernels/` and a plain name (what `image/build` writes); no `..`, no absolute path, no
//! other separator. The sha256 fields are 64 lower-case hex digits, and the sizes are capped.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// The tools a job finds, by name, each with the first line its version command printed
    /// (`construir-pack --list-tools`). Absent from manifests made before 2026-12.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, String>,
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
    #[error("{path} is refused: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Largest virtual disk an image may declare: a qcow2 header can claim exabytes, and converting
/// it reads every byte of the virtual disk.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 40;

/// Largest kernel file an image may have (a vmlinux is tens of MiB): what a server publishes and
/// a runner downloads at most.
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// Largest qcow2 file an image declaring `virtual_size` may have: the virtual size, plus an
/// eighth and 64 MiB for qcow2's own tables (a fully allocated qcow2 is a little larger than its
/// virtual size; [`MAX_VIRTUAL_SIZE`] caps that). What a server publishes and a runner downloads
/// at most.
pub fn max_qcow2_bytes(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 8)
        .saturating_add(64 << 20)
}

/// Largest manifest file read (a real one is a few KiB, mostly the package list).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Guest memory an image may ask for, in MiB (what `--memory` accepts).
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=65536;

/// vCPUs an image may ask for (what `--vcpus` accepts).
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=32;

/// The directory manifests may name kernels in, inside the images directory.
pub const KERNELS_DIR: &str = "kernels";

/// Whether `text` is a sha256 as construir writes them: 64 lower-case hex digits.
pub fn valid_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `name` is a plain file name: 1 to 255 bytes of letters, digits, `.`, `_`, `+`, `-`,
/// not starting with `.` (so not `.` or `..`), hence no separator and nothing absolute.
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

impl ImageManifest {
    /// Checks what the host uses as paths and sizes; the reason, if refused.
    pub fn check(&self) -> Result<(), String> {
        if !valid_index(&self.index) {
            return Err(format!("index {:?} is not an image index", self.index));
        }
        if !plain_file_name(&self.disk) {
            return Err(format!(
                "disk {:?} must be a plain file name in the images directory (no `/`, no `..`)",
                self.disk
            ));
        }
        let kernel_name = self
            .kernel
            .strip_prefix(KERNELS_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(&self.kernel);
        if !plain_file_name(kernel_name) {
            return Err(format!(
                "kernel {:?} must be a plain file name in the images directory or in its \
                 {KERNELS_DIR}/ (no other `/`, no `..`)",
                self.kernel
            ));
        }
        if self.disk_format != "qcow2" {
            return Err(format!(
                "disk_format {:?}: only qcow2 images are supported",
                self.disk_format
            ));
        }
        for (field, value) in [
            ("disk_sha256", &self.disk_sha256),
            ("kernel_sha256", &self.kernel_sha256),
            ("init_sha256", &self.init_sha256),
        ] {
            if !valid_sha256(value) {
                return Err(format!(
                    "{field} {value:?} is not a sha256 (64 lower-case hex digits)"
                ));
            }
        }
        if self.virtual_size == 0 || self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!(
                "virtual_size {} must be between 1 and {MAX_VIRTUAL_SIZE} bytes",
                self.virtual_size
            ));
        }
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return Err(format!(
                "memory_mib {} must be between {} and {}",
                self.memory_mib,
                MEMORY_MIB_RANGE.start(),
                MEMORY_MIB_RANGE.end()
            ));
        }
        if !VCPUS_RANGE.contains(&self.vcpus) {
            return Err(format!(
                "vcpus {} must be between {} and {}",
                self.vcpus,
                VCPUS_RANGE.start(),
                VCPUS_RANGE.end()
            ));
        }
        Ok(())
    }
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
        let text = match read_capped(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing {
                    index: index.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        let manifest: ImageManifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        let refused = |reason| ManifestError::Invalid {
            path: path.clone(),
            reason,
        };
        manifest.check().map_err(refused)?;
        if manifest.index != index {
            return Err(refused(format!(
                "it says it is image {:?}, but is named {index}.json",
                manifest.index
            )));
        }
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

/// Reads a manifest, at most [`MAX_MANIFEST_BYTES`].
fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_MANIFEST_BYTES} bytes"
        )));
    }
    Ok(text)
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

    /// A manifest as image/build writes one.
    pub(crate) fn sample(index: &str) -> ImageManifest {
        ImageManifest {
            index: index.into(),
            description: "test".into(),
            disk: format!("{index}.qcow2"),
            disk_format: "qcow2".into(),
            disk_sha256: "0".repeat(64),
            virtual_size: 1 << 20,
            kernel: "kernels/vmlinux-6e8b24b4909123e6".into(),
            kernel_sha256: "1".repeat(64),
            memory_mib: 256,
            vcpus: 1,
            init_sha256: "2".repeat(64),
            installed: vec!["busybox".into()],
            build_key: "k".into(),
            tools: Default::default(),
        }
    }

    #[test]
    fn tools_are_optional_and_an_older_manifest_reads_and_writes_the_same() {
        let older = serde_json::to_string(&sample("i0")).unwrap();
        assert!(!older.contains("tools"), "{older}");
        let read: ImageManifest = serde_json::from_str(&older).unwrap();
        assert_eq!(serde_json::to_string(&read).unwrap(), older);
        let mut with = sample("i1");
        with.tools
            .insert("rustc".into(), "rustc 1.85.1 (4eb161250 2025-03-15)".into());
        let text = serde_json::to_string(&with).unwrap();
        let back: ImageManifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.tools["rustc"], "rustc 1.85.1 (4eb161250 2025-03-15)");
    }

    #[test]
    fn paths_hashes_and_sizes_are_checked() {
        assert_eq!(sample("t0").check(), Ok(()));
        assert_eq!(
            ImageManifest {
                kernel: "vmlinux".into(),
                ..sample("t0")
            }
            .check(),
            Ok(())
        );
        let refused = |m: ImageManifest, what: &str| {
            let reason = m.check().unwrap_err();
            assert!(reason.contains(what), "{what}: {reason}");
        };
        for disk in [
            "",
            "/etc/shadow",
            "../t0.qcow2",
            "..",
            ".",
            "sub/t0.qcow2",
            "kernels/t0.qcow2",
            ".hidden",
            "a\\b",
            "t0.qcow2\0",
            "t0 .qcow2",
            &"x".repeat(256),
        ] {
            refused(
                ImageManifest {
                    disk: disk.into(),
                    ..sample("t0")
                },
                "disk",
            );
        }
        for kernel in [
            "",
            "/boot/vmlinuz",
            "../vmlinux",
            "kernels/../../vmlinux",
            "kernels/",
            "kernels//vmlinux",
            "kernels/sub/vmlinux",
            "other/vmlinux",
            "kernels/..",
        ] {
            refused(
                ImageManifest {
                    kernel: kernel.into(),
                    ..sample("t0")
                },
                "kernel",
            );
        }
        for sha in ["", "00", &"A".repeat(64), &"g".repeat(64), &"0".repeat(65)] {
            refused(
                ImageManifest {
                    disk_sha256: sha.into(),
                    ..sample("t0")
                },
                "disk_sha256",
            );
            refused(
                ImageManifest {
                    kernel_sha256: sha.into(),
                    ..sample("t0")
                },
                "kernel_sha256",
            );
            refused(
                ImageManifest {
                    init_sha256: sha.into(),
                    ..sample("t0")
                },
                "init_sha256",
            );
        }
        for size in [0, MAX_VIRTUAL_SIZE + 1, u64::MAX] {
            refused(
                ImageManifest {
                    virtual_size: size,
                    ..sample("t0")
                },
                "virtual_size",
            );
        }
        for memory_mib in [0, 63, 65537, u32::MAX] {
            refused(
                ImageManifest {
                    memory_mib,
                    ..sample("t0")
                },
                "memory_mib",
            );
        }
        for vcpus in [0, 33, u32::MAX] {
            refused(
                ImageManifest {
                    vcpus,
                    ..sample("t0")
                },
                "vcpus",
            );
        }
        refused(
            ImageManifest {
                disk_format: "raw".into(),
                ..sample("t0")
            },
            "disk_format",
        );
        refused(
            ImageManifest {
                index: "../t0".into(),
                ..sample("t0")
            },
            "index",
        );
    }

    #[test]
    fn load_refuses_unsafe_mismatched_and_oversized_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, m: &ImageManifest| {
            std::fs::write(dir.path().join(name), serde_json::to_string(m).unwrap()).unwrap()
        };
        write(
            "t0.json",
            &ImageManifest {
                disk: "../../etc/shadow".into(),
                ..sample("t0")
            },
        );
        let err = Image::load(dir.path(), "t0").unwrap_err();
        assert!(matches!(err, ManifestError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("plain file name"), "{err}");
        write("t1.json", &sample("t2"));
        let err = Image::load(dir.path(), "t1").unwrap_err();
        assert!(err.to_string().contains("named t1.json"), "{err}");
        // Unknown fields (newer image builds) are fine.
        let mut v = serde_json::to_value(sample("t3")).unwrap();
        v["kernel_source"] = "linux-source-6.1".into();
        std::fs::write(dir.path().join("t3.json"), v.to_string()).unwrap();
        assert_eq!(
            Image::load(dir.path(), "t3").unwrap().manifest,
            sample("t3")
        );
        // A huge file is not read whole.
        let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(2 << 20));
        std::fs::write(dir.path().join("t4.json"), big).unwrap();
        assert!(matches!(
            Image::load(dir.path(), "t4"),
            Err(ManifestError::Read { .. })
        ));
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
        let m = sample("t1");
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
