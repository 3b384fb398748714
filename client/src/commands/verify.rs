//! `verify DIR [--server-key KEY]`: a fetched job checked offline, with no server and no
//! token: its receipt (`DIR/receipt.json`) must open with the server's key — the server's
//! signature, each agreeing runner's signed statement, the quorum and the attestation, as
//! [`SignedReceipt::open`] checks them — and must speak of the job in `DIR/record.json` and of
//! the output in `DIR/output.archive` (its sha256 and its tree digest).
//!
//! What it proves rests on the key: the one fetch saved came from the server itself, so a
//! lying server could have saved its own. A key obtained elsewhere (`--server-key`) checks the
//! server too. `DIR/output/` is not looked at: it was unpacked from the archive checked here,
//! and anything may have changed it since.

use super::fetch::{
    ARCHIVE_FILE, RECEIPT_FILE, RECEIPT_JSON_LIMIT, RECORD_FILE, SERVER_KEY_FILE,
    SERVER_KEY_JSON_LIMIT,
};
use crate::cli::VerifyArgs;
use crate::escape::printable;
use crate::exit::{self, fail};
use construir_api::trust::{Receipt, ServerKey, SignedReceipt, key_id, valid_public_key};
use construir_api::types::{JobId, ReportStatus};
use construir_contract::archive::{self, Limits};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek};
use std::path::Path;

/// The most bytes of `record.json` read (a job with many attempts is the largest).
const RECORD_LIMIT: u64 = crate::http::JSON_LIMIT;

pub fn run(args: &VerifyArgs) -> anyhow::Result<u8> {
    let dir = &args.dir;
    let key = match &args.server_key {
        Some(given) => {
            let key = given_key(given)?;
            if let Some(saved) = saved_key(dir).ok().filter(|s| *s != key) {
                eprintln!(
                    "construir: {} holds another key (id {}) than --server-key (id {}): checking \
                     with --server-key",
                    dir.join(SERVER_KEY_FILE).display(),
                    key_id(&saved),
                    key_id(&key)
                );
            }
            key
        }
        None => {
            let key = saved_key(dir)?;
            eprintln!(
                "construir: trusting the server key that fetch saved in {} (id {}): pass \
                 --server-key with one obtained elsewhere to check the server too",
                dir.join(SERVER_KEY_FILE).display(),
                key_id(&key)
            );
            key
        }
    };
    println!("{}", verify(dir, &key, &args.limits.limits())?);
    Ok(0)
}

/// Checks `dir` with the server key `key_hex`; the summary line to print.
fn verify(dir: &Path, key_hex: &str, limits: &Limits) -> anyhow::Result<String> {
    let receipt_path = dir.join(RECEIPT_FILE);
    let Some(text) = read_file(dir, RECEIPT_FILE, RECEIPT_JSON_LIMIT)? else {
        return Err(refused(format!(
            "{} is missing: there is no receipt to verify (fetch saves one when the server has \
             issued it)",
            receipt_path.display()
        )));
    };
    let signed: SignedReceipt = serde_json::from_slice(&text).map_err(|e| {
        refused(format!(
            "{} is not a signed receipt: {e}",
            receipt_path.display()
        ))
    })?;
    let receipt = signed.open(key_hex).map_err(|e| {
        refused(format!(
            "{} does not verify with server key {key_hex} (id {}): {}",
            receipt_path.display(),
            key_id(key_hex),
            printable(&e.to_string())
        ))
    })?;
    check_record(dir, &receipt)?;
    check_output(dir, &receipt, limits)?;
    Ok(summary(&receipt))
}

/// What of `record.json` the receipt must match; the rest of the JobView is not needed here,
/// whatever fields this client's or a newer server's version of it has.
#[derive(serde::Deserialize)]
struct RecordIds {
    id: JobId,
    sha256: String,
}

