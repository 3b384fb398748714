use super::*;
use crate::types::RanAlone;

const JOB_SHA: &str = "ab";
const OUT_SHA: &str = "0f";
const TREE_SHA: &str = "7e";

/// A change made to a good statement (each case names the field it breaks).
type Change = Box<dyn Fn(&mut Statement)>;

fn hex64(pair: &str) -> String {
    pair.repeat(32)
}

/// A statement of runner `runner` (key `key`) about attempt `attempt` of job 9, which
/// succeeded with an output.
fn statement(key: &KeyPair, runner: u64, attempt: u64) -> Statement {
    Statement {
        v: STATEMENT_VERSION,
        job_id: JobId(9),
        attempt_id: AttemptId(attempt),
        job_sha256: hex64(JOB_SHA),
        image: "i0".into(),
        image_digest: Some(hex64("dd")),
        runner_id: RunnerId(runner),
        runner_key: key.public_hex(),
        runner_version: "construir-runner 0.1.0".into(),
        backend: "vmm".into(),
        host_kind: "hardware".into(),
        status: ReportStatus::Success,
        job_exit_status: Some(0),
        output_sha256: Some(hex64(OUT_SHA)),
        output_tree_sha256: Some(hex64(TREE_SHA)),
        console_sha256: hex64("cc"),
        console_bytes: 5,
        started_ms: 1_000,
        ended_ms: 2_000,
    }
}

/// Runners 3 (of user 4) and 5 (of user 7) agree on job 9 of user 1.
struct Fixture {
    server: KeyPair,
    runners: Vec<KeyPair>,
    receipt: Receipt,
}

fn vote(key: &KeyPair, runner: u64, owner: u64, attempt: u64) -> Vote {
    Vote {
        runner_id: RunnerId(runner),
        owner: UserId(owner),
        statement: statement(key, runner, attempt).sign(key),
    }
}

fn fixture() -> Fixture {
    let server = KeyPair::generate().unwrap();
    let runners = vec![KeyPair::generate().unwrap(), KeyPair::generate().unwrap()];
    let receipt = Receipt {
        v: RECEIPT_VERSION,
        server_key: server.public_hex(),
        job_id: JobId(9),
        job_name: "hello_i0.tar.xz".into(),
        job_sha256: hex64(JOB_SHA),
        image: "i0".into(),
        image_digest: Some(hex64("dd")),
        submitter: UserId(1),
        replicas: 2,
        quorum: 2,
        attestation: Attestation::Verified,
        ran_alone: None,
        verdict: Verdict {
            status: ReportStatus::Success,
            job_exit_status: Some(0),
            output_sha256: Some(hex64(OUT_SHA)),
            output_tree_sha256: Some(hex64(TREE_SHA)),
        },
        votes: vec![vote(&runners[0], 3, 4, 11), vote(&runners[1], 5, 7, 12)],
        issued_ms: 3_000,
    };
    Fixture {
        server,
        runners,
        receipt,
    }
}

impl Fixture {
    fn open(&self) -> Result<Receipt, TrustError> {
        self.receipt
            .sign(&self.server)
            .open(&self.server.public_hex())
    }
}

/// `text` with the byte at `at` changed to another printable one (so it stays a string).
fn flipped(text: &str, at: usize) -> String {
    let mut bytes = text.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'a' { b'b' } else { b'a' };
    String::from_utf8(bytes).unwrap()
}

#[test]
fn keys_round_trip_through_hex_and_never_print_their_secret() {
    let key = KeyPair::generate().unwrap();
    let again = KeyPair::from_seed_hex(&format!("  {}\n", key.seed_hex())).unwrap();
    assert_eq!(again.public_hex(), key.public_hex());
    assert_eq!(key.public_hex().len(), 64);
    assert!(valid_public_key(&key.public_hex()));
    assert_ne!(KeyPair::generate().unwrap().public_hex(), key.public_hex());
    let debug = format!("{key:?}");
    assert!(!debug.contains(&key.seed_hex()), "{debug}");
    assert!(debug.contains(&key.public_hex()), "{debug}");
    let seed = key.seed_hex();
    for bad in [
        seed.to_uppercase(),
        seed[..62].to_string(),
        format!("{seed}00"),
        "zz".repeat(32),
    ] {
        let e = KeyPair::from_seed_hex(&bad).unwrap_err();
        assert!(matches!(e, TrustError::Hex { digits: 64, .. }), "{e:?}");
        assert!(
            !e.to_string().contains(&seed[..16]),
            "the seed is not echoed: {e}"
        );
    }
}

