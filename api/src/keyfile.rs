//! An ed25519 key kept in a file: a server's (its receipts) or a runner's (its statements). The
//! file holds the 32-byte seed as 64 hex digits and a newline, readable by its owner only.
//!
//! A key is made once and kept: what it signed names it, and whoever saved its public half
//! checks later signatures against it. So the file is never replaced: it is created through a
//! temporary file and a rename that refuses to overwrite, and two processes starting at once on
//! one directory end with one key, not one each. A key file that is a link, not a regular file,
//! or open to other users is refused, not used.

use crate::trust::{KeyPair, TrustError};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The key file's mode: its owner's only.
const KEY_MODE: u32 = 0o600;
/// The most bytes read from a key file (a seed is 64 hex digits and a newline).
const MAX_KEY_FILE: u64 = 4096;

/// Why a key could not be loaded or made. `whose` names the key (`server's`, `runner's`).
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("the {whose} key file {}: {doing}: {source}", path.display())]
    Io {
        whose: &'static str,
        path: PathBuf,
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the {whose} key file {} is a symbolic link: it must be a plain file (a link lets \
         whoever can change it choose the key)",
        path.display()
    )]
    Symlink { whose: &'static str, path: PathBuf },
    #[error("the {whose} key file {} is not a regular file", path.display())]
    NotAFile { whose: &'static str, path: PathBuf },
    #[error(
        "the {whose} key file {} is open to other users (mode {mode:04o}): it holds a secret \
         key; chmod 600 {}",
        path.display(),
        path.display()
    )]
    TooOpen {
        whose: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "the {whose} key file {} changed while it was read (replaced by another file)",
        path.display()
    )]
    Replaced { whose: &'static str, path: PathBuf },
    #[error(
        "the {whose} key file {} does not hold a key (64 lower-case hex digits): {source}",
        path.display()
    )]
    NotAKey {
        whose: &'static str,
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("a new {whose} key could not be made: {source}")]
    Generate {
        whose: &'static str,
        #[source]
        source: TrustError,
    },
}

/// The key in `path`, made there first if there is no file; and whether it was made now.
pub fn load_or_create(path: &Path, whose: &'static str) -> Result<(KeyPair, bool), KeyFileError> {
    match load(path, whose)? {
        Some(key) => Ok((key, false)),
        None => create(path, whose),
    }
}

fn io_error(
    whose: &'static str,
    path: &Path,
    doing: &'static str,
) -> impl FnOnce(std::io::Error) -> KeyFileError {
    let path = path.to_path_buf();
    move |source| KeyFileError::Io {
        whose,
        path,
        doing,
        source,
    }
}

/// The key in `path`, or `None` when there is no such file.
pub fn load(path: &Path, whose: &'static str) -> Result<Option<KeyPair>, KeyFileError> {
    let before = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(whose, path, "look at it")(e)),
    };
    let refuse = |m: &std::fs::Metadata| -> Result<(), KeyFileError> {
        let path = path.to_path_buf();
        if m.file_type().is_symlink() {
            return Err(KeyFileError::Symlink { whose, path });
        }
        if !m.is_file() {
            return Err(KeyFileError::NotAFile { whose, path });
        }
        let mode = m.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::TooOpen { whose, path, mode });
        }
        Ok(())
    };
    refuse(&before)?;
    let mut file = std::fs::File::open(path).map_err(io_error(whose, path, "open it"))?;
    // Checked again on what was opened: a link or another file put there between the look and
    // the open is not read (std has no O_NOFOLLOW; the same inode is as good).
    let opened = file
        .metadata()
        .map_err(io_error(whose, path, "look at it"))?;
    if (opened.dev(), opened.ino()) != (before.dev(), before.ino()) {
        return Err(KeyFileError::Replaced {
            whose,
            path: path.to_path_buf(),
        });
    }
    refuse(&opened)?;
    let mut text = String::new();
    (&mut file)
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(io_error(whose, path, "read it"))?;
    let key = KeyPair::from_seed_hex(&text).map_err(|source| KeyFileError::NotAKey {
        whose,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(key))
}

/// A new key written to `path`, unless another process wrote one there first (then that one).
fn create(path: &Path, whose: &'static str) -> Result<(KeyPair, bool), KeyFileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let key = KeyPair::generate().map_err(|source| KeyFileError::Generate { whose, source })?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".key.")
        .permissions(std::fs::Permissions::from_mode(KEY_MODE))
        .tempfile_in(dir)
        .map_err(io_error(whose, path, "create a temporary file beside it"))?;
    // Whatever the umask did, the file is its owner's before the secret is in it.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(KEY_MODE))
        .map_err(io_error(whose, path, "set the temporary file's mode"))?;
    writeln!(tmp, "{}", key.seed_hex()).map_err(io_error(whose, path, "write the key"))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_error(whose, path, "sync the key"))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process made the key first: that one is the key.
            return match load(path, whose)? {
                Some(key) => Ok((key, false)),
                None => Err(io_error(whose, path, "read the key another process made")(
                    std::io::ErrorKind::NotFound.into(),
                )),
            };
        }
        Err(e) => {
            return Err(io_error(whose, path, "rename the new key into place")(
                e.error,
            ));
        }
    }
    // The rename is durable only once the directory is synced: a crash must not lose a key
    // whose signatures may already be out.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(whose, path, "sync its directory"))?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_key_is_made_private_once_and_loaded_the_same_after() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("key");
        let (made, new) = load_or_create(&path, "test").unwrap();
        assert!(new);
        assert_eq!(mode_of(&path), 0o600);
        let (loaded, new) = load_or_create(&path, "test").unwrap();
        assert!(!new);
        assert_eq!(loaded.public_hex(), made.public_hex());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn open_linked_or_garbage_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("key");
        load_or_create(&path, "test").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&path, "test").unwrap_err();
        assert!(
            matches!(e, KeyFileError::TooOpen { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            load(&link, "test"),
            Err(KeyFileError::Symlink { .. })
        ));
        let junk = d.path().join("junk");
        std::fs::write(&junk, "not a key\n").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load(&junk, "test"),
            Err(KeyFileError::NotAKey { .. })
        ));
    }
}
