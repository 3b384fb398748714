//! `construir-server backup DEST` and `restore SRC`, for the embedded default (SQLite and the
//! blob directory; PostgreSQL + S3 are backed up with their own tools, docs/operations.md).
//!
//! A backup is a directory: `construir.db` (SQLite's `VACUUM INTO`, a consistent copy made while
//! the server runs), `blobs/` (every blob, content-addressed like the store), `server-key` (the
//! farm's signing key: receipts made before and after a restore open with one key), the config
//! file when one is given, and `backup.json`, which lists the files with their sha256. It is
//! written under `DEST.partial-PID` and renamed to DEST once whole: a DEST that exists is a whole
//! backup.
//!
//! Blobs are written before the rows that name them, so the order is: the blobs, the database,
//! then the blobs again (those published meanwhile). A blob the database copy names and the
//! copies lack (retention removed it between the two looks) is reported by name. A restore checks
//! every file against its digest before anything is put in place, and puts the database last: a
//! data directory with a database is a whole one.

use crate::db::{Db, Engine};
use crate::service::KEY_FILE;
use sha2::{Digest, Sha256};
use sqlx::Row;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What `backup.json` says; `format` changes when the layout does.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    pub created_ms: i64,
    pub server_version: String,
    /// The database, the key and the config file: name → sha256.
    pub files: BTreeMap<String, String>,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Blobs the database names that retention removed while the backup ran (restored as
    /// missing, knowingly).
    #[serde(default)]
    pub missing: Vec<String>,
}

pub const FORMAT: u32 = 1;
const DB_FILE: &str = "construir.db";
const CONFIG_FILE: &str = "config.toml";
const MANIFEST: &str = "backup.json";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "backup covers the embedded default (SQLite and the data directory's blobs); back up \
         PostgreSQL with pg_dump and the S3 bucket with its own tools (docs/operations.md)"
    )]
    NotEmbedded,
    #[error("{0} exists already: a backup goes to a new directory")]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What a backup or a restore did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Blobs the database names that are in no copy (removed by retention while the backup ran).
    pub missing: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Backs up the server whose data directory is `data` and database `db` (it may be serving)
/// into `dest`, a directory that must not exist; `config`, the config file, is copied too.
pub async fn backup(
    db: &Db,
    blobs: &crate::blobs::Blobs,
    data: &Path,
    config: Option<&Path>,
    dest: &Path,
) -> Result<Done, BackupError> {
    // Both halves embedded: a backup of SQLite with the blobs in S3 would hold no blob.
    if db.engine() != Engine::Sqlite || blobs.is_s3() {
        return Err(BackupError::NotEmbedded);
    }
    if dest.exists() {
        return Err(BackupError::Exists(dest.to_path_buf()));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| BackupError::Invalid(format!("{} names no directory", dest.display())))?;
    let partial = dest.with_file_name(format!(
        "{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&partial)
            .map_err(io(&partial))?;
    }
    let blobs_from = data.join("blobs");
    let blobs_to = partial.join("blobs");
    let first = copy_blobs(&blobs_from, &blobs_to, false)?;
    tracing::info!("backup: {} blobs copied; now the database", first.blobs);
    let db_copy = partial.join(DB_FILE);
    sqlx::query("VACUUM INTO $1")
        .bind(db_copy.to_string_lossy().into_owned())
        .execute(db.pool())
        .await?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&db_copy, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&db_copy))?;
    }
    let again = copy_blobs(&blobs_from, &blobs_to, false)?;
    let mut files = BTreeMap::new();
    files.insert(DB_FILE.to_string(), sha256_file(&db_copy)?);
    let key = data.join(KEY_FILE);
    if key.exists() {
        copy_file(&key, &partial.join(KEY_FILE))?;
        files.insert(KEY_FILE.to_string(), sha256_file(&key)?);
    }
    if let Some(config) = config {
        copy_file(config, &partial.join(CONFIG_FILE))?;
        files.insert(CONFIG_FILE.to_string(), sha256_file(config)?);
    }
    let missing = missing_blobs(&db_copy, &blobs_to).await?;
    let counted = count_blobs(&blobs_to)?;
    let manifest = Manifest {
        format: FORMAT,
        created_ms: crate::db::now_ms(),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        files,
        blobs: counted.blobs,
        blob_bytes: counted.blob_bytes,
        missing: missing.clone(),
    };
    write_synced(
        &partial.join(MANIFEST),
        &serde_json::to_vec_pretty(&manifest).expect("a manifest serialises"),
    )?;
    sync_dir(&partial)?;
    std::fs::rename(&partial, dest).map_err(io(dest))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    tracing::info!(
        "backup: {} blobs in all ({} published while it ran), {} bytes",
        counted.blobs,
        again.blobs,
        counted.blob_bytes
    );
    Ok(Done { missing, ..counted })
}

