//! `fetch ID -o DIR`: a finished job on this machine — `DIR/output/` (what the job wrote back,
//! unpacked by the capped reader), `DIR/output.archive` (the output as downloaded),
//! `DIR/record.json` (the job as the API returns it), `DIR/console.log` (the result attempt's
//! console, or the last attempt's), and, when the server issued them, `DIR/receipt.json` (its
//! signed receipt for the result) and `DIR/server-key.json` (the key it signs with): what
//! `construir verify DIR` checks, offline, later.
//!
//! The output is the job's own choice, names and sizes included: it is downloaded whole and
//! checked against the sha256 the server recorded before anything is unpacked, unpacked into a
//! directory of its own that did not exist before (so it cannot meet the client's files, nor
//! plant a link where they go), and within the limits given, as construir-result does.

use super::{get_job, logs};
use crate::cli::FetchArgs;
use crate::escape::printable;
use crate::exit::{self, fail};
use crate::http::{Api, HttpError, parse_json};
use crate::paths;
use construir_api::trust::{MAX_RECEIPT_BYTES, ServerKey, SignedReceipt};
use construir_api::types::{AttemptView, JobId, JobState, valid_sha256};
use construir_contract::archive;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// The header the output answer carries its sha256 in.
const SHA256_HEADER: &str = "Construir-Sha256";

/// The files fetch writes beside output/ that `construir verify` reads.
pub const ARCHIVE_FILE: &str = "output.archive";
pub const RECORD_FILE: &str = "record.json";
pub const RECEIPT_FILE: &str = "receipt.json";
pub const SERVER_KEY_FILE: &str = "server-key.json";

/// The most bytes of a receipt's answer read: its text is quoted once more in the JSON that
/// carries it (and a statement's in it once more again), which at worst doubles it twice.
pub const RECEIPT_JSON_LIMIT: u64 = 4 * MAX_RECEIPT_BYTES as u64 + 4096;
/// The most bytes of the server key's answer read: three short strings.
pub const SERVER_KEY_JSON_LIMIT: u64 = 4096;

pub fn run(api: &Api, args: FetchArgs) -> anyhow::Result<u8> {
    let dir = &args.output;
    let unpack_to = dir.join("output");
    if unpack_to.symlink_metadata().is_ok() {
        return Err(fail(
            exit::USAGE,
            format!(
                "{} exists: fetch into a new directory (the output is unpacked into output/, \
                 which must not exist yet)",
                unpack_to.display()
            ),
        ));
    }
    let (job, text) = get_job(api, args.id)?;
    if !job.state.is_terminal() {
        return Err(fail(
            exit::REFUSED,
            format!(
                "job {} has not ended ({}): wait for it first (construir logs --follow {})",
                job.id, job.state, job.id
            ),
        ));
    }
    local(std::fs::create_dir_all(dir), "create", dir)?;

    write_atomically(dir, RECORD_FILE, &mut |f| f.write_all(text.as_bytes()))?;
    let mut wrote = vec![RECORD_FILE];
    // Only a job outcome has a receipt: a canceled, errored or expired job has no result.
    if matches!(job.state, JobState::Succeeded | JobState::Failed) {
        wrote.extend(save_receipt(api, job.id, dir)?);
    }

    let result = job
        .result_attempt
        .and_then(|id| job.attempts.iter().find(|a| a.id == id));
    if let Some(attempt) = result.or(job.attempts.last()) {
        // Streamed into its file as it comes, not held whole (a console may be 64 MiB).
        let mut console = local(tempfile::NamedTempFile::new_in(dir), "write in", dir)?;
        logs::stream(api, job.id, attempt.id, 0, console.as_file_mut())?;
        persist(console, &dir.join("console.log"))?;
        wrote.push("console.log");
    }

    let Some(attempt) = result.filter(|a| a.output_sha256.is_some()) else {
        let code = exit::job_exit_code(&job).unwrap_or(0);
        eprintln!(
            "construir: job {} {} without output; wrote {}",
            job.id,
            job.state,
            dir.display()
        );
        // A job without a result (canceled, errored, expired) has nothing to fetch: say so in
        // the exit code; a result without output is all there is.
        return Ok(if result.is_none() { code } else { 0 });
    };
    let archive = download(api, job.id, attempt, dir, job.limits.output_size)?;
    check_tree(attempt, &archive, &args)?;
    // Kept (checked, before it is unpacked) whatever the unpacking does: it is what the
    // receipt names and `construir verify` checks, and what a failed unpacking can be retried
    // from.
    let kept_at = dir.join(ARCHIVE_FILE);
    let mut kept = persist(archive, &kept_at)?;
    local(kept.rewind(), "read back", &kept_at)?;
    wrote.insert(0, ARCHIVE_FILE);
    local(std::fs::create_dir(&unpack_to), "create", &unpack_to)?;
    let summary = archive::extract(std::io::BufReader::new(kept), &unpack_to, &args.limits())
        .map_err(|e| {
            fail(
                exit::LOCAL,
                format!(
                    "the job's output could not be unpacked into {} (what was unpacked stays): \
                     {:#}",
                    unpack_to.display(),
                    anyhow::Error::from(e)
                ),
            )
        })?;
    eprintln!(
        "construir: job {} {}: {} entries ({}) in {}, with {}",
        job.id,
        job.state,
        summary.entries,
        crate::format::size(summary.bytes),
        unpack_to.display(),
        wrote.join(", ")
    );
    Ok(0)
}

