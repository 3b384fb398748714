//! construir-qemu: run one job under QEMU (`-M microvm`), with KVM or TCG.

use anyhow::Context;
use clap::Parser;
use construir_contract::host::HostKind;
use construir_contract::jobname::parse_job_name;
use construir_contract::manifest::{Image, cache_dir};
use construir_contract::outcome::{
    EXIT_HOST_UNSUPPORTED, EXIT_INVALID_JOB, EXIT_SETUP_ERROR, RunOutcome,
};
use construir_launcher::jobfile::JobFileRefusal;
use construir_launcher::{self as launcher, JobArgs};
use construir_rawbase::RawBase;
use construir_rawbase::convert::sha256_file;
use construir_tools::qemu::{self, Accel, LaunchConfig, LaunchError};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "construir-qemu",
    about = "Run a construir job under QEMU (microvm), with KVM or TCG",
    after_help = "Example:\n  construir-qemu --job hello_t0.tar.xz --accel tcg --console -\n\n\
Exit status: the job's own status for 0-99; 100 job failed with >= 100 or by a signal; \
101 invalid job; 102 timed out; 103 guest failed; 104 host cannot run guests; 105 setup error; \
106 interrupted."
)]
struct Cli {
    #[command(flatten)]
    job: JobArgs,
    /// kvm, tcg, or auto: KVM on hardware-assisted KVM, TCG elsewhere.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// microvm (what construir runs), or pc: QEMU's default machine with IDE disks, the seed's
    /// way, a benchmark baseline that needs the pc kernel variant (guest/kernel/build --variant pc).
    #[arg(long, default_value = "microvm")]
    machine: String,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

fn main() {
    launcher::init_logging();
    let cli: Cli = launcher::parse_args();
    launcher::stop_on_termination_signals(&qemu::INTERRUPTED);
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("construir-qemu: error: {e:#}");
            match e.downcast_ref::<LaunchError>() {
                Some(LaunchError::NoKvm | LaunchError::NoQemu { .. }) => EXIT_HOST_UNSUPPORTED,
                _ => EXIT_SETUP_ERROR,
            }
        }
    };
    std::process::exit(i32::from(code));
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    // The job is opened once, here, and QEMU gets this descriptor: what is checked is what runs.
    let job_file = match cli.job.open_job() {
        Ok(file) => file,
        Err(e) => match e.refusal() {
            Some(refusal) => return Ok(refuse_job(&cli.job, refusal)),
            None => return Err(e.into()),
        },
    };
    let image = cli.job.image()?;
    let index = image.manifest.index.clone();
    let host = cli.job.host()?;
    let (accel, why) = match cli.accel.as_str() {
        "auto" => Accel::auto(host),
        "kvm" => (Accel::Kvm, "asked for"),
        "tcg" => (Accel::Tcg, "asked for"),
        other => anyhow::bail!("--accel {other:?}: expected auto, kvm or tcg"),
    };
    if accel == Accel::Kvm && host == HostKind::EmulatedKvm {
        tracing::warn!(
            "this host has no hardware virtualization (its KVM emulates the guest kernel): the boot takes \
             minutes and user space runs far slower than under TCG; adding the emulated-host kernel parameters"
        );
    }
    let job = &cli.job;
    tracing::info!(image = %index, accel = accel.as_str(), host = %host, "running {} ({why})", job.job.display());
    // Held (shared lock) until QEMU is gone, so no prune removes the base under it.
    let (root, _base) = root_disk(job, &image, &cache_dir().join("raw"))?;
    let config = LaunchConfig {
        qemu: cli.qemu.clone(),
        kernel: job.kernel.clone().unwrap_or_else(|| image.kernel_path()),
        root,
        job: Arc::new(job_file),
        accel,
        host,
        memory_mib: job.memory.map_or(image.manifest.memory_mib, |m| m as u32),
        vcpus: job.vcpus.map_or(image.manifest.vcpus, u32::from),
        job_timeout: job.timeout,
        clock: job.clock,
        boot_allowance: qemu::boot_allowance(accel, host),
        console_cap: job.console_cap,
        kernel_args: job.kernel_args.clone(),
        machine: qemu::Machine::parse(&cli.machine)
            .with_context(|| format!("--machine {:?}: expected microvm or pc", cli.machine))?,
    };
    let console = launcher::open_console(job.console.as_deref())
        .with_context(|| format!("open the console log {:?}", job.console))?;
    let result = qemu::launch(&config, console)?;
    let outcome = &result.outcome;
    if let RunOutcome::GuestFailed(_) = outcome
        && !result.qemu_stderr.trim().is_empty()
    {
        eprintln!("construir-qemu: QEMU said: {}", result.qemu_stderr.trim());
    }
    eprintln!(
        "construir-qemu: {outcome} (exit {}) in {:.1} s [qemu {}, host {}]",
        outcome.exit_code(),
        result.total.as_secs_f64(),
        result.accel.as_str(),
        result.host
    );
    if job.json {
        let summary = serde_json::json!({
            "status": outcome.status(),
            "exit_code": outcome.exit_code(),
            "job_exit_status": outcome.job_exit_status(),
            "reason": outcome.to_string(),
            "backend": "qemu",
            "accel": result.accel.as_str(),
            "host_kind": result.host.as_str(),
            "image": index,
            "run_ms": result.total.as_millis() as u64,
            "to_init_ms": result.to_init.map(|d| d.as_millis() as u64),
            "console_bytes": result.console_bytes,
            "console_dropped": result.console_dropped,
        });
        println!("{summary}");
    }
    Ok(outcome.exit_code())
}

