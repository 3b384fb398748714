//! Making seed-format jobs: an xz tar holding `opt/job/construir` (and whatever else the job
//! brings under `opt/job/`), padded with zeros so the job disk has room for the output.

use construir_contract::archive::{JOB_DIR, JOB_SCRIPT};
use construir_contract::source_job;
use std::io::Write;
use std::path::Path;

/// One file of a job.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// Path inside `opt/job/`.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl JobFile {
    pub fn new(path: impl Into<String>, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            data: data.into(),
            mode,
        }
    }

    /// The job's script, `opt/job/construir`.
    pub fn script(text: &str) -> Self {
        Self::new("construir", text.as_bytes(), 0o755)
    }
}

/// Why a job could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("a job needs {JOB_SCRIPT}")]
    NoScript,
    #[error("job path {0:?} must be relative and stay inside {JOB_DIR}/")]
    BadPath(String),
    #[error("cannot write the job")]
    Io(#[from] std::io::Error),
}

/// The job archive (xz tar) for `files`, unpadded.
pub fn job_archive(files: &[JobFile]) -> Result<Vec<u8>, PackError> {
    if !files.iter().any(|f| f.path == "construir") {
        return Err(PackError::NoScript);
    }
    let mut builder = job_tar()?;
    for f in files {
        append_file(&mut builder, f)?;
    }
    finish_xz(builder)
}

/// Packs the tree at `dir` (everything but `.git`, symlinks kept as symlinks) as `opt/job/`.
/// The tree must hold the job's script, `construir`, at its top.
pub fn archive_from_dir(dir: &Path) -> Result<Vec<u8>, PackError> {
    if !dir.join("construir").is_file() {
        return Err(PackError::NoScript);
    }
    let mut builder = job_tar()?;
    append_tree(&mut builder, dir, None)?;
    finish_xz(builder)
}

/// Packs a project's tree that has no job script of its own (`construir-pack --script`): the
/// tree (everything but `.git`) as `opt/job/src/`, `script` as `opt/job/build.sh`, and the
/// wrapper of [`source_job`] as `opt/job/construir`, the layout the server's submit form makes.
/// `deps`, if given, is a directory packed as `opt/job/deps/` (what `--vendor` fetched).
pub fn archive_from_source(
    dir: &Path,
    script: &[u8],
    deps: Option<&Path>,
) -> Result<Vec<u8>, PackError> {
    if !dir.is_dir() {
        return Err(PackError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a directory", dir.display()),
        )));
    }
    let mut builder = job_tar()?;
    let wrapper = source_job::wrapper("construir-pack --script", None);
    let job_dir = |p: &str| {
        p.strip_prefix("opt/job/")
            .expect("under opt/job")
            .to_string()
    };
    let files = [
        JobFile::new("construir", wrapper.into_bytes(), 0o755),
        JobFile::new(job_dir(source_job::BUILD_SCRIPT), script.to_vec(), 0o755),
    ];
    for f in &files {
        append_file(&mut builder, f)?;
    }
    if let Some(deps) = deps {
        append_tree(&mut builder, deps, Some("deps"))?;
    }
    let src = source_job::SOURCE_DIR
        .strip_prefix("opt/job/")
        .expect("under opt/job");
    append_tree(&mut builder, dir, Some(src))?;
    finish_xz(builder)
}

/// A deterministic tar that stores symlinks as symlinks, with `opt/` and `opt/job/` in it.
fn job_tar() -> std::io::Result<tar::Builder<Vec<u8>>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Deterministic);
    dir_header(&mut builder, "opt/")?;
    dir_header(&mut builder, &format!("{JOB_DIR}/"))?;
    Ok(builder)
}

fn dir_header(builder: &mut tar::Builder<Vec<u8>>, path: &str) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    header.set_cksum();
    builder.append_data(&mut header, path, std::io::empty())
}

