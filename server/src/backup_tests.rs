//! Backup and restore of the embedded default, round trip and refusals; and data directories
//! (databases) of earlier releases migrated on start, on both engines.

use crate::backup::{BackupError, backup, restore};
use crate::flow_tests::{job, send, submit, token};
use crate::http::tests::test_app;
use crate::matching_tests::{call, show};
use crate::replica_tests::{
    claim_and_upload, output, receipt, report, server_key, sha256, statement_of, success, volunteer,
};
use crate::service::{App, Shared};
use crate::test_backends::{Backends, chosen};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use sqlx::Row;

/// A finished job with a console and an output, on `app`: (alice's token, the job's id, the
/// output's bytes).
async fn a_finished_job(app: &Shared) -> (String, u64, Vec<u8>) {
    let alice = token(app, "alice", "submitter").await;
    let s = submit(app, &alice, "kept_t0.tar.xz&private=false", job("kept")).await;
    assert_eq!(s.status, StatusCode::CREATED);
    let id = s.json()["id"].as_u64().unwrap();
    let v = volunteer(app, "volunteer", "home").await;
    let run = success("what the job made");
    let a = claim_and_upload(app, &v, &run).await;
    let piece = call(
        app,
        &a,
        Method::PATCH,
        "log?offset=0",
        Body::from("hello\n"),
    )
    .await;
    assert_eq!(piece.status, StatusCode::ACCEPTED);
    let mut statement = statement_of(app, &v, &a, &run).await;
    statement.console_sha256 = sha256(b"hello\n");
    statement.console_bytes = 6;
    let r = report(app, &a, &run, Some(statement.sign(&v.key))).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(show(app, &alice, id).await["state"], "succeeded");
    settled(app).await;
    (alice, id, run.output)
}