fn check_record(dir: &Path, receipt: &Receipt) -> anyhow::Result<()> {
    let path = dir.join(RECORD_FILE);
    let Some(text) = read_file(dir, RECORD_FILE, RECORD_LIMIT)? else {
        return Err(refused(format!(
            "{} is missing: the receipt cannot be matched to the job fetched",
            path.display()
        )));
    };
    let record: RecordIds = serde_json::from_slice(&text)
        .map_err(|e| refused(format!("{} is not a job's record: {e}", path.display())))?;
    if record.id != receipt.job_id {
        return Err(refused(format!(
            "{} is job {}, but the receipt is for job {}",
            path.display(),
            record.id,
            receipt.job_id
        )));
    }
    if record.sha256 != receipt.job_sha256 {
        return Err(refused(format!(
            "{} says job {} is the job file with sha256 {}, but the receipt's runners ran {}",
            path.display(),
            record.id,
            printable(&record.sha256.chars().take(80).collect::<String>()),
            receipt.job_sha256
        )));
    }
    Ok(())
}

fn check_output(dir: &Path, receipt: &Receipt, limits: &Limits) -> anyhow::Result<()> {
    let path = dir.join(ARCHIVE_FILE);
    let verdict = &receipt.verdict;
    let file = open_regular(&path)?;
    let (want, mut file) = match (&verdict.output_sha256, file) {
        (None, None) => return Ok(()),
        (None, Some(_)) => {
            return Err(refused(format!(
                "the receipt says job {} left no output, but there is {}",
                receipt.job_id,
                path.display()
            )));
        }
        (Some(want), None) => {
            return Err(refused(format!(
                "the receipt names an output with sha256 {want}, but {} is missing (fetch the \
                 job again to get it)",
                path.display()
            )));
        }
        (Some(want), Some(file)) => (want, file),
    };
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| local_error("read", &path, e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let got = hex(&hash.finalize());
    if got != *want {
        return Err(refused(format!(
            "{} has sha256 {got}, but the receipt's output is {want}",
            path.display()
        )));
    }
    if let Some(want_tree) = &verdict.output_tree_sha256 {
        // The sha256 matched, so these are the bytes the runners hashed: a tree digest that
        // differs means they signed a tree digest that is not of their own output.
        file.rewind().map_err(|e| local_error("read", &path, e))?;
        let index = archive::index(std::io::BufReader::new(file), limits).map_err(|e| {
            refused(format!(
                "{} cannot be read as an archive to check its tree digest: {:#}",
                path.display(),
                anyhow::Error::from(e)
            ))
        })?;
        if index.tree_sha256 != *want_tree {
            return Err(refused(format!(
                "{} has tree digest {}, but the receipt's output tree is {want_tree}",
                path.display(),
                index.tree_sha256
            )));
        }
    }
    Ok(())
}

/// The line printed on success: the result, who vouches for it (runner, owner, the runner's
/// key id), the output, the server's key id.
fn summary(receipt: &Receipt) -> String {
    let v = &receipt.verdict;
    let outcome = match (v.status, v.job_exit_status) {
        (ReportStatus::Success, _) => "succeeded".to_string(),
        (_, Some(status)) => format!("failed with exit status {status}"),
        (_, None) => "failed".to_string(),
    };
    // The keys name the runners beyond the server's word: a reader who knows a runner's key
    // from its owner can tell it from one the server made up.
    let runners: Vec<String> = receipt
        .votes
        .iter()
        .map(|vote| {
            let key = vote.statement.open().map(|s| key_id(&s.runner_key));
            format!(
                "{} of user {} key {}",
                vote.runner_id,
                vote.owner,
                key.unwrap_or_default()
            )
        })
        .collect();
    let output = match (&v.output_sha256, &v.output_tree_sha256) {
        (Some(sha), Some(tree)) => format!("output sha256 {sha}, tree {tree}"),
        (Some(sha), None) => format!("output sha256 {sha}"),
        _ => "no output".to_string(),
    };
    let quorum = match receipt.ran_alone {
        Some(t) => format!(
            "run alone on its standing in place of a quorum of {} ({} votes agreed in a row, {} \
             asked; {}% of such runs are audited)",
            receipt.quorum, t.agreed_in_row, t.after, t.audit_percent
        ),
        None => format!("quorum {}", receipt.quorum),
    };
    // The attestation first: a script reading the line sees at once whether the result is
    // verified by a quorum, or only checked to be the server's and one runner's word.
    format!(
        "{}: job {} {outcome}, its receipt and output check out; {} of {} agreeing runners ({}), \
         {quorum}; {output}; signed by server key {}",
        receipt.attestation,
        receipt.job_id,
        receipt.votes.len(),
        receipt.replicas,
        runners.join(", "),
        key_id(&receipt.server_key)
    )
}

/// The key `--server-key` names: 64 hex digits, or a file holding them or a server key's
/// JSON. A value that is no key is bad usage.
fn given_key(given: &str) -> anyhow::Result<String> {
    let text = given.trim();
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let key = text.to_ascii_lowercase();
        if !valid_public_key(&key) {
            return Err(fail(
                exit::USAGE,
                format!("--server-key {key} is not an ed25519 public key"),
            ));
        }
        return Ok(key);
    }
    let path = Path::new(given);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(SERVER_KEY_JSON_LIMIT + 1).read_to_end(&mut bytes))
        .map_err(|e| {
            fail(
                exit::USAGE,
                format!(
                    "--server-key {}: neither 64 hex digits nor a file that can be read ({e})",
                    printable(given)
                ),
            )
        })?;
    key_in(&bytes).map_err(|why| {
        fail(
            exit::USAGE,
            format!("--server-key {}: {why}", path.display()),
        )
    })
}

