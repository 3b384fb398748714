//! `construir-output [-C DIR] PATH…`: a job's output, written deterministically over its own
//! disk. The init's binary, installed in the image a second time as
//! `/usr/local/bin/construir-output`, does this when called by that name.
//!
//! Two runs of a job that wrote the same files write the same bytes: the paths (and what is under
//! each directory) in byte order, every entry owned by 0:0 with no user or group names, its
//! modification time `SOURCE_DATE_EPOCH` (0 without it), its permission bits as they are, a plain
//! ustar/GNU tar with no compression. So replicas of a job on different runners agree on the
//! archive's sha256, not only on its tree digest. What it would write is measured first: an
//! output that does not fit the disk is refused before the disk is touched, saying by how much.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The name it answers to.
pub const NAME: &str = "construir-output";

const USAGE: &str = "usage: construir-output [-C DIR] PATH...\n\
  Writes PATH... (files, directories with everything under them, symbolic links), relative to\n\
  DIR (default: the current directory), as a plain tar over the job's disk: names in byte\n\
  order, owner 0:0, times SOURCE_DATE_EPOCH. Refused if it does not fit the disk.";

/// Runs the command with `args` (without the program name); the exit code.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(written) => {
            eprintln!("{NAME}: wrote {written} bytes");
            0
        }
        Err(e) => {
            eprintln!("{NAME}: {e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<u64, String> {
    let (dir, paths) = parse_args(args)?;
    let mtime = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let entries = collect(&dir, &paths)?;
    let device = job_device();
    let size = write_tar(&entries, mtime, &mut Counter(0), true).map_err(|e| e.to_string())?;
    let mut disk = OpenOptions::new()
        .write(true)
        .open(&device)
        .map_err(|e| format!("open the job disk {device}: {e}"))?;
    let room = disk
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("size of {device}: {e}"))?;
    if size > room {
        return Err(format!(
            "the output is {size} bytes, {} more than the job's disk {device} holds ({room}): \
             nothing written (submit with a larger --output-size)",
            size - room
        ));
    }
    disk.seek(SeekFrom::Start(0))
        .map_err(|e| format!("{device}: {e}"))?;
    let written =
        write_tar(&entries, mtime, &mut disk, false).map_err(|e| format!("{device}: {e}"))?;
    disk.sync_all().map_err(|e| format!("sync {device}: {e}"))?;
    Ok(written)
}

fn parse_args(args: &[String]) -> Result<(PathBuf, Vec<String>), String> {
    let mut dir = PathBuf::from(".");
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-C" => dir = PathBuf::from(it.next().ok_or(USAGE)?),
            "-h" | "--help" => return Err(USAGE.into()),
            p => paths.push(p.to_string()),
        }
    }
    if paths.is_empty() {
        return Err(USAGE.into());
    }
    Ok((dir, paths))
}

/// The job disk, as the kernel command line names it.
fn job_device() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    construir_contract::cmdline::GuestParams::parse(&cmdline)
        .map(|p| p.job_device)
        .unwrap_or_else(|_| construir_contract::cmdline::DEFAULT_JOB_DEVICE.to_string())
}

/// One entry of the output: its name in the archive and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    path: PathBuf,
}

/// The entries under `paths` (each relative to `dir`), directories followed, in byte order of
/// their names; each named once.
fn collect(dir: &Path, paths: &[String]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for p in paths {
        let name = p.trim_end_matches('/');
        if name.is_empty() || Path::new(name).is_absolute() || name.split('/').any(|c| c == "..") {
            return Err(format!(
                "{p:?}: give paths relative to the directory, without .."
            ));
        }
        // Every component but the last is a directory of its own, not a link: what is written
        // is what is under DIR, under the names given.
        let parts: Vec<&str> = name
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let mut at = dir.to_path_buf();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push(part);
            let meta =
                std::fs::symlink_metadata(&at).map_err(|e| format!("{}: {e}", at.display()))?;
            if !meta.is_dir() {
                return Err(format!(
                    "{p:?}: {} is not a directory (a symbolic link is not followed)",
                    at.display()
                ));
            }
        }
        walk(&dir.join(name), name, &mut out)?;
    }
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    out.dedup_by(|a, b| a.name == b.name);
    Ok(out)
}