/// Restores the backup `src` into `data`, which must hold no database. Every file is checked
/// against the manifest (and every blob against its name) before the database is put in place.
/// The config file, if backed up, stays in `src` (its place is the operator's: `--config`).
pub async fn restore(src: &Path, data: &Path) -> Result<Done, BackupError> {
    let text = std::fs::read(src.join(MANIFEST)).map_err(io(&src.join(MANIFEST)))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", src.join(MANIFEST).display())))?;
    if manifest.format != FORMAT {
        return Err(BackupError::Invalid(format!(
            "backup format {} (this server reads {FORMAT})",
            manifest.format
        )));
    }
    for (name, sha) in &manifest.files {
        let got = sha256_file(&src.join(name))?;
        if &got != sha {
            return Err(BackupError::Invalid(format!(
                "{} has sha256 {got}, the manifest says {sha}: the backup is damaged",
                src.join(name).display()
            )));
        }
    }
    if !manifest.files.contains_key(DB_FILE) {
        return Err(BackupError::Invalid("the backup holds no database".into()));
    }
    let db_path = data.join(DB_FILE);
    if db_path.exists() {
        return Err(BackupError::Exists(db_path));
    }
    std::fs::create_dir_all(data).map_err(io(data))?;
    let held = count_blobs(&src.join("blobs"))?.blobs;
    if held != manifest.blobs {
        return Err(BackupError::Invalid(format!(
            "the backup holds {held} blobs, its manifest says {}",
            manifest.blobs
        )));
    }
    let done = copy_blobs(&src.join("blobs"), &data.join("blobs"), true)?;
    // A restore cut short left what it had copied (no database, so no data directory yet):
    // this one replaces it.
    let staged = data.join(format!("{DB_FILE}.restoring"));
    for leftover in [data.join(KEY_FILE), staged.clone()] {
        match std::fs::remove_file(&leftover) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&leftover)(e)),
            _ => {}
        }
    }
    if manifest.files.contains_key(KEY_FILE) {
        copy_file(&src.join(KEY_FILE), &data.join(KEY_FILE))?;
    }
    // Last, under a temporary name renamed into place: the database makes it a data directory.
    copy_file(&src.join(DB_FILE), &staged)?;
    // Every blob the database names is there (a count alone would take a stray file for one).
    let missing = missing_blobs(&staged, &data.join("blobs")).await?;
    if !missing.is_empty() && !manifest.missing.iter().eq(missing.iter()) {
        let _ = std::fs::remove_file(&staged);
        return Err(BackupError::Invalid(format!(
            "the backup's database names {} blobs it does not hold (the first: {})",
            missing.len(),
            missing[0]
        )));
    }
    std::fs::rename(&staged, &db_path).map_err(io(&db_path))?;
    sync_dir(data)?;
    Ok(done)
}