/// The root disk QEMU gets, always raw and open read-only: the image's cached raw base (sha256
/// checked against the manifest before its one conversion, backing and data files refused), or
/// with `--root` (tests) that file: a raw one as it is, a qcow2 converted through the cache like
/// an image's (keyed by its own sha256). Also the base's handle, to keep while QEMU runs.
fn root_disk(
    job: &JobArgs,
    image: &Image,
    cache: &Path,
) -> anyhow::Result<(Arc<File>, Option<RawBase>)> {
    let base = match &job.root {
        None => RawBase::for_image(image, cache)?,
        Some(root) if is_qcow2(root)? => {
            RawBase::obtain(root, &sha256_file(root)?, cache, &image.dir)?
        }
        Some(root) => {
            let file = File::open(root)
                .with_context(|| format!("open the root disk {}", root.display()))?;
            return Ok((Arc::new(file), None));
        }
    };
    let file = base
        .file()
        .try_clone()
        .with_context(|| format!("duplicate the handle of {}", base.path().display()))?;
    Ok((Arc::new(file), Some(base)))
}

fn is_qcow2(path: &Path) -> anyhow::Result<bool> {
    let mut magic = [0u8; 4];
    use std::io::Read;
    let n = File::open(path)
        .with_context(|| format!("open {}", path.display()))?
        .read(&mut magic)
        .with_context(|| format!("read {}", path.display()))?;
    Ok(n == 4 && &magic == b"QFI\xfb")
}

/// A job file the host will not run (a link, not a regular file, hard-linked, too big): exit 101
/// with the refusal as the reason, and the summary a run would print, before any VM or image work.
fn refuse_job(job: &JobArgs, refusal: &JobFileRefusal) -> u8 {
    let reason = format!("invalid job: {}: {refusal}", job.job.display());
    eprintln!("construir-qemu: {reason} (exit {EXIT_INVALID_JOB})");
    if job.json {
        // The image, as far as the arguments or the name tell (nothing of the file is read).
        let image = job.image.clone().or_else(|| {
            let name = job.job.file_name()?.to_str()?;
            parse_job_name(name).ok().map(|n| n.image)
        });
        println!("{}", refusal_summary(&reason, image.as_deref()));
    }
    EXIT_INVALID_JOB
}