fn walk(path: &Path, name: &str, out: &mut Vec<Entry>) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    out.push(Entry {
        name: name.to_string(),
        path: path.to_path_buf(),
    });
    if meta.is_dir() {
        let mut children: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        children.sort();
        for c in children {
            let c = c
                .to_str()
                .ok_or_else(|| format!("{}: a name that is not UTF-8", path.display()))?
                .to_string();
            walk(&path.join(&c), &format!("{name}/{c}"), out)?;
        }
    }
    Ok(())
}

/// Counts what would be written.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `entries` as a tar into `out`; the bytes written. When `dry` (measuring), file
/// contents are not read: zeros of the same length count the same.
fn write_tar(
    entries: &[Entry],
    mtime: u64,
    out: &mut dyn Write,
    dry: bool,
) -> std::io::Result<u64> {
    let mut counted = CountingWriter { inner: out, n: 0 };
    {
        let mut tar = tar::Builder::new(&mut counted);
        tar.follow_symlinks(false);
        for e in entries {
            let meta = std::fs::symlink_metadata(&e.path)?;
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(mtime);
            h.set_mode(meta.permissions().mode() & 0o7777);
            let kind = meta.file_type();
            if kind.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                tar.append_data(&mut h, format!("{}/", e.name), std::io::empty())?;
            } else if kind.is_symlink() {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                let target = std::fs::read_link(&e.path)?;
                tar.append_link(&mut h, &e.name, target)?;
            } else if kind.is_file() {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(meta.size());
                if dry {
                    tar.append_data(&mut h, &e.name, std::io::repeat(0).take(meta.size()))?;
                } else {
                    let file = File::open(&e.path)?;
                    tar.append_data(&mut h, &e.name, file.take(meta.size()))?;
                }
            } else {
                return Err(std::io::Error::other(format!(
                    "{}: not a file, a directory or a symbolic link",
                    e.path.display()
                )));
            }
        }
        tar.finish()?;
    }
    counted.flush()?;
    Ok(counted.n)
}

/// Counts the bytes passed to `inner`.
struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("out/b")).unwrap();
        std::fs::write(root.join("out/b/z.txt"), "zz").unwrap();
        std::fs::write(root.join("out/a.bin"), vec![7u8; 1000]).unwrap();
        std::fs::set_permissions(
            root.join("out/a.bin"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("a.bin", root.join("out/link")).unwrap();
    }

    fn tar_of(root: &Path, mtime: u64) -> Vec<u8> {
        let entries = collect(root, &["out".into()]).unwrap();
        let mut bytes = Vec::new();
        let n = write_tar(&entries, mtime, &mut bytes, false).unwrap();
        assert_eq!(n, bytes.len() as u64);
        let counted = write_tar(&entries, mtime, &mut Counter(0), true).unwrap();
        assert_eq!(counted, n, "the measuring pass counts what is written");
        bytes
    }

    #[test]
    fn the_same_files_give_the_same_bytes_whatever_their_times_and_owners() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(a.path());
        std::thread::sleep(std::time::Duration::from_millis(20));
        tree(b.path());
        assert_eq!(
            tar_of(a.path(), 1_700_000_000),
            tar_of(b.path(), 1_700_000_000)
        );
        assert_ne!(
            tar_of(a.path(), 1),
            tar_of(a.path(), 2),
            "the time is the epoch given"
        );
        let bytes = tar_of(a.path(), 5);
        let mut archive = tar::Archive::new(&bytes[..]);
        let names: Vec<(String, u64, u64, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                    h.mode().unwrap(),
                )
            })
            .collect();
        let just: Vec<&str> = names.iter().map(|n| n.0.as_str()).collect();
        assert_eq!(
            just,
            ["out/", "out/a.bin", "out/b/", "out/b/z.txt", "out/link"]
        );
        assert!(names.iter().all(|n| n.1 == 5 && n.2 == 0));
        assert_eq!(names[1].3, 0o755);
    }

    #[test]
    fn paths_outside_the_directory_and_bad_arguments_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["../x", "/etc", "a/../../b"] {
            assert!(collect(d.path(), &[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_args(&[]).is_err());
        assert!(parse_args(&["-C".into()]).is_err());
        let (dir, paths) = parse_args(&["-C".into(), "/tmp".into(), "out".into()]).unwrap();
        assert_eq!(
            (dir, paths),
            (PathBuf::from("/tmp"), vec!["out".to_string()])
        );
        assert!(collect(d.path(), &["missing".into()]).is_err());
        // A link in the middle of a path is not followed out of the directory.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let e = collect(d.path(), &["link/secret".into()]).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
    }
}