/// Writes the job's receipt and the server's key into `dir` as the server sent them (after
/// checking they are what the API says they are), for `construir verify`; the names of the
/// files written. A server that issued no receipt (or publishes no key) answers 404: said,
/// and skipped.
fn save_receipt(api: &Api, id: JobId, dir: &Path) -> anyhow::Result<Vec<&'static str>> {
    let path = paths::receipt(id);
    let body = match api.get_bytes(&path, RECEIPT_JSON_LIMIT) {
        Ok((_, body)) => body,
        Err(HttpError::Refused { status: 404, .. }) => {
            eprintln!("construir: job {id} has no receipt (the server issued none for it)");
            return Ok(vec![]);
        }
        Err(e) => return Err(e.into()),
    };
    parse_json::<SignedReceipt>(&format!("GET {path}"), &body)?;
    write_atomically(dir, RECEIPT_FILE, &mut |f| f.write_all(&body))?;

    let path = paths::server_key();
    let body = match api.get_bytes(&path, SERVER_KEY_JSON_LIMIT) {
        Ok((_, body)) => body,
        Err(HttpError::Refused { status: 404, .. }) => {
            eprintln!(
                "construir: the server publishes no key at {path}: construir verify needs one \
                 given with --server-key"
            );
            return Ok(vec![RECEIPT_FILE]);
        }
        Err(e) => return Err(e.into()),
    };
    let what = format!("GET {path}");
    let key: ServerKey = parse_json(&what, &body)?;
    key.validate().map_err(|e| HttpError::Protocol {
        what,
        message: e.to_string(),
    })?;
    write_atomically(dir, SERVER_KEY_FILE, &mut |f| f.write_all(&body))?;
    Ok(vec![RECEIPT_FILE, SERVER_KEY_FILE])
}

/// Checks the downloaded output against the server's index of it: the tree digest the server
/// recorded when the output arrived (what replicas of the job are compared by) must be the one
/// these bytes give. The sha256 matched already, so a difference means the server's index is not
/// of these bytes: nothing is unpacked.
fn check_tree(
    attempt: &AttemptView,
    archive: &tempfile::NamedTempFile,
    args: &FetchArgs,
) -> anyhow::Result<()> {
    let Some(want) = attempt
        .output_index
        .as_ref()
        .and_then(|i| i.tree_sha256.clone())
    else {
        return Ok(());
    };
    let source = local(archive.reopen(), "reopen the download in", archive.path())?;
    let got = archive::index(std::io::BufReader::new(source), &args.limits())
        .map_err(|e| {
            fail(
                exit::LOCAL,
                format!(
                    "the server indexed the output, but it cannot be read here: {:#}; not unpacked",
                    anyhow::Error::from(e)
                ),
            )
        })?
        .tree_sha256;
    if got != want {
        return Err(fail(
            exit::LOCAL,
            format!(
                "the output's tree digest is {got}, not the {} the server recorded for it: not \
                 unpacked",
                printable(&want)
            ),
        ));
    }
    Ok(())
}

/// A local I/O failure, with what was being done (exit 115).
fn local<T>(result: std::io::Result<T>, doing: &str, path: &Path) -> anyhow::Result<T> {
    result.map_err(|e| fail(exit::LOCAL, format!("{doing} {}: {e}", path.display())))
}

/// Writes `DIR/name` through a fresh temporary file renamed over it (see [`persist`]).
fn write_atomically(
    dir: &Path,
    name: &str,
    fill: &mut dyn FnMut(&mut std::fs::File) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let target = dir.join(name);
    let mut tmp = local(tempfile::NamedTempFile::new_in(dir), "write in", dir)?;
    local(fill(tmp.as_file_mut()), "write", &target)?;
    persist(tmp, &target).map(drop)
}