fn append_file(builder: &mut tar::Builder<Vec<u8>>, f: &JobFile) -> Result<(), PackError> {
    if f.path.is_empty() || f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
        return Err(PackError::BadPath(f.path.clone()));
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(f.data.len() as u64);
    header.set_mode(f.mode);
    header.set_cksum();
    builder.append_data(&mut header, format!("{JOB_DIR}/{}", f.path), &f.data[..])?;
    Ok(())
}

/// Appends `root`'s tree (sorted by name, without `.git`) under `opt/job/`, or under
/// `opt/job/SUB/` (and that directory's own entry) when `sub` is given.
fn append_tree(
    builder: &mut tar::Builder<Vec<u8>>,
    root: &Path,
    sub: Option<&str>,
) -> std::io::Result<()> {
    let under = match sub {
        Some(sub) => {
            dir_header(builder, &format!("{JOB_DIR}/{sub}/"))?;
            Path::new(JOB_DIR).join(sub)
        }
        None => Path::new(JOB_DIR).to_path_buf(),
    };
    fn walk(
        builder: &mut tar::Builder<Vec<u8>>,
        root: &Path,
        under: &Path,
        dir: &Path,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            if entry.file_name() == ".git" {
                continue;
            }
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("under root");
            builder.append_path_with_name(&path, under.join(rel))?;
            if entry.file_type()?.is_dir() {
                walk(builder, root, under, &path)?;
            }
        }
        Ok(())
    }
    walk(builder, root, &under, root)
}

fn finish_xz(builder: tar::Builder<Vec<u8>>) -> Result<Vec<u8>, PackError> {
    let tar = builder.into_inner()?;
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&tar)?;
    Ok(xz.finish()?)
}

/// Parses a size (the launchers' rule: bytes, or `64K`, `64M`, `1G`, `2T`).
pub use construir_launcher::size::parse_size;