/// Waits until the background work on ended attempts is done (the console compacted into a
/// blob, the output indexed): what a backup holds is then the same on every run.
async fn settled(app: &Shared) {
    for _ in 0..500 {
        let open: i64 = sqlx::query(
            "SELECT COUNT(*) FROM attempts WHERE output_sha256 IS NOT NULL \
             AND (console_sha256 IS NULL OR (output_index_sha256 IS NULL \
             AND output_index_error IS NULL))",
        )
        .fetch_one(app.db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
        if open == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the attempts' consoles were not compacted nor their outputs indexed in 5 s");
}

async fn get(app: &Shared, token: &str, path: &str) -> crate::flow_tests::Answer {
    send(app, Method::GET, path, token, Body::empty(), &[]).await
}

#[tokio::test]
async fn a_backup_made_while_serving_restores_every_job_byte_token_and_the_key() {
    let (d, app) = test_app().await;
    let (alice, id, out) = a_finished_job(&app).await;
    let dest = tempfile::tempdir().unwrap();
    let into = dest.path().join("farm-backup");
    let made = backup(&app.db, &app.blobs, d.path(), None, &into).await;
    if chosen() == Backends::PostgresS3 {
        assert!(matches!(made, Err(BackupError::NotEmbedded)), "{made:?}");
        return;
    }
    let made = made.unwrap();
    assert!(made.missing.is_empty(), "{:?}", made.missing);
    assert_eq!(
        made.blobs, 4,
        "job file, output, its index, console: {made:?}"
    );
    // The server went on (a job submitted after the backup is not in it).
    let later = submit(&app, &alice, "later_t0.tar.xz", job("later")).await;
    assert_eq!(later.status, StatusCode::CREATED);
    let key_before = server_key(&app).await;
    let receipt_before = receipt(&app, &alice, id).await;
    assert_eq!(receipt_before.status, StatusCode::OK);

    // Restored elsewhere, a server started on it serves it all.
    let restored = tempfile::tempdir().unwrap();
    let done = restore(&into, restored.path()).await.unwrap();
    assert_eq!(done.blobs, made.blobs);
    let (db, blobs) = crate::test_backends::open(restored.path()).await;
    let settings = crate::settings::Settings {
        data: restored.path().to_path_buf(),
        ..app.settings.clone()
    };
    let back = App::new(settings, db, blobs).unwrap();
    assert_eq!(
        show(&back, &alice, id).await["state"],
        "succeeded",
        "alice's token works"
    );
    let fetched = get(&back, &alice, &format!("/api/v1/jobs/{id}/output")).await;
    assert_eq!(
        sha256(&fetched.body),
        sha256(&out),
        "the output, byte for byte"
    );
    assert_eq!(out, output("what the job made"));
    let console = get(&back, &alice, &format!("/api/v1/jobs/{id}/log?offset=0")).await;
    assert_eq!(console.body, b"hello\n");
    assert_eq!(server_key(&back).await, key_before, "the same signing key");
    assert_eq!(receipt(&back, &alice, id).await.body, receipt_before.body);
    let gone = get(
        &back,
        &alice,
        &format!("/api/v1/jobs/{}", later.json()["id"]),
    )
    .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "made after the backup");

    // Refusals: a backup over an existing directory, a restore over a database, a damaged blob.
    assert!(matches!(
        backup(&app.db, &app.blobs, d.path(), None, &into).await,
        Err(BackupError::Exists(_))
    ));
    let again = restore(&into, restored.path()).await;
    assert!(matches!(again, Err(BackupError::Exists(_))), "{again:?}");
    // The output's blob (named by the database: a blob only published while the backup ran
    // could be in it unnamed, and a restore needs no such one).
    let out_sha = sha256(&out);
    let blob = into.join("blobs/sha256").join(&out_sha[..2]).join(&out_sha);
    assert!(blob.exists(), "the output is in the backup");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let damaged = restore(&into, fresh.path()).await.unwrap_err().to_string();
    assert!(damaged.contains("other bytes"), "{damaged}");
    assert!(
        !fresh.path().join("construir.db").exists(),
        "nothing is a data directory after a refused restore"
    );
    // A blob swapped for a stray one (the count still right): refused, by the database's names.
    std::fs::remove_file(&blob).unwrap();
    let stray = b"not a blob of this farm";
    let name = sha256(stray);
    let dir = into.join("blobs/sha256").join(&name[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&name), stray).unwrap();
    let swapped = tempfile::tempdir().unwrap();
    let refused = restore(&into, swapped.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("does not hold"), "{refused}");
    assert!(!swapped.path().join("construir.db").exists());
    // That refused restore left its copies behind; one of the whole backup replaces them.
    std::fs::remove_file(dir.join(&name)).unwrap();
    std::fs::write(
        &blob,
        std::fs::read(
            restored
                .path()
                .join("blobs")
                .join(blob.strip_prefix(into.join("blobs")).unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    let redone = restore(&into, swapped.path()).await;
    assert!(redone.is_ok(), "{redone:?}");
}

#[tokio::test]
async fn a_database_of_an_earlier_release_is_migrated_on_start_and_keeps_its_rows() {
    // Each earlier schema (after migration N), with a row that release wrote, opened the way a
    // server's start opens it: its migrations run, the row stays, the back-fills hold.
    let pg = chosen() == Backends::PostgresS3;
    for release in [2, 8, 9] {
        let d = tempfile::tempdir().unwrap();
        sqlx::any::install_default_drivers();
        let (migrator, url) = match pg {
            false => (
                sqlx::migrate!("migrations/sqlite"),
                format!(
                    "sqlite://{}?mode=rwc",
                    d.path().join("construir.db").display()
                ),
            ),
            true => (
                sqlx::migrate!("migrations/postgres"),
                crate::test_backends::new_database()
                    .await
                    .expose()
                    .to_string(),
            ),
        };
        let older = sqlx::AnyPool::connect(&url).await.unwrap();
        migrator.run_to(release, &older).await.unwrap();
        sqlx::query("INSERT INTO users (id, name, created_ms) VALUES (1, 'old', 1)")
            .execute(&older)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO jobs (id, owner, name, image, sha256, size, limits, priority, state, \
             created_ms, claimable_ms, next_deadline_ms, snapshot, version) VALUES \
             (7, 1, 'old_t0.tar.xz', 't0', $1, 1, '{}', 0, 'queued', 1, 1, NULL, '{}', 1)",
        )
        .bind("0".repeat(64))
        .execute(&older)
        .await
        .unwrap();
        older.close().await;
        let db = match pg {
            false => crate::db::Db::open_embedded(d.path()).await.unwrap(),
            true => crate::db::Db::open_postgres(&crate::db::DatabaseUrl::parse(&url).unwrap())
                .await
                .unwrap(),
        };
        let row = sqlx::query("SELECT name, wanted, private, deleted_ms FROM jobs WHERE id = 7")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(row.try_get::<String, _>(0).unwrap(), "old_t0.tar.xz");
        // (PostgreSQL's migrations have no back-fills: no PostgreSQL database predates them.)
        if release < 8 && !pg {
            assert_eq!(
                row.try_get::<i64, _>(1).unwrap(),
                1,
                "a queued job wants a runner"
            );
        }
        if release < 9 && !pg {
            assert_eq!(
                row.try_get::<i64, _>(2).unwrap(),
                1,
                "an old job stays private"
            );
        }
        assert_eq!(row.try_get::<Option<i64>, _>(3).unwrap(), None);
        let applied = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get::<i64, _>(0)
            .unwrap();
        assert_eq!(
            applied as usize,
            migrator.iter().count(),
            "release {release}"
        );
    }
}

#[test]
fn both_engines_have_the_same_migrations() {
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(format!("{}/{dir}", env!("CARGO_MANIFEST_DIR")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names("migrations/sqlite"),
        names("migrations/postgres"),
        "a migration for one engine needs its twin for the other"
    );
}