/// Renames a finished temporary file to `target`, and gives it back open: a rename replaces a
/// link at `target` rather than writing where it points.
fn persist(tmp: tempfile::NamedTempFile, target: &Path) -> anyhow::Result<std::fs::File> {
    tmp.persist(target)
        .map_err(|e| fail(exit::LOCAL, format!("write {}: {e}", target.display())))
}

/// The result attempt's output, downloaded into a temporary file in `dir` and checked: no more
/// bytes than the attempt's output size (else the job's limit), and the sha256 the server
/// recorded for it.
fn download(
    api: &Api,
    job: JobId,
    attempt: &AttemptView,
    dir: &Path,
    limit: u64,
) -> anyhow::Result<tempfile::NamedTempFile> {
    let want = attempt.output_sha256.clone().unwrap_or_default();
    let path = paths::output(job);
    let what = format!("GET {path}");
    if !valid_sha256(&want) {
        return Err(HttpError::Protocol {
            what,
            message: format!("attempt {} has no sha256 for its output", attempt.id),
        }
        .into());
    }
    let resp = api.get(&path)?;
    if let Some(said) = resp.headers().get(SHA256_HEADER)
        && said.to_str().ok().map(str::trim) != Some(want.as_str())
    {
        return Err(fail(
            exit::LOCAL,
            format!(
                "the output's {SHA256_HEADER} {:?} is not the attempt's sha256 {want}",
                printable(&String::from_utf8_lossy(said.as_bytes()))
            ),
        ));
    }
    let cap = attempt.output_size.unwrap_or(limit);
    let mut tmp = local(tempfile::NamedTempFile::new_in(dir), "write in", dir)?;
    let mut body = resp.into_body().into_reader();
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = body.read(&mut buf).map_err(|e| {
            fail(
                exit::UNREACHABLE,
                format!("{what}: the download broke off after {total} bytes: {e}"),
            )
        })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > cap {
            return Err(fail(
                exit::LOCAL,
                format!("the server sent more than the attempt's {cap} bytes of output"),
            ));
        }
        hash.update(&buf[..n]);
        local(tmp.write_all(&buf[..n]), "write the output into", dir)?;
    }
    local(tmp.flush(), "write the output into", dir)?;
    let got: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != want {
        return Err(fail(
            exit::LOCAL,
            format!(
                "the downloaded output ({total} bytes) has sha256 {got}, not the {want} the \
                 server recorded: not unpacked"
            ),
        ));
    }
    Ok(tmp)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::http::tests::{answer, fake_server};
    use clap::Parser;

    fn fetch_args(dir: &Path) -> FetchArgs {
        let cli = Cli::try_parse_from(["construir", "fetch", "9", "-o", dir.to_str().unwrap()]);
        match cli.unwrap().command {
            Command::Fetch(f) => f,
            _ => unreachable!(),
        }
    }

    fn sha256_hex(data: &[u8]) -> String {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The job as the server would show it after a failed run with output `archive`.
    fn job_json_with_tree(archive: &[u8], sha: &str, tree: Option<&str>) -> String {
        serde_json::json!({
            "id": 9, "owner": 1, "name": "hello_i0.tar.xz", "image": "i0",
            "sha256": "ab".repeat(32), "size": 1 << 20,
            "limits": {"timeout_s": 60, "output_size": 1 << 20, "console_cap": 4096,
                       "memory_mib": 256, "vcpus": 1},
            "priority": 0, "state": "failed", "created_ms": 1, "ended_ms": 9,
            "reason": "job failed with exit status 2", "cancel_requested": false,
            "retry_not_before_ms": null, "result_attempt": 4, "some_new_field": true,
            "attempts": [{
                "id": 4, "runner": 1, "state": "reported", "why": "", "late": false,
                "claimed_ms": 2, "started_ms": 3, "ended_ms": 8, "phase": null,
                "status": "failed", "exit_code": 2, "job_exit_status": 2,
                "output_sha256": sha, "output_size": archive.len(), "console_size": 5,
                "output_index": {"tree_sha256": tree, "entries": 1}
            }]
        })
        .to_string()
    }

    fn serve(archive: &[u8], recorded_sha: &str) -> crate::config::ServerUrl {
        serve_with_tree(archive, recorded_sha, None)
    }

    fn serve_with_tree(
        archive: &[u8],
        recorded_sha: &str,
        tree: Option<&str>,
    ) -> crate::config::ServerUrl {
        // The fake server sends text: a plain tar of ASCII names and contents is text.
        let body = String::from_utf8(archive.to_vec()).expect("a text-only archive");
        let (url, _server) = fake_server(vec![
            answer(
                200,
                true,
                "",
                &job_json_with_tree(archive, recorded_sha, tree),
            ),
            // A server from before receipts.
            answer(404, false, "", "<html>404 Not Found</html>"),
            console_answer(),
            answer(200, true, "", &body),
        ]);
        url
    }

    fn console_answer() -> crate::http::tests::Canned {
        answer(
            200,
            true,
            "Construir-Log-Next: 5\r\nConstruir-Log-Complete: true\r\n",
            "hello",
        )
    }

    pub(crate) fn text_tar(files: &[(&str, &str)]) -> Vec<u8> {
        // A ustar archive built by hand: headers of ASCII, octal fields, ASCII contents.
        let mut out = Vec::new();
        for (name, data) in files {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0000644");
            h[108..115].copy_from_slice(b"0000000");
            h[116..123].copy_from_slice(b"0000000");
            h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
            h[136..147].copy_from_slice(b"00000000000");
            h[156] = b'0';
            h[257..263].copy_from_slice(b"ustar\0");
            h[263..265].copy_from_slice(b"00");
            h[148..156].copy_from_slice(b"        ");
            let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data.as_bytes());
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn the_output_is_checked_then_unpacked_beside_the_record_and_console() {
        let tar = text_tar(&[("hello", "built\n"), ("logs/make.log", "ok\n")]);
        let url = serve(&tar, &sha256_hex(&tar));
        let api = Api::new(&url, "t");
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("out");
        // A link the job planted where the client's own file goes is replaced, not followed.
        std::fs::create_dir(&dir).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "mine").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("record.json")).unwrap();
        let code = run(&api, fetch_args(&dir)).unwrap();
        assert_eq!(code, 0);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "mine");
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("record.json")).unwrap()).unwrap();
        assert_eq!(record["state"], "failed");
        assert_eq!(record["some_new_field"], true, "the JobView as returned");
        assert_eq!(std::fs::read(dir.join("console.log")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_to_string(dir.join("output/hello")).unwrap(),
            "built\n"
        );
        assert!(dir.join("output/logs/make.log").is_file());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 4, "no temporary files left: {left:?}");
        assert_eq!(
            std::fs::read(dir.join(ARCHIVE_FILE)).unwrap(),
            tar,
            "kept as downloaded"
        );
        assert!(!dir.join(RECEIPT_FILE).exists(), "no receipt: none written");
        // Fetching into the same place again is refused before anything is asked.
        let e = run(&api, fetch_args(&dir)).unwrap_err();
        assert_eq!(e.downcast_ref::<exit::Failure>().unwrap().code, exit::USAGE);
    }

    #[test]
    fn an_output_that_is_not_what_the_server_recorded_is_not_unpacked() {
        let tar = text_tar(&[("hello", "built\n")]);
        let url = serve(&tar, &"0".repeat(64));
        let api = Api::new(&url, "t");
        let d = tempfile::tempdir().unwrap();
        let e = run(&api, fetch_args(d.path())).unwrap_err();
        let f = e.downcast_ref::<exit::Failure>().unwrap();
        assert_eq!(f.code, exit::LOCAL);
        assert!(f.message.contains("not unpacked"), "{}", f.message);
        assert!(!d.path().join("output").exists());
        assert!(d.path().join("record.json").is_file() && d.path().join("console.log").is_file());
    }

    #[test]
    fn an_output_is_unpacked_only_when_the_servers_tree_digest_is_its_own() {
        let tar = text_tar(&[("hello", "built\n")]);
        let tree = archive::index(&tar[..], &archive::Limits::DEFAULT)
            .unwrap()
            .tree_sha256;
        let d = tempfile::tempdir().unwrap();
        let url = serve_with_tree(&tar, &sha256_hex(&tar), Some(&tree));
        let code = run(&Api::new(&url, "t"), fetch_args(&d.path().join("good"))).unwrap();
        assert_eq!(code, 0);
        assert!(d.path().join("good/output/hello").is_file());

        let url = serve_with_tree(&tar, &sha256_hex(&tar), Some(&"e".repeat(64)));
        let e = run(&Api::new(&url, "t"), fetch_args(&d.path().join("bad"))).unwrap_err();
        let f = e.downcast_ref::<exit::Failure>().unwrap();
        assert_eq!(f.code, exit::LOCAL);
        assert!(
            f.message.contains("tree digest") && f.message.contains("not unpacked"),
            "{}",
            f.message
        );
        assert!(!d.path().join("bad/output").exists());
    }

    #[test]
    fn the_receipt_and_the_servers_key_are_saved_for_verify() {
        use construir_api::trust::{Attestation, KeyPair, Receipt, Statement, Verdict, Vote};
        use construir_api::types::{AttemptId, ReportStatus, RunnerId, UserId};
        let tar = text_tar(&[("hello", "built\n")]);
        let sha = sha256_hex(&tar);
        let tree = archive::index(&tar[..], &archive::Limits::DEFAULT)
            .unwrap()
            .tree_sha256;
        let (server, runner) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let statement = Statement {
            v: 1,
            job_id: JobId(9),
            attempt_id: AttemptId(4),
            job_sha256: "ab".repeat(32),
            image: "i0".into(),
            image_digest: None,
            runner_id: RunnerId(1),
            runner_key: runner.public_hex(),
            runner_version: "test".into(),
            backend: "vmm".into(),
            host_kind: "hardware".into(),
            status: ReportStatus::Failed,
            job_exit_status: Some(2),
            output_sha256: Some(sha.clone()),
            output_tree_sha256: Some(tree.clone()),
            console_sha256: sha256_hex(b"hello"),
            console_bytes: 5,
            started_ms: 3,
            ended_ms: 8,
        };
        let receipt = Receipt {
            v: 1,
            server_key: server.public_hex(),
            job_id: JobId(9),
            job_name: "hello_i0.tar.xz".into(),
            job_sha256: "ab".repeat(32),
            image: "i0".into(),
            image_digest: None,
            submitter: UserId(1),
            replicas: 1,
            quorum: 1,
            attestation: Attestation::Unverified,
            ran_alone: None,
            verdict: Verdict {
                status: ReportStatus::Failed,
                job_exit_status: Some(2),
                output_sha256: Some(sha.clone()),
                output_tree_sha256: Some(tree.clone()),
            },
            votes: vec![Vote {
                runner_id: RunnerId(1),
                owner: UserId(2),
                statement: statement.sign(&runner),
            }],
            issued_ms: 9,
        };
        let receipt_json = serde_json::to_string(&receipt.sign(&server)).unwrap();
        let key_json = serde_json::to_string(&ServerKey::of(&server.public_hex())).unwrap();
        let body = String::from_utf8(tar.clone()).unwrap();
        let (url, requests) = fake_server(vec![
            answer(200, true, "", &job_json_with_tree(&tar, &sha, Some(&tree))),
            answer(200, true, "", &receipt_json),
            answer(200, true, "", &key_json),
            console_answer(),
            answer(200, true, "", &body),
        ]);
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("out");
        assert_eq!(run(&Api::new(&url, "t"), fetch_args(&dir)).unwrap(), 0);
        let asked: Vec<String> = requests
            .join()
            .unwrap()
            .iter()
            .map(|r| r.lines().next().unwrap().to_string())
            .collect();
        assert_eq!(asked[1], "GET /api/v1/jobs/9/receipt HTTP/1.1");
        assert_eq!(asked[2], "GET /.well-known/construir/server-key HTTP/1.1");
        assert_eq!(
            std::fs::read_to_string(dir.join(RECEIPT_FILE)).unwrap(),
            receipt_json
        );
        assert_eq!(
            std::fs::read_to_string(dir.join(SERVER_KEY_FILE)).unwrap(),
            key_json
        );
        // What was fetched is what verify takes.
        let cli = Cli::try_parse_from(["construir", "verify", dir.to_str().unwrap()]).unwrap();
        let Command::Verify(args) = cli.command else {
            unreachable!()
        };
        assert_eq!(super::super::verify::run(&args).unwrap(), 0);
    }

    #[test]
    fn a_receipt_that_is_not_one_is_refused_before_it_is_written() {
        let tar = text_tar(&[("hello", "built\n")]);
        let (url, _server) = fake_server(vec![
            answer(
                200,
                true,
                "",
                &job_json_with_tree(&tar, &sha256_hex(&tar), None),
            ),
            answer(200, true, "", r#"{"receipt": "x"}"#),
        ]);
        let d = tempfile::tempdir().unwrap();
        let e = run(&Api::new(&url, "t"), fetch_args(d.path())).unwrap_err();
        let h = e.downcast_ref::<HttpError>().unwrap();
        assert!(h.to_string().contains("/receipt"), "{h}");
        assert!(!d.path().join(RECEIPT_FILE).exists());
    }
}