/// Writes `archive` as a job file, zero-padded to `min_size` and whole sectors.
pub fn write_archive(path: &Path, archive: &[u8], min_size: u64) -> Result<u64, PackError> {
    let size = (archive.len() as u64).max(min_size).div_ceil(512) * 512;
    let tmp = path.with_extension("partial");
    {
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(archive)?;
        out.set_len(size)?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(size)
}

/// Writes a job file: the archive, zero-padded to at least `min_size` bytes and to a whole
/// number of 512-byte sectors (the job's output is written over the same file).
pub fn write_job(path: &Path, files: &[JobFile], min_size: u64) -> Result<u64, PackError> {
    write_archive(path, &job_archive(files)?, min_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_contract::archive;

    #[test]
    fn a_packed_job_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("hello_t0.tar.xz");
        let size = write_job(
            &job,
            &[
                JobFile::script("#!/bin/sh\necho hi\n"),
                JobFile::new("data/in.bin", vec![1, 2, 3], 0o644),
            ],
            1 << 20,
        )
        .unwrap();
        assert_eq!(size, 1 << 20);
        assert_eq!(std::fs::metadata(&job).unwrap().len(), 1 << 20);
        let disk = std::fs::read(&job).unwrap();
        let script = archive::read_file(&disk[..], JOB_SCRIPT, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(script, b"#!/bin/sh\necho hi\n");
        let (_, entries) = archive::list(&disk[..]).unwrap();
        let script_entry = entries.iter().find(|e| e.path == JOB_SCRIPT).unwrap();
        assert_eq!(script_entry.mode & 0o777, 0o755);
        assert!(entries.iter().any(|e| e.path == "opt/job/data/in.bin"));
    }

    #[test]
    fn refuses_jobs_without_script_or_with_escaping_paths() {
        assert!(matches!(job_archive(&[]), Err(PackError::NoScript)));
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            let files = [JobFile::script("true"), JobFile::new(bad, vec![], 0o644)];
            assert!(
                matches!(job_archive(&files), Err(PackError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_directory_packs_without_git_and_with_modes_and_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("construir"), "#!/bin/sh\nmake\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            d.path().join("construir"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/main.c"), "int main(){}").unwrap();
        std::os::unix::fs::symlink("src/main.c", d.path().join("link.c")).unwrap();
        std::fs::create_dir_all(d.path().join(".git/objects")).unwrap();
        std::fs::write(d.path().join(".git/HEAD"), "ref").unwrap();
        let archive = archive_from_dir(d.path()).unwrap();
        let (_, entries) = construir_contract::archive::list(&archive[..]).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"opt/job/construir") && paths.contains(&"opt/job/src/main.c"));
        assert!(!paths.iter().any(|p| p.contains(".git")), "{paths:?}");
        let link = entries.iter().find(|e| e.path == "opt/job/link.c").unwrap();
        assert_eq!(link.kind, '2', "a symlink stays a symlink");
        let script = entries
            .iter()
            .find(|e| e.path == "opt/job/construir")
            .unwrap();
        assert_eq!(script.mode & 0o111, 0o111);
        std::fs::remove_file(d.path().join("construir")).unwrap();
        assert!(matches!(
            archive_from_dir(d.path()),
            Err(PackError::NoScript)
        ));
    }

    #[test]
    fn a_source_tree_packs_under_src_with_the_script_outside_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("lib")).unwrap();
        std::fs::write(d.path().join("Makefile"), "all:\n").unwrap();
        std::fs::write(d.path().join("lib/a.c"), "int a;").unwrap();
        std::fs::create_dir_all(d.path().join(".git")).unwrap();
        std::fs::write(d.path().join(".git/HEAD"), "ref").unwrap();
        let deps = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(deps.path().join("cargo/a-1.0.0")).unwrap();
        std::fs::write(deps.path().join("cargo/a-1.0.0/lib.rs"), "").unwrap();
        std::fs::write(deps.path().join("setup.sh"), "export A=1\n").unwrap();
        let archive =
            archive_from_source(d.path(), b"#!/bin/bash\nmake\n", Some(deps.path())).unwrap();
        let (_, entries) = archive::list(&archive[..]).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "opt/job/construir",
            "opt/job/build.sh",
            "opt/job/src/Makefile",
            "opt/job/src/lib/a.c",
            "opt/job/deps/setup.sh",
            "opt/job/deps/cargo/a-1.0.0/lib.rs",
        ] {
            assert!(paths.contains(&want), "{want} in {paths:?}");
        }
        assert!(!paths.iter().any(|p| p.contains(".git")), "{paths:?}");
        // Directories come before what they hold.
        let at = |p: &str| {
            paths
                .iter()
                .position(|x| x.trim_end_matches('/') == p)
                .unwrap()
        };
        assert!(at("opt/job") < at("opt/job/construir"));
        assert!(
            at("opt/job/src") < at("opt/job/src/lib")
                && at("opt/job/src/lib") < at("opt/job/src/lib/a.c")
        );
        let read = |p: &str| {
            archive::read_file(&archive[..], p, 1 << 20)
                .unwrap()
                .unwrap()
        };
        assert_eq!(read("opt/job/build.sh"), b"#!/bin/bash\nmake\n");
        let wrapper = String::from_utf8(read("opt/job/construir")).unwrap();
        assert_eq!(
            wrapper,
            source_job::wrapper("construir-pack --script", None)
        );
        let script = entries
            .iter()
            .find(|e| e.path == "opt/job/build.sh")
            .unwrap();
        assert_eq!(script.mode & 0o777, 0o755);
        // The same tree packs the same bytes again.
        assert_eq!(
            archive,
            archive_from_source(d.path(), b"#!/bin/bash\nmake\n", Some(deps.path())).unwrap()
        );
        assert!(archive_from_source(&d.path().join("absent"), b"x", None).is_err());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size(" 64M "), Ok(64 << 20));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("1.5G").is_err() && parse_size("").is_err() && parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_round_up_to_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("j_t0.tar.xz");
        let size = write_job(&job, &[JobFile::script("true")], 1000).unwrap();
        assert_eq!(size, 1024);
    }
}