#[test]
fn signatures_are_checked_strictly_and_by_context() {
    let key = KeyPair::generate().unwrap();
    let public = key.public_hex();
    let sig = key.sign(STATEMENT_CONTEXT, b"payload");
    assert_eq!(sig.len(), 128);
    verify_signature(&public, STATEMENT_CONTEXT, b"payload", &sig).unwrap();
    for (context, payload) in [
        (RECEIPT_CONTEXT, &b"payload"[..]),
        (STATEMENT_CONTEXT, b"payloaD"),
    ] {
        let e = verify_signature(&public, context, payload, &sig).unwrap_err();
        assert!(matches!(e, TrustError::BadSignature { .. }), "{e:?}");
    }
    let other = KeyPair::generate().unwrap().public_hex();
    assert!(verify_signature(&other, STATEMENT_CONTEXT, b"payload", &sig).is_err());
    let e =
        verify_signature(&public, STATEMENT_CONTEXT, b"payload", &sig.to_uppercase()).unwrap_err();
    assert!(matches!(e, TrustError::Hex { digits: 128, .. }), "{e:?}");
    // The identity point (a small-order key) would accept forged signatures: it is no key.
    let identity = format!("01{}", "00".repeat(31));
    assert!(!valid_public_key(&identity));
    assert!(!valid_public_key(&public.to_uppercase()));
    assert!(!valid_public_key(&public[..62]));
}

#[test]
fn key_ids_and_server_keys() {
    let key = KeyPair::generate().unwrap();
    let id = key_id(&key.public_hex());
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    // sha256 of 32 zero bytes begins 66687aadf862bd77.
    assert_eq!(key_id(&"00".repeat(32)), "66687aadf862bd77");
    assert_eq!(key_id("not a key"), "");
    let served = ServerKey::of(&key.public_hex());
    served.validate().unwrap();
    let json = serde_json::to_value(&served).unwrap();
    assert_eq!(json["algorithm"], "ed25519");
    assert_eq!(json["key_id"], id.as_str());
    let mut wrong_id = served.clone();
    wrong_id.key_id = "0".repeat(16);
    assert!(
        matches!(wrong_id.validate(), Err(TrustError::InvalidServerKey(f)) if f.field == "key_id")
    );
    let mut wrong_algorithm = served.clone();
    wrong_algorithm.algorithm = "rsa".into();
    assert!(
        matches!(wrong_algorithm.validate(), Err(TrustError::InvalidServerKey(f)) if f.field == "algorithm")
    );
    assert!(ServerKey::of("garbage").validate().is_err());
    let text = r#"{"algorithm": "ed25519", "public_key": "x", "key_id": "y", "extra": 1}"#;
    assert!(serde_json::from_str::<ServerKey>(text).is_err());
}

#[test]
fn a_statement_round_trips_and_any_changed_byte_is_refused() {
    let key = KeyPair::generate().unwrap();
    let s = statement(&key, 3, 11);
    let signed = s.sign(&key);
    assert_eq!(signed.open().unwrap(), s);
    for at in 0..signed.statement.len() {
        let changed = SignedStatement {
            statement: flipped(&signed.statement, at),
            ..signed.clone()
        };
        assert!(
            changed.open().is_err(),
            "byte {at} of the statement changed"
        );
    }
    for at in 0..signed.signature.len() {
        let changed = SignedStatement {
            signature: flipped(&signed.signature, at),
            ..signed.clone()
        };
        let e = changed.open().unwrap_err();
        assert!(
            matches!(e, TrustError::BadSignature { .. } | TrustError::Hex { .. }),
            "byte {at}: {e:?}"
        );
    }
}

#[test]
fn a_statement_signed_by_another_key_than_its_runner_key_is_refused() {
    let key = KeyPair::generate().unwrap();
    let thief = KeyPair::generate().unwrap();
    let e = statement(&key, 3, 11).sign(&thief).open().unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::BadSignature {
                what: "the statement",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains(&key.public_hex()), "{e}");
}

