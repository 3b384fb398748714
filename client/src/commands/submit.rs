//! `submit JOB|--dir DIR …`: sends a job file (streamed, as the raw body) with the limits
//! asked for; prints the job's id; with `--wait` or `--follow`, stays until it ends and exits
//! with its code.

use super::{finish, logs, wait};
use crate::cli::SubmitArgs;
use crate::exit::{self, fail};
use crate::http::Api;
use crate::paths;
use construir_api::types::{JobView, SubmitParams};
use construir_contract::jobname::parse_job_name;
use construir_tools::pack::{PackError, archive_from_dir, write_archive};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Room for output a packed job gets when `--output-size` is not given (construir-pack's).
const DEFAULT_ROOM: u64 = 64 << 20;
/// The image a packed job runs in when `--image` is not given (construir-pack's).
const DEFAULT_IMAGE: &str = "i0";

pub fn run(api: &Api, args: SubmitArgs) -> anyhow::Result<u8> {
    if args.name.is_some() && args.dir.is_none() {
        return Err(fail(
            exit::USAGE,
            "--name names a job packed with --dir; a job file's name is its file name",
        ));
    }
    // `_scratch` holds a packed job until it is sent; dropping it removes it.
    let (path, name, _scratch) = match (&args.job, &args.dir) {
        (Some(job), None) => {
            let name = job
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| {
                    fail(
                        exit::USAGE,
                        format!("{} is no job file name", job.display()),
                    )
                })?
                .to_string();
            (job.clone(), name, None)
        }
        (None, Some(dir)) => {
            let (scratch, path, name) = pack(
                dir,
                args.name.as_deref(),
                args.image.as_deref().unwrap_or(DEFAULT_IMAGE),
                args.output_size.unwrap_or(DEFAULT_ROOM),
            )?;
            (path, name, Some(scratch))
        }
        _ => return Err(fail(exit::USAGE, "give a job file or --dir DIR")),
    };
    // The server checks the name too; checked here, a bad one costs no upload.
    parse_job_name(&name).map_err(|e| fail(exit::USAGE, e.to_string()))?;
    let file = std::fs::File::open(&path)
        .map_err(|e| fail(exit::LOCAL, format!("open {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(exit::LOCAL, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(fail(
            exit::USAGE,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let params = params(&args);
    let job: JobView = api.post_file(&paths::submit(&name, &params), file)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", job.id)?;
        out.flush()?;
    }
    eprintln!(
        "construir: submitted {} as job {} (image {}, {})",
        crate::escape::printable(&job.name),
        job.id,
        crate::escape::printable(&job.image),
        crate::format::size(job.size)
    );
    if args.follow {
        let mut out = logs::ConsoleOut::stdout(args.raw);
        let ended = logs::follow(api, job.id, None, &mut out)?;
        out.finish()?;
        return Ok(finish(&ended));
    }
    if args.wait {
        let ended = wait(api, job.id)?;
        return Ok(finish(&ended));
    }
    Ok(0)
}

/// The submission's query: what was given on the command line, nothing else.
pub fn params(args: &SubmitArgs) -> SubmitParams {
    SubmitParams {
        image: args.image.clone(),
        timeout_s: args.timeout,
        output_size: args.output_size,
        console_cap: args.console_cap,
        memory_mib: args.memory,
        vcpus: args.vcpus,
        priority: args.priority.unwrap_or(0),
        replicas: args.replicas,
        quorum: args.quorum,
        own_runners: args.own_runners,
        any_class: args.any_host_class,
        adaptive: args.adaptive,
        private: Some(args.private),
    }
}

/// The job's name as construir-pack makes it: letters, digits, `-` and `.` kept, anything else
/// a `-`.
pub fn job_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Packs `dir` as construir-pack does into a fresh private directory (0700, a random name):
/// the directory, the job file in it, and its name.
fn pack(
    dir: &Path,
    name: Option<&str>,
    image: &str,
    room: u64,
) -> anyhow::Result<(tempfile::TempDir, PathBuf, String)> {
    let stem = match name {
        Some(n) => n.to_string(),
        None => dir
            .canonicalize()
            .map_err(|e| fail(exit::USAGE, format!("{}: {e}", dir.display())))?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "job".into()),
    };
    let name = format!("{}_{image}.tar.xz", job_stem(&stem));
    let archive = archive_from_dir(dir).map_err(|e| {
        let code = match e {
            PackError::Io(_) => exit::LOCAL,
            _ => exit::USAGE,
        };
        fail(code, format!("pack {}: {e}", dir.display()))
    })?;
    use std::os::unix::fs::PermissionsExt;
    let scratch = tempfile::Builder::new()
        .prefix("construir-submit-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(|e| {
            fail(
                exit::LOCAL,
                format!("make a private scratch directory: {e}"),
            )
        })?;
    let path = scratch.path().join(&name);
    let size = write_archive(&path, &archive, room)
        .map_err(|e| fail(exit::LOCAL, format!("write {}: {e}", path.display())))?;
    eprintln!(
        "construir: packed {} as {name} ({} of archive, {} in all)",
        dir.display(),
        crate::format::size(archive.len() as u64),
        crate::format::size(size)
    );
    Ok((scratch, path, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let mut all = vec!["construir", "submit"];
        all.extend(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Submit(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn only_the_flags_given_are_sent() {
        let plain = params(&submit_args(&["j_i0.tar.xz"]));
        // Whether it is private is always said: the server takes a job that says nothing as
        // private (what an earlier client meant).
        assert_eq!(
            plain,
            SubmitParams {
                private: Some(false),
                ..SubmitParams::default()
            }
        );
        assert_eq!(
            paths::submit("j_i0.tar.xz", &plain),
            "/api/v1/jobs?name=j_i0.tar.xz&private=false"
        );
        let private = params(&submit_args(&["j_i0.tar.xz", "--private"]));
        assert_eq!(private.private, Some(true));
        let some = params(&submit_args(&[
            "j_i0.tar.xz",
            "--memory",
            "512M",
            "--timeout",
            "2h",
        ]));
        assert_eq!(
            paths::submit("j_i0.tar.xz", &some),
            "/api/v1/jobs?name=j_i0.tar.xz&memory_mib=512&private=false&timeout_s=7200"
        );
    }

    #[test]
    fn a_directory_packs_as_construir_pack_packs_it() {
        assert_eq!(job_stem("my project (v2)"), "my-project--v2-");
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("hello c");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("construir"), "#!/bin/sh\ntrue\n").unwrap();
        let (scratch, path, name) = pack(&src, None, "t0", 1 << 20).unwrap();
        assert_eq!(name, "hello-c_t0.tar.xz");
        assert_eq!(path, scratch.path().join(&name));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let disk = std::fs::read(&path).unwrap();
        let script = construir_contract::archive::read_file(&disk[..], "opt/job/construir", 100)
            .unwrap()
            .unwrap();
        assert_eq!(script, b"#!/bin/sh\ntrue\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(scratch.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private: {mode:o}");
        let kept = scratch.path().to_path_buf();
        drop(scratch);
        assert!(!kept.exists());
        // No script: bad usage, not a local failure.
        std::fs::remove_file(src.join("construir")).unwrap();
        let e = pack(&src, Some("x"), "i0", 0).unwrap_err();
        let code = e.downcast_ref::<exit::Failure>().unwrap().code;
        assert_eq!(code, exit::USAGE);
    }
}