/// The key in a key file's text: a server key's JSON (checked), or 64 hex digits.
fn key_in(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "not text".to_string())?
        .trim();
    if text.starts_with('{') {
        let key: ServerKey =
            serde_json::from_str(text).map_err(|e| format!("not a server key's JSON: {e}"))?;
        key.validate().map_err(|e| e.to_string())?;
        return Ok(key.public_key);
    }
    let key = text.to_ascii_lowercase();
    if valid_public_key(&key) {
        Ok(key)
    } else {
        Err("holds neither a server key's JSON nor the 64 hex digits of an ed25519 key".into())
    }
}

/// The key fetch saved in `DIR/server-key.json`.
fn saved_key(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(SERVER_KEY_FILE);
    let Some(bytes) = read_file(dir, SERVER_KEY_FILE, SERVER_KEY_JSON_LIMIT)? else {
        return Err(refused(format!(
            "{} is missing (the server published no key when this was fetched): pass the \
             server's key with --server-key",
            path.display()
        )));
    };
    let key: ServerKey = serde_json::from_slice(&bytes)
        .map_err(|e| refused(format!("{} is not a server key: {e}", path.display())))?;
    key.validate()
        .map_err(|e| refused(format!("{}: {e}", path.display())))?;
    Ok(key.public_key)
}