fn refusal_summary(reason: &str, image: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "status": "invalid-job",
        "exit_code": EXIT_INVALID_JOB,
        "job_exit_status": null,
        "reason": reason,
        "backend": "qemu",
        "image": image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_refused_job_is_an_invalid_job_with_the_refusal_as_reason() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("i0.json");
        std::fs::write(&target, b"{}").unwrap();
        let link = dir.path().join("x_i0.tar.xz");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let cli = Cli::parse_from(["construir-qemu", "--json", "--job", link.to_str().unwrap()]);
        let e = cli.job.open_job().unwrap_err();
        let refusal = e.refusal().expect("refused, not an open error");
        assert_eq!(refuse_job(&cli.job, refusal), EXIT_INVALID_JOB);
        let s = refusal_summary("invalid job: x: it is a symbolic link", None);
        assert_eq!(s["status"], "invalid-job");
        assert_eq!(s["exit_code"], 101);
        assert!(s["reason"].as_str().unwrap().contains("symbolic link"));
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"{}",
            "the target is untouched"
        );
    }

    #[test]
    fn a_qcow2_with_a_wrong_hash_or_a_backing_file_never_reaches_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path();
        let raw_in = images.join("in.raw");
        std::fs::write(&raw_in, vec![0x5au8; 65536]).unwrap();
        let q = images.join("t0.qcow2");
        let qemu_img = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .expect("qemu-img is needed (Debian package qemu-utils)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        qemu_img(&[
            "convert".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw_in.as_os_str(),
            q.as_os_str(),
        ]);
        let manifest = |disk_sha256: &str| {
            let other = "1".repeat(64);
            format!(
                r#"{{"index":"t0","description":"t","disk":"t0.qcow2","disk_format":"qcow2",
                "disk_sha256":"{disk_sha256}","virtual_size":65536,"kernel":"kernels/vmlinux-x",
                "kernel_sha256":"{other}","memory_mib":128,"vcpus":1,"init_sha256":"{other}",
                "installed":[],"build_key":"k"}}"#
            )
        };
        let job = |root: Option<&Path>| {
            let mut args = vec!["construir-qemu", "--job", "/q/x_t0.tar.xz"];
            if let Some(root) = root {
                args.extend(["--root", root.to_str().unwrap()]);
            }
            Cli::parse_from(args).job
        };
        // The manifest's hash does not match the qcow2: refused, nothing converted.
        std::fs::write(images.join("t0.json"), manifest(&"0".repeat(64))).unwrap();
        let image = Image::load(images, "t0").unwrap();
        let cache = images.join("cache");
        let err = root_disk(&job(None), &image, &cache).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref(),
                Some(construir_rawbase::ConvertError::HashMismatch { .. })
            ),
            "{err:#}"
        );
        assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().count() == 0);
        // The right hash: QEMU gets the raw base, whose bytes are the disk's (not the qcow2's).
        let sha = sha256_file(&q).unwrap();
        std::fs::write(images.join("t0.json"), manifest(&sha)).unwrap();
        let image = Image::load(images, "t0").unwrap();
        let (file, base) = root_disk(&job(None), &image, &cache).unwrap();
        let base = base.expect("the cached base, held");
        assert_eq!(std::fs::read(base.path()).unwrap(), vec![0x5au8; 65536]);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &*file, &mut bytes).unwrap();
        assert_eq!(
            bytes,
            vec![0x5au8; 65536],
            "QEMU's descriptor is the raw base"
        );
        // --root with a qcow2 that has a backing file: refused before QEMU.
        let secret = images.join("secret");
        std::fs::write(&secret, vec![0x77u8; 65536]).unwrap();
        let backed = images.join("backed.qcow2");
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            secret.as_os_str(),
            backed.as_os_str(),
        ]);
        let err = root_disk(&job(Some(&backed)), &image, &cache).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref(),
                Some(construir_rawbase::ConvertError::Qcow2 { .. })
            ),
            "{err:#}"
        );
        // --root with a raw file: used as it is.
        let (file, held) = root_disk(&job(Some(&raw_in)), &image, &cache).unwrap();
        assert!(held.is_none());
        assert_eq!(file.metadata().unwrap().len(), 65536);
    }
}