/// Copies every blob file of `from` (`sha256/ab/<sha>`; staging files skipped) that `to` lacks;
/// with `check`, each one's bytes against its name first. Counts what `to` got.
fn copy_blobs(from: &Path, to: &Path, check: bool) -> Result<Done, BackupError> {
    let mut done = Done::default();
    let dirs = match std::fs::read_dir(from.join("sha256")) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(io(from)(e)),
    };
    for dir in dirs {
        let dir = dir.map_err(io(from))?;
        for file in std::fs::read_dir(dir.path()).map_err(io(&dir.path()))? {
            let file = file.map_err(io(&dir.path()))?;
            let name = file.file_name().to_string_lossy().into_owned();
            if !construir_contract::manifest::valid_sha256(&name) {
                continue;
            }
            let target = to.join("sha256").join(&name[..2]).join(&name);
            if target.exists() {
                continue;
            }
            if check {
                let got = sha256_file(&file.path())?;
                if got != name {
                    return Err(BackupError::Invalid(format!(
                        "blob {name} in the backup has other bytes (sha256 {got})"
                    )));
                }
            }
            std::fs::create_dir_all(target.parent().expect("sha256/ab")).map_err(io(&target))?;
            done.blob_bytes += copy_file(&file.path(), &target)?;
            done.blobs += 1;
            if done.blobs.is_multiple_of(1000) {
                tracing::info!("{} blobs copied, {} bytes", done.blobs, done.blob_bytes);
            }
        }
    }
    Ok(done)
}

fn count_blobs(root: &Path) -> Result<Done, BackupError> {
    let mut done = Done::default();
    let Ok(dirs) = std::fs::read_dir(root.join("sha256")) else {
        return Ok(done);
    };
    for dir in dirs {
        let dir = dir.map_err(io(root))?;
        for file in std::fs::read_dir(dir.path()).map_err(io(&dir.path()))? {
            let file = file.map_err(io(&dir.path()))?;
            done.blobs += 1;
            done.blob_bytes += file.metadata().map_err(io(&file.path()))?.len();
        }
    }
    Ok(done)
}

/// The blobs the database copy at `db` names that `blobs` lacks.
async fn missing_blobs(db: &Path, blobs: &Path) -> Result<Vec<String>, BackupError> {
    use sqlx::Connection;
    let url = format!("sqlite://{}?mode=ro", db.display());
    let mut conn = sqlx::AnyConnection::connect(&url).await?;
    // The columns retention::referenced looks at: every name a row gives a blob.
    let rows = sqlx::query(
        "SELECT sha256 FROM jobs WHERE file_deleted_ms IS NULL UNION \
         SELECT output_sha256 FROM attempts WHERE output_sha256 IS NOT NULL UNION \
         SELECT output_index_sha256 FROM attempts WHERE output_index_sha256 IS NOT NULL UNION \
         SELECT console_sha256 FROM attempts WHERE console_sha256 IS NOT NULL UNION \
         SELECT manifest_sha256 FROM images UNION SELECT kernel_sha256 FROM images UNION \
         SELECT qcow2_sha256 FROM images",
    )
    .fetch_all(&mut conn)
    .await?;
    conn.close().await?;
    let mut missing = Vec::new();
    for r in rows {
        let sha: String = r.try_get(0)?;
        if !construir_contract::manifest::valid_sha256(&sha) {
            continue;
        }
        if !blobs.join("sha256").join(&sha[..2]).join(&sha).exists() {
            missing.push(sha);
        }
    }
    Ok(missing)
}

/// Copies `from` to `to` (made new, readable by its owner only: a backup holds the signing key
/// and the digests of every token) and syncs it; returns its size.
fn copy_file(from: &Path, to: &Path) -> Result<u64, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from).map_err(io(from))?;
    let mut dst = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io(to))?;
    let n = std::io::copy(&mut src, &mut dst).map_err(io(to))?;
    dst.sync_all().map_err(io(to))?;
    Ok(n)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn sha256_file(path: &Path) -> Result<String, BackupError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(crate::tokens::hex(&h.finalize()))
}