/// `dir/name`, whole, or `None` if there is no such file; past `limit` bytes it is refused.
fn read_file(dir: &Path, name: &str, limit: u64) -> anyhow::Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let Some(file) = open_regular(&path)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| local_error("read", &path, e))?;
    if bytes.len() as u64 > limit {
        return Err(refused(format!(
            "{} is larger than the {limit} bytes such a file can have",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// `path` opened if it is a regular file, `None` if there is nothing there. A directory
/// handed over by someone else may hold a link to anything or a FIFO that never ends: only
/// plain files are read.
fn open_regular(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(local_error("look at", path, e)),
    };
    if !meta.is_file() {
        return Err(refused(format!(
            "{} is not a regular file (a link, a directory or a device): refused",
            path.display()
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| local_error("open", path, e))?;
    Ok(Some(file))
}

/// The result does not verify (exit 116).
fn refused(message: String) -> anyhow::Error {
    fail(exit::VERIFY_FAILED, message)
}

/// A file could not be read at all (exit 115): no verdict on the result either way.
fn local_error(doing: &str, path: &Path, e: std::io::Error) -> anyhow::Error {
    fail(exit::LOCAL, format!("{doing} {}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::commands::fetch::tests::text_tar;
    use clap::Parser;
    use construir_api::trust::{Attestation, KeyPair, Statement, Verdict, Vote};
    use construir_api::types::{AttemptId, RunnerId, UserId};

    const JOB_SHA: &str = "abababababababababababababababababababababababababababababababab";

    /// A fetched job 9: its record, its output archive, its receipt by two runners of users 4
    /// and 7, and the server's key.
    struct Fetched {
        dir: tempfile::TempDir,
        server: KeyPair,
        runner_key_ids: Vec<String>,
    }

    fn fetched(output: Option<&[u8]>) -> Fetched {
        let tar = output.map(<[u8]>::to_vec);
        let sha = tar.as_ref().map(|t| hex(&Sha256::digest(t)));
        let tree = tar.as_ref().map(|t| {
            archive::index(&t[..], &Limits::DEFAULT)
                .unwrap()
                .tree_sha256
        });
        fetched_claiming(tar.as_deref(), sha, tree)
    }

    /// As [`fetched`], with the receipt's runners claiming `sha` and `tree` for `archive`.
    fn fetched_claiming(
        archive: Option<&[u8]>,
        sha: Option<String>,
        tree: Option<String>,
    ) -> Fetched {
        let server = KeyPair::generate().unwrap();
        let runners = [KeyPair::generate().unwrap(), KeyPair::generate().unwrap()];
        let vote = |key: &KeyPair, runner: u64, owner: u64, attempt: u64| {
            let statement = Statement {
                v: 1,
                job_id: JobId(9),
                attempt_id: AttemptId(attempt),
                job_sha256: JOB_SHA.into(),
                image: "i0".into(),
                image_digest: None,
                runner_id: RunnerId(runner),
                runner_key: key.public_hex(),
                runner_version: "test".into(),
                backend: "vmm".into(),
                host_kind: "hardware".into(),
                status: ReportStatus::Success,
                job_exit_status: Some(0),
                output_sha256: sha.clone(),
                output_tree_sha256: tree.clone(),
                console_sha256: "cc".repeat(32),
                console_bytes: 0,
                started_ms: 1,
                ended_ms: 2,
            };
            Vote {
                runner_id: RunnerId(runner),
                owner: UserId(owner),
                statement: statement.sign(key),
            }
        };
        let receipt = Receipt {
            v: 1,
            server_key: server.public_hex(),
            job_id: JobId(9),
            job_name: "hello_i0.tar.xz".into(),
            job_sha256: JOB_SHA.into(),
            image: "i0".into(),
            image_digest: None,
            submitter: UserId(1),
            replicas: 2,
            quorum: 2,
            attestation: Attestation::Verified,
            ran_alone: None,
            verdict: Verdict {
                status: ReportStatus::Success,
                job_exit_status: Some(0),
                output_sha256: sha.clone(),
                output_tree_sha256: tree.clone(),
            },
            votes: vec![vote(&runners[0], 3, 4, 11), vote(&runners[1], 5, 7, 12)],
            issued_ms: 3,
        };
        let dir = tempfile::tempdir().unwrap();
        let put = |name: &str, data: &[u8]| std::fs::write(dir.path().join(name), data).unwrap();
        put(
            RECEIPT_FILE,
            serde_json::to_string(&receipt.sign(&server))
                .unwrap()
                .as_bytes(),
        );
        put(
            SERVER_KEY_FILE,
            serde_json::to_string(&ServerKey::of(&server.public_hex()))
                .unwrap()
                .as_bytes(),
        );
        put(RECORD_FILE, record(9, JOB_SHA).as_bytes());
        if let Some(tar) = archive {
            put(ARCHIVE_FILE, tar);
        }
        let runner_key_ids = runners.iter().map(|k| key_id(&k.public_hex())).collect();
        Fetched {
            dir,
            server,
            runner_key_ids,
        }
    }

    fn record(id: u64, sha: &str) -> String {
        serde_json::json!({"id": id, "owner": 1, "name": "hello_i0.tar.xz", "image": "i0",
            "sha256": sha, "state": "succeeded", "a_field_of_a_newer_server": [1]})
        .to_string()
    }

    fn tar() -> Vec<u8> {
        text_tar(&[("hello", "built\n"), ("logs/make.log", "ok\n")])
    }

    fn args(dir: &Path, extra: &[&str]) -> VerifyArgs {
        let mut argv = vec!["construir", "verify", dir.to_str().unwrap()];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Verify(v) => v,
            _ => unreachable!(),
        }
    }

    /// The failure `run` ends with: its exit code and message.
    fn refusal(dir: &Path, extra: &[&str]) -> (u8, String) {
        let e = run(&args(dir, extra)).unwrap_err();
        let f = e.downcast_ref::<exit::Failure>().expect("a Failure");
        (f.code, f.message.clone())
    }

    #[test]
    fn a_result_run_alone_verifies_as_on_standing_and_says_on_what_terms() {
        let f = fetched(Some(&tar()));
        let path = f.dir.path().join(RECEIPT_FILE);
        let signed: SignedReceipt = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut receipt = signed.open(&f.server.public_hex()).unwrap();
        receipt.votes.truncate(1);
        receipt.attestation = Attestation::OnStanding;
        receipt.ran_alone = Some(construir_api::types::RanAlone {
            agreed_in_row: 12,
            after: 10,
            audit_percent: 5,
        });
        let text = serde_json::to_string(&receipt.sign(&f.server)).unwrap();
        std::fs::write(&path, text).unwrap();
        let line = verify(f.dir.path(), &f.server.public_hex(), &Limits::DEFAULT).unwrap();
        assert!(line.starts_with("on-standing: job 9 succeeded"), "{line}");
        assert!(
            line.contains(
                "1 of 2 agreeing runners (3 of user 4 key"
            ) && line.contains(
                "run alone on its standing in place of a quorum of 2 (12 votes agreed in a row, \
                 10 asked; 5% of such runs are audited)"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_good_directory_verifies_with_the_saved_key_or_one_given() {
        let f = fetched(Some(&tar()));
        let line = verify(f.dir.path(), &f.server.public_hex(), &Limits::DEFAULT).unwrap();
        let ids = &f.runner_key_ids;
        let start = format!(
            "verified: job 9 succeeded, its receipt and output check out; 2 of 2 agreeing \
             runners (3 of user 4 key {}, 5 of user 7 key {}), quorum 2; output sha256 ",
            ids[0], ids[1]
        );
        assert!(line.starts_with(&start), "{line}");
        assert!(line.ends_with(&key_id(&f.server.public_hex())), "{line}");
        assert_eq!(run(&args(f.dir.path(), &[])).unwrap(), 0);
        let public = f.server.public_hex();
        assert_eq!(
            run(&args(
                f.dir.path(),
                &["--server-key", &public.to_uppercase()]
            ))
            .unwrap(),
            0
        );
        // A file holding the key's JSON, or its hex with a newline.
        let json = f.dir.path().join("elsewhere.json");
        std::fs::write(
            &json,
            serde_json::to_string(&ServerKey::of(&public)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            run(&args(
                f.dir.path(),
                &["--server-key", json.to_str().unwrap()]
            ))
            .unwrap(),
            0
        );
        let plain = f.dir.path().join("elsewhere.hex");
        std::fs::write(&plain, format!("{public}\n")).unwrap();
        assert_eq!(
            run(&args(
                f.dir.path(),
                &["--server-key", plain.to_str().unwrap()]
            ))
            .unwrap(),
            0
        );
    }

    #[test]
    fn a_result_without_output_verifies_only_without_an_archive() {
        let f = fetched(None);
        let line = verify(f.dir.path(), &f.server.public_hex(), &Limits::DEFAULT).unwrap();
        assert!(line.contains("; no output;"), "{line}");
        std::fs::write(f.dir.path().join(ARCHIVE_FILE), tar()).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("left no output") && message.contains(ARCHIVE_FILE),
            "{message}"
        );
    }

    #[test]
    fn a_changed_byte_in_the_output_archive_is_refused() {
        let f = fetched(Some(&tar()));
        let path = f.dir.path().join(ARCHIVE_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(6).position(|w| w == b"built\n").unwrap();
        bytes[at] = b'B';
        std::fs::write(&path, bytes).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(message.contains("output.archive has sha256"), "{message}");

        std::fs::remove_file(&path).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(message.contains("output.archive is missing"), "{message}");

        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(message.contains("not a regular file"), "{message}");
    }

    #[test]
    fn runners_that_signed_another_tree_digest_than_their_outputs_are_refused() {
        let tar = tar();
        let sha = hex(&Sha256::digest(&tar));
        let f = fetched_claiming(Some(&tar), Some(sha), Some("e".repeat(64)));
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("tree digest") && message.contains(&"e".repeat(64)),
            "{message}"
        );
    }

    #[test]
    fn a_changed_receipt_or_another_servers_key_is_refused() {
        let f = fetched(Some(&tar()));
        let path = f.dir.path().join(RECEIPT_FILE);
        let good = std::fs::read_to_string(&path).unwrap();
        // The job's id inside the signed text, 9 → 8: the JSON still parses, the signature fails.
        let changed = good.replacen("\\\"job_id\\\":9", "\\\"job_id\\\":8", 1);
        assert_ne!(changed, good);
        std::fs::write(&path, &changed).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("receipt.json does not verify") && message.contains("signature"),
            "{message}"
        );

        std::fs::write(&path, "{not json").unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("receipt.json is not a signed receipt"),
            "{message}"
        );

        std::fs::write(&path, &good).unwrap();
        let other = KeyPair::generate().unwrap().public_hex();
        let (code, message) = refusal(f.dir.path(), &["--server-key", &other]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("receipt.json does not verify with server key")
                && message.contains(&other),
            "{message}"
        );
        // The saved key replaced by another: the receipt no longer opens with it.
        std::fs::write(
            f.dir.path().join(SERVER_KEY_FILE),
            serde_json::to_string(&ServerKey::of(&other)).unwrap(),
        )
        .unwrap();
        assert_eq!(refusal(f.dir.path(), &[]).0, exit::VERIFY_FAILED);
        assert_eq!(
            run(&args(
                f.dir.path(),
                &["--server-key", &f.server.public_hex()]
            ))
            .unwrap(),
            0
        );
    }

    #[test]
    fn a_record_of_another_job_is_refused() {
        let f = fetched(Some(&tar()));
        let path = f.dir.path().join(RECORD_FILE);
        std::fs::write(&path, record(10, JOB_SHA)).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("record.json is job 10, but the receipt is for job 9"),
            "{message}"
        );
        std::fs::write(&path, record(9, &"cd".repeat(32))).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("record.json says job 9 is the job file with sha256 cdcd"),
            "{message}"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(refusal(f.dir.path(), &[]).0, exit::VERIFY_FAILED);
    }

    #[test]
    fn missing_or_bad_keys_are_named() {
        let f = fetched(Some(&tar()));
        std::fs::remove_file(f.dir.path().join(SERVER_KEY_FILE)).unwrap();
        let (code, message) = refusal(f.dir.path(), &[]);
        assert_eq!(code, exit::VERIFY_FAILED);
        assert!(
            message.contains("server-key.json is missing") && message.contains("--server-key"),
            "{message}"
        );
        for bad in ["00".repeat(32), "no-such-file".into()] {
            let (code, message) = refusal(f.dir.path(), &["--server-key", &bad]);
            assert_eq!(code, exit::USAGE, "{bad}");
            assert!(message.starts_with("--server-key"), "{message}");
        }
        let garbage = f.dir.path().join("garbage");
        std::fs::write(&garbage, "hello").unwrap();
        let (code, message) = refusal(f.dir.path(), &["--server-key", garbage.to_str().unwrap()]);
        assert_eq!(code, exit::USAGE);
        assert!(
            message.contains("neither a server key's JSON nor"),
            "{message}"
        );
    }
}