#[test]
fn statements_with_bad_fields_unknown_fields_or_too_many_bytes_are_refused() {
    let key = KeyPair::generate().unwrap();
    let good = statement(&key, 3, 11);
    let cases: Vec<(&str, Change)> = vec![
        ("v", Box::new(|s| s.v = 2)),
        ("job_sha256", Box::new(|s| s.job_sha256 = "AB".repeat(32))),
        ("image", Box::new(|s| s.image = "../x".into())),
        (
            "image_digest",
            Box::new(|s| s.image_digest = Some("d".into())),
        ),
        ("runner_key", Box::new(|s| s.runner_key = "00".repeat(32))),
        (
            "runner_version",
            Box::new(|s| s.runner_version = "x\u{1b}[2J".into()),
        ),
        (
            "runner_version",
            Box::new(|s| s.runner_version = "v".repeat(65)),
        ),
        ("backend", Box::new(|s| s.backend = "VMM".into())),
        ("host_kind", Box::new(|s| s.host_kind = String::new())),
        ("job_exit_status", Box::new(|s| s.job_exit_status = Some(1))),
        // (An output without a tree is its runner's unreadable output: valid.)
        ("output_tree_sha256", Box::new(|s| s.output_sha256 = None)),
        (
            "console_sha256",
            Box::new(|s| s.console_sha256 = "c".into()),
        ),
    ];
    for (field, change) in cases {
        let mut s = good.clone();
        change(&mut s);
        match s.sign(&key).open() {
            Err(TrustError::InvalidStatement(f)) => assert_eq!(f.field, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut text: serde_json::Value = serde_json::from_str(&good.sign(&key).statement).unwrap();
    text["note"] = "hello".into();
    let text = text.to_string();
    let signed = SignedStatement {
        signature: key.sign(STATEMENT_CONTEXT, text.as_bytes()),
        statement: text,
    };
    let e = signed.open().unwrap_err();
    assert!(
        matches!(e, TrustError::Parse { .. }) && e.to_string().contains("note"),
        "{e}"
    );
    let mut big = good.clone();
    big.runner_version = String::new();
    let padded = big.sign(&key).statement.replace(
        "\"runner_version\":\"\"",
        &format!("\"runner_version\":\"{}\"", " ".repeat(MAX_STATEMENT_BYTES)),
    );
    let signed = SignedStatement {
        signature: key.sign(STATEMENT_CONTEXT, padded.as_bytes()),
        statement: padded,
    };
    assert!(matches!(
        signed.open(),
        Err(TrustError::TooLarge {
            max: MAX_STATEMENT_BYTES,
            ..
        })
    ));
    // A statement written twice with one field in each is no statement.
    let twice = r#"{"statement": "a", "statement": "b", "signature": "c"}"#;
    assert!(serde_json::from_str::<SignedStatement>(twice).is_err());
}

#[test]
fn a_receipt_round_trips_and_any_changed_byte_is_refused() {
    let f = fixture();
    let signed = f.receipt.sign(&f.server);
    let opened = signed.open(&f.server.public_hex()).unwrap();
    assert_eq!(opened, f.receipt);
    let travelled: SignedReceipt =
        serde_json::from_str(&serde_json::to_string(&signed).unwrap()).unwrap();
    assert_eq!(travelled.open(&f.server.public_hex()).unwrap(), f.receipt);
    // Every byte of the receipt text, a statement's text nested in it included.
    for at in (0..signed.receipt.len()).step_by(3) {
        let changed = SignedReceipt {
            receipt: flipped(&signed.receipt, at),
            ..signed.clone()
        };
        assert!(
            changed.open(&f.server.public_hex()).is_err(),
            "byte {at} of the receipt changed"
        );
    }
    for at in 0..signed.signature.len() {
        let changed = SignedReceipt {
            signature: flipped(&signed.signature, at),
            ..signed.clone()
        };
        assert!(
            changed.open(&f.server.public_hex()).is_err(),
            "byte {at} of the signature"
        );
    }
}

#[test]
fn a_receipt_signed_by_another_server_key_is_refused() {
    let f = fixture();
    let other = KeyPair::generate().unwrap();
    let signed = f.receipt.sign(&other);
    let e = signed.open(&f.server.public_hex()).unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::BadSignature {
                what: "the receipt",
                ..
            }
        ),
        "{e:?}"
    );
    // Signed by the key it is checked with, but saying it is another's.
    let e = signed.open(&other.public_hex()).unwrap_err();
    assert!(matches!(e, TrustError::ServerKeyMismatch { .. }), "{e:?}");
    let e = f.receipt.sign(&f.server).open("not a key").unwrap_err();
    assert!(matches!(e, TrustError::Hex { .. }), "{e:?}");
}

#[test]
fn a_vote_for_another_job_or_verdict_is_refused_naming_the_field() {
    let cases: Vec<(&str, Change)> = vec![
        ("job_id", Box::new(|s| s.job_id = JobId(10))),
        ("job_sha256", Box::new(|s| s.job_sha256 = hex64("ee"))),
        ("image", Box::new(|s| s.image = "t0".into())),
        ("image_digest", Box::new(|s| s.image_digest = None)),
        ("runner_id", Box::new(|s| s.runner_id = RunnerId(6))),
        (
            "status",
            Box::new(|s| {
                s.status = ReportStatus::Failed;
                s.job_exit_status = Some(2);
            }),
        ),
        (
            "output_sha256",
            Box::new(|s| {
                s.output_sha256 = None;
                s.output_tree_sha256 = None;
            }),
        ),
        (
            "output_tree_sha256",
            Box::new(|s| s.output_tree_sha256 = Some(hex64("02"))),
        ),
    ];
    // Another archive of the same tree agrees (a tar's times differ between runners); the
    // first vote's archive is the verdict's, exactly; a vote whose runner could not read its
    // output (no tree) stands on the server's index.
    let mut f = fixture();
    let mut s = statement(&f.runners[1], 5, 12);
    s.output_sha256 = Some(hex64("01"));
    f.receipt.votes[1].statement = s.sign(&f.runners[1]);
    f.open().expect("another archive of the same tree agrees");
    let mut f = fixture();
    let mut s = statement(&f.runners[1], 5, 12);
    s.output_tree_sha256 = None;
    f.receipt.votes[1].statement = s.sign(&f.runners[1]);
    f.open()
        .expect("an unread tree stands on the server's index");
    let mut f = fixture();
    let mut s = statement(&f.runners[0], 3, 11);
    s.output_sha256 = Some(hex64("01"));
    f.receipt.votes[0].statement = s.sign(&f.runners[0]);
    match f.open() {
        Err(TrustError::VoteMismatch {
            vote: 1,
            field: "output_sha256",
            ..
        }) => {}
        other => panic!("the first vote's archive is the verdict's: {other:?}"),
    }
    for (field, change) in cases {
        let mut f = fixture();
        let mut s = statement(&f.runners[1], 5, 12);
        change(&mut s);
        f.receipt.votes[1].statement = s.sign(&f.runners[1]);
        match f.open() {
            Err(TrustError::VoteMismatch {
                vote: 2,
                field: got,
                ..
            }) => assert_eq!(got, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut f = fixture();
    f.receipt.votes[0].statement.signature = f.receipt.votes[1].statement.signature.clone();
    let e = f.open().unwrap_err();
    assert!(
        matches!(&e, TrustError::VoteStatement { vote: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("vote 1 (runner 3): the statement does not bear"),
        "{e}"
    );
}

#[test]
fn votes_must_not_share_an_owner_a_runner_a_key_or_an_attempt() {
    let mut f = fixture();
    f.receipt.votes[1].owner = UserId(4);
    let e = f.open().unwrap_err();
    assert!(
        matches!(
            &e,
            TrustError::SharedByVotes {
                what: "owner",
                first: 1,
                second: 2,
                ..
            }
        ),
        "{e:?}"
    );

    let mut f = fixture();
    f.receipt.votes[1] = vote(&f.runners[1], 3, 7, 12);
    let e = f.open().unwrap_err();
    assert!(
        matches!(&e, TrustError::SharedByVotes { what: "runner", .. }),
        "{e:?}"
    );

    let mut f = fixture();
    f.receipt.votes[1] = vote(&f.runners[0], 5, 7, 12);
    let e = f.open().unwrap_err();
    assert!(
        matches!(
            &e,
            TrustError::SharedByVotes {
                what: "runner key",
                ..
            }
        ),
        "{e:?}"
    );

    let mut f = fixture();
    f.receipt.votes[1] = vote(&f.runners[1], 5, 7, 11);
    let e = f.open().unwrap_err();
    assert!(
        matches!(
            &e,
            TrustError::SharedByVotes {
                what: "attempt",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("votes 1 and 2 share attempt 11"),
        "{e}"
    );
}

#[test]
fn a_receipt_needs_its_quorum_of_votes() {
    let mut f = fixture();
    f.receipt.votes.pop();
    let e = f.open().unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::Quorum {
                votes: 1,
                quorum: 2,
                replicas: 2
            }
        ),
        "{e:?}"
    );
    for (quorum, replicas) in [(0, 2), (3, 2)] {
        let mut f = fixture();
        (f.receipt.quorum, f.receipt.replicas) = (quorum, replicas);
        assert!(
            matches!(f.open(), Err(TrustError::Quorum { .. })),
            "{quorum} of {replicas}"
        );
    }
    // More agreeing votes than the quorum are fine.
    let mut f = fixture();
    f.receipt.quorum = 1;
    f.receipt.attestation = Attestation::Unverified;
    f.open().unwrap();
}

#[test]
fn the_attestation_must_be_what_the_votes_make_it() {
    assert_eq!(
        attestation_of(2, &[UserId(4), UserId(7)], UserId(1), false),
        Attestation::Verified
    );
    assert_eq!(
        attestation_of(1, &[UserId(4), UserId(7)], UserId(1), false),
        Attestation::Unverified
    );
    assert_eq!(
        attestation_of(2, &[UserId(4), UserId(4)], UserId(1), false),
        Attestation::Unverified
    );
    assert_eq!(
        attestation_of(1, &[UserId(4)], UserId(1), false),
        Attestation::Unverified
    );
    assert_eq!(
        attestation_of(2, &[UserId(1), UserId(1)], UserId(1), false),
        Attestation::SelfAttested
    );
    assert_eq!(
        attestation_of(1, &[], UserId(1), false),
        Attestation::Unverified
    );
    assert_eq!(
        serde_json::to_string(&Attestation::SelfAttested).unwrap(),
        "\"self-attested\""
    );

    let mut f = fixture();
    f.receipt.attestation = Attestation::Unverified;
    let e = f.open().unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::WrongAttestation {
                claimed: Attestation::Unverified,
                actual: Attestation::Verified,
                ..
            }
        ),
        "{e:?}"
    );
    // One runner of the submitter's own, claimed as verified.
    let mut f = fixture();
    f.receipt.votes.truncate(1);
    f.receipt.votes[0].owner = UserId(1);
    (f.receipt.quorum, f.receipt.replicas) = (1, 1);
    let e = f.open().unwrap_err();
    assert!(
        e.to_string().contains("its votes make it self-attested"),
        "{e}"
    );
    f.receipt.attestation = Attestation::SelfAttested;
    assert_eq!(f.open().unwrap().attestation, Attestation::SelfAttested);
}

#[test]
fn a_result_run_alone_is_on_standing_with_one_vote_and_terms_that_hold() {
    assert_eq!(
        attestation_of(2, &[UserId(4)], UserId(1), true),
        Attestation::OnStanding
    );
    // The submitter's own runner, alone: its word is still the submitter's.
    assert_eq!(
        attestation_of(2, &[UserId(1)], UserId(1), true),
        Attestation::SelfAttested
    );
    let terms = RanAlone {
        agreed_in_row: 12,
        after: 10,
        audit_percent: 10,
    };
    let alone = || {
        let mut f = fixture();
        f.receipt.votes.truncate(1);
        f.receipt.ran_alone = Some(terms);
        f.receipt.attestation = Attestation::OnStanding;
        f
    };
    let opened = alone().open().unwrap();
    assert_eq!(opened.attestation, Attestation::OnStanding);
    assert_eq!(opened.ran_alone, Some(terms));
    // The same one vote without the terms is short of its quorum of 2.
    let mut f = alone();
    f.receipt.ran_alone = None;
    assert!(matches!(f.open(), Err(TrustError::Quorum { .. })));
    // Called verified, it is refused: one runner verifies nothing.
    let mut f = alone();
    f.receipt.attestation = Attestation::Verified;
    assert!(
        matches!(
            f.open(),
            Err(TrustError::WrongAttestation {
                actual: Attestation::OnStanding,
                ..
            })
        ),
        "{:?}",
        f.open()
    );
    // Terms that do not hold.
    let mut two = fixture();
    two.receipt.ran_alone = Some(terms);
    two.receipt.attestation = Attestation::OnStanding;
    let short = RanAlone {
        agreed_in_row: 3,
        ..terms
    };
    let nothing_asked = RanAlone {
        agreed_in_row: 0,
        after: 0,
        ..terms
    };
    let chance = RanAlone {
        audit_percent: 101,
        ..terms
    };
    let mut quorum_one = alone();
    (quorum_one.receipt.quorum, quorum_one.receipt.replicas) = (1, 1);
    let mut cases = vec![(two, "2 votes instead of that runner's one".to_string())];
    for (t, why) in [
        (short, "3 votes agreed in a row, short of the 10 asked"),
        (nothing_asked, "no votes at all"),
        (chance, "an audit chance of 101%"),
    ] {
        let mut f = alone();
        f.receipt.ran_alone = Some(t);
        cases.push((f, why.to_string()));
    }
    cases.push((quorum_one, "its quorum is 1".to_string()));
    for (f, why) in cases {
        let e = f.open().unwrap_err();
        assert!(matches!(e, TrustError::RanAlone(_)), "{e:?}");
        assert!(e.to_string().contains(&why), "{e} / {why}");
    }
}

#[test]
fn a_receipt_for_a_runners_failure_or_with_bad_fields_is_refused() {
    let mut f = fixture();
    for (i, key) in f.runners.iter().enumerate() {
        let mut s = statement(key, [3, 5][i], [11, 12][i]);
        (
            s.status,
            s.job_exit_status,
            s.output_sha256,
            s.output_tree_sha256,
        ) = (ReportStatus::TimedOut, None, None, None);
        f.receipt.votes[i].statement = s.sign(key);
    }
    f.receipt.verdict = Verdict {
        status: ReportStatus::TimedOut,
        job_exit_status: None,
        output_sha256: None,
        output_tree_sha256: None,
    };
    assert!(matches!(
        f.open(),
        Err(TrustError::VerdictNotOutcome(ReportStatus::TimedOut))
    ));

    let mut f = fixture();
    f.receipt.job_name = "a\nb".into();
    assert!(matches!(f.open(), Err(TrustError::InvalidReceipt(e)) if e.field == "job_name"));
    let mut f = fixture();
    f.receipt.v = 2;
    assert!(matches!(f.open(), Err(TrustError::InvalidReceipt(e)) if e.field == "v"));
}

#[test]
fn receipts_with_unknown_fields_or_too_many_bytes_are_refused() {
    let f = fixture();
    let mut value = serde_json::to_value(&f.receipt).unwrap();
    value["verdict"]["note"] = "trust me".into();
    let text = value.to_string();
    let signed = SignedReceipt {
        signature: f.server.sign(RECEIPT_CONTEXT, text.as_bytes()),
        receipt: text,
    };
    let e = signed.open(&f.server.public_hex()).unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::Parse {
                what: "the receipt",
                ..
            }
        ),
        "{e:?}"
    );

    let mut big = f.receipt.clone();
    big.job_name = "x".repeat(MAX_RECEIPT_BYTES);
    let signed = big.sign(&f.server);
    let e = signed.open(&f.server.public_hex()).unwrap_err();
    assert!(
        matches!(
            e,
            TrustError::TooLarge {
                what: "the receipt",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_statement_never_passes_as_a_receipt_nor_the_reverse() {
    // One key signs both: only the context tells them apart.
    let key = KeyPair::generate().unwrap();
    let mut f = fixture();
    f.receipt.server_key = key.public_hex();
    let receipt = f.receipt.sign(&key);
    let as_statement = SignedStatement {
        statement: receipt.receipt.clone(),
        signature: receipt.signature.clone(),
    };
    assert!(as_statement.open().is_err());

    let statement = statement(&key, 3, 11).sign(&key);
    let as_receipt = SignedReceipt {
        receipt: statement.statement.clone(),
        signature: statement.signature.clone(),
    };
    let e = as_receipt.open(&key.public_hex()).unwrap_err();
    assert!(matches!(e, TrustError::BadSignature { .. }), "{e:?}");
    // Were the statement's text signed as a receipt, it would still not parse as one.
    let resigned = SignedReceipt {
        signature: key.sign(RECEIPT_CONTEXT, statement.statement.as_bytes()),
        receipt: statement.statement,
    };
    assert!(matches!(
        resigned.open(&key.public_hex()),
        Err(TrustError::Parse { .. })
    ));
}
