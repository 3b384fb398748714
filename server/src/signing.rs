//! The server's signing key: the ed25519 key its receipts are signed with, kept as a hex seed
//! in one file that only the server may read, and published (its public half) at
//! `/.well-known/construir/server-key`.
//!
//! The key is made once, on the first start, and kept: every receipt ever issued names it, and a
//! verifier that saved it once checks later receipts against it. So the file is never
//! replaced: it is created through a temporary file and a rename that refuses to overwrite, and
//! two servers starting at once on one data directory end with one key, not one each.

use construir_api::keyfile;
use construir_api::trust::{KeyPair, Receipt, ServerKey, SignedReceipt};
use std::path::Path;

/// Why the server's key could not be loaded or made (a key file's errors: a link, a file open
/// to other users, no key in it).
pub type SigningError = keyfile::KeyFileError;

/// The server's key pair and what it publishes of it.
#[derive(Debug)]
pub struct ServerSigner {
    key: KeyPair,
    public: ServerKey,
}

impl ServerSigner {
    /// The key in `path`, made there first if there is no file: a file that exists must be a
    /// regular file (not a link) readable by its owner only ([`keyfile::load_or_create`]).
    pub fn load_or_create(path: &Path) -> Result<ServerSigner, SigningError> {
        let (key, made) = keyfile::load_or_create(path, "server's")?;
        let signer = ServerSigner {
            public: ServerKey::of(&key.public_hex()),
            key,
        };
        tracing::info!(
            path = %path.display(),
            key_id = %signer.public.key_id,
            "{} the server's signing key",
            if made { "created" } else { "loaded" }
        );
        Ok(signer)
    }

    /// What `/.well-known/construir/server-key` serves.
    pub fn public(&self) -> &ServerKey {
        &self.public
    }

    /// `receipt` signed with the server's key. It is signed naming this key as its
    /// `server_key`, whatever the receipt said: one naming another key would never open.
    pub fn sign_receipt(&self, receipt: &Receipt) -> SignedReceipt {
        let mut receipt = receipt.clone();
        receipt.server_key.clone_from(&self.public.public_key);
        receipt.sign(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use construir_api::trust::{Attestation, Statement, Verdict, Vote};
    use construir_api::types::{AttemptId, JobId, ReportStatus, RunnerId, UserId};
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_key_is_created_private_once_and_loaded_the_same_after() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("server-key");
        let made = ServerSigner::load_or_create(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        made.public().validate().unwrap();
        let loaded = ServerSigner::load_or_create(&path).unwrap();
        assert_eq!(loaded.public(), made.public());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(
            !format!("{made:?}").contains(text.trim()),
            "the seed is not printed"
        );
        let entries = std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(entries, 1, "no temporary file left");
    }

    #[test]
    fn servers_starting_together_end_with_one_key() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("server-key");
        let keys: Vec<String> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..4)
                .map(|_| s.spawn(|| ServerSigner::load_or_create(&path).unwrap()))
                .collect();
            starts
                .into_iter()
                .map(|h| h.join().unwrap().public().public_key.clone())
                .collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        let on_disk = ServerSigner::load_or_create(&path).unwrap();
        assert_eq!(on_disk.public().public_key, keys[0]);
    }

    #[test]
    fn a_key_file_others_may_read_is_refused_naming_chmod() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("server-key");
        ServerSigner::load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ServerSigner::load_or_create(&path).unwrap_err();
        assert!(
            matches!(e, SigningError::TooOpen { mode: 0o644, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        ServerSigner::load_or_create(&path).unwrap();
    }

    #[test]
    fn a_symlink_a_directory_or_garbage_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real-key");
        ServerSigner::load_or_create(&real).unwrap();
        let link = d.path().join("server-key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ServerSigner::load_or_create(&link).unwrap_err();
        assert!(matches!(e, SigningError::Symlink { .. }), "{e:?}");

        let dir = d.path().join("a-directory");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = ServerSigner::load_or_create(&dir).unwrap_err();
        assert!(matches!(e, SigningError::NotAFile { .. }), "{e:?}");

        let garbage = d.path().join("garbage");
        std::fs::write(&garbage, "this is no key\n").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = ServerSigner::load_or_create(&garbage).unwrap_err();
        assert!(matches!(e, SigningError::NotAKey { .. }), "{e:?}");
        assert_eq!(
            std::fs::read_to_string(&garbage).unwrap(),
            "this is no key\n"
        );

        let e = ServerSigner::load_or_create(&d.path().join("missing/server-key")).unwrap_err();
        assert!(matches!(e, SigningError::Io { .. }), "{e:?}");
    }

    #[test]
    fn receipts_are_signed_naming_the_servers_key_and_open_with_it() {
        let d = tempfile::tempdir().unwrap();
        let signer = ServerSigner::load_or_create(&d.path().join("server-key")).unwrap();
        let runner = KeyPair::generate().unwrap();
        let sha = |pair: &str| pair.repeat(32);
        let statement = Statement {
            v: 1,
            job_id: JobId(9),
            attempt_id: AttemptId(11),
            job_sha256: sha("ab"),
            image: "i0".into(),
            image_digest: None,
            runner_id: RunnerId(3),
            runner_key: runner.public_hex(),
            runner_version: "test".into(),
            backend: "vmm".into(),
            host_kind: "hardware".into(),
            status: ReportStatus::Failed,
            job_exit_status: Some(2),
            output_sha256: None,
            output_tree_sha256: None,
            console_sha256: sha("cc"),
            console_bytes: 0,
            started_ms: 1,
            ended_ms: 2,
        };
        let receipt = Receipt {
            v: 1,
            server_key: "not yet known".into(),
            job_id: JobId(9),
            job_name: "hello_i0.tar.xz".into(),
            job_sha256: sha("ab"),
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
                output_sha256: None,
                output_tree_sha256: None,
            },
            votes: vec![Vote {
                runner_id: RunnerId(3),
                owner: UserId(4),
                statement: statement.sign(&runner),
            }],
            issued_ms: 3,
        };
        let signed = signer.sign_receipt(&receipt);
        let opened = signed.open(&signer.public().public_key).unwrap();
        assert_eq!(opened.server_key, signer.public().public_key);
        assert_eq!(opened.votes, receipt.votes);
        let stranger = KeyPair::generate().unwrap();
        assert!(signed.open(&stranger.public_hex()).is_err());
    }
}
