//! Images served by digest: publishing from an images directory, listing, republishing, a new
//! build, refused manifests, jobs pinned at submit, and the orphan collector keeping image blobs.

use crate::flow_tests::{Answer, job, send, submit, token};
use crate::http::tests::test_app;
use crate::images::{ImageError, publish};
use crate::service::Shared;
use axum::body::Body;
use axum::http::{Method, StatusCode};
use construir_contract::manifest::ImageManifest;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, SystemTime};

fn sha(bytes: &[u8]) -> String {
    crate::tokens::hex(&Sha256::digest(bytes))
}

const KERNEL: &str = "kernels/vmlinux-test";

/// Writes image `index` into `dir`: a fake kernel and qcow2, and a manifest naming their
/// sha256s. Returns the manifest's bytes.
pub(crate) fn write_image(dir: &Path, index: &str, qcow2: &[u8]) -> Vec<u8> {
    let kernel = b"not really an ELF vmlinux";
    std::fs::create_dir_all(dir.join("kernels")).unwrap();
    std::fs::write(dir.join(KERNEL), kernel).unwrap();
    std::fs::write(dir.join(format!("{index}.qcow2")), qcow2).unwrap();
    let manifest = ImageManifest {
        index: index.into(),
        description: "test".into(),
        disk: format!("{index}.qcow2"),
        disk_format: "qcow2".into(),
        disk_sha256: sha(qcow2),
        virtual_size: 1 << 20,
        kernel: KERNEL.into(),
        kernel_sha256: sha(kernel),
        memory_mib: 256,
        vcpus: 1,
        init_sha256: "2".repeat(64),
        installed: vec!["busybox".into()],
        build_key: "k".into(),
        tools: Default::default(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(dir.join(format!("{index}.json")), &bytes).unwrap();
    bytes
}

async fn listed(app: &Shared, token: &str) -> Vec<Value> {
    let a = send(
        app,
        Method::GET,
        "/api/v1/images",
        token,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json().as_array().unwrap().clone()
}

#[tokio::test]
async fn publishing_lists_the_image_and_republishing_changes_nothing() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    let manifest = write_image(images.path(), "t0", b"qcow2 bits, first build");
    let first = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    assert!(first.changed);
    assert_eq!(
        first.digest,
        sha(&manifest),
        "the digest is the manifest's sha256"
    );
    for blob in [
        &first.digest,
        &sha(b"qcow2 bits, first build"),
        &sha(b"not really an ELF vmlinux"),
    ] {
        assert!(app.blobs.info(blob).await.unwrap().is_some(), "{blob}");
    }

    // Any valid token may list: a runner's too.
    let runner = token(&app, "volunteer", "runner").await;
    let list = listed(&app, &runner).await;
    assert_eq!(list.len(), 1);
    let img = &list[0];
    assert_eq!(img["index"], "t0");
    assert_eq!(img["digest"], first.digest.as_str());
    assert_eq!(img["manifest_sha256"], first.digest.as_str());
    assert_eq!(img["manifest_size"], manifest.len() as u64);
    assert_eq!(
        img["qcow2_sha256"],
        sha(b"qcow2 bits, first build").as_str()
    );
    assert_eq!(img["qcow2_size"], 23);
    assert_eq!(img["kernel_size"], 25);
    assert_eq!(img["current"], true);
    assert!(img["published_ms"].as_u64().unwrap() > 0);
    let no_token = send(
        &app,
        Method::GET,
        "/api/v1/images",
        "nope",
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);

    // The same bits again: nothing changes.
    let again = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    assert_eq!(again.digest, first.digest);
    assert!(!again.changed);
    assert_eq!(listed(&app, &runner).await, list);
}

#[tokio::test]
async fn a_new_build_becomes_current_and_the_old_stays_listed() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    write_image(images.path(), "t0", b"first build");
    let old = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    write_image(images.path(), "t0", b"second build");
    let new = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    assert!(new.changed);
    assert_ne!(new.digest, old.digest);
    assert_eq!(
        app.db.current_image("t0").await.unwrap(),
        Some(new.digest.clone())
    );
    assert_eq!(app.db.current_image("i0").await.unwrap(), None);

    let alice = token(&app, "alice", "submitter").await;
    let list = listed(&app, &alice).await;
    let seen: Vec<_> = list
        .iter()
        .map(|i| {
            (
                i["digest"].as_str().unwrap(),
                i["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(new.digest.as_str(), true), (old.digest.as_str(), false)],
        "newest first, only the newest current"
    );
}

#[tokio::test]
async fn unsafe_or_mismatched_manifests_are_refused() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    let dir = images.path();
    write_image(dir, "t0", b"bits");
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("t0.json")).unwrap()).unwrap();
    m["disk"] = "../x".into();
    std::fs::write(dir.join("t0.json"), m.to_string()).unwrap();
    let err = publish(&app.db, &app.blobs, dir, "t0").await.unwrap_err();
    assert!(matches!(err, ImageError::Manifest(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("refused") && text.contains("plain file name"),
        "{text}"
    );

    m["disk"] = "t0.qcow2".into();
    m["kernel"] = "../x".into();
    std::fs::write(dir.join("t0.json"), m.to_string()).unwrap();
    let err = publish(&app.db, &app.blobs, dir, "t0").await.unwrap_err();
    assert!(err.to_string().contains("plain file name"), "{err}");

    // A qcow2 that is not what the manifest says.
    m["kernel"] = KERNEL.into();
    std::fs::write(dir.join("t0.json"), m.to_string()).unwrap();
    std::fs::write(dir.join("t0.qcow2"), b"other bits").unwrap();
    let err = publish(&app.db, &app.blobs, dir, "t0").await.unwrap_err();
    assert!(err.to_string().contains("but the manifest says"), "{err}");

    // A qcow2 past the cap its declared virtual size allows.
    let big = vec![0u8; 128 << 20];
    m["disk_sha256"] = sha(&big).into();
    m["virtual_size"] = 4096.into();
    std::fs::write(dir.join("t0.qcow2"), &big).unwrap();
    std::fs::write(dir.join("t0.json"), m.to_string()).unwrap();
    let err = publish(&app.db, &app.blobs, dir, "t0").await.unwrap_err();
    assert!(err.to_string().contains("is larger than"), "{err}");

    let err = publish(&app.db, &app.blobs, dir, "../t0")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid"), "{err}");
    let err = publish(&app.db, &app.blobs, dir, "i0").await.unwrap_err();
    assert!(err.to_string().contains("image/build i0"), "{err}");

    // Nothing was recorded.
    assert!(app.db.list_images().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_is_pinned_to_its_index_current_digest_and_unpublished_ones_are_not() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    write_image(images.path(), "t0", b"first build");
    let old = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    let alice = token(&app, "alice", "submitter").await;
    let a = submit(&app, &alice, "one_t0.tar.xz", job("one")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.json()["image_digest"], old.digest.as_str());

    write_image(images.path(), "t0", b"second build");
    let new = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    let b = submit(&app, &alice, "two_t0.tar.xz", job("two")).await;
    assert_eq!(b.json()["image_digest"], new.digest.as_str());
    // The first job stays pinned to what its index named when it was submitted.
    let id = a.json()["id"].as_u64().unwrap();
    let shown = send(
        &app,
        Method::GET,
        &format!("/api/v1/jobs/{id}"),
        &alice,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(shown.json()["image_digest"], old.digest.as_str());

    // An unpublished index: no pin (the field is absent), and the job is queued as ever.
    let c = submit(&app, &alice, "three_i0.tar.xz", job("three")).await;
    assert_eq!(c.status, StatusCode::CREATED);
    assert!(c.json().get("image_digest").is_none(), "{}", c.json());
    assert_eq!(c.json()["state"], "queued");
}

#[tokio::test]
async fn the_orphan_collector_keeps_image_blobs() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    write_image(images.path(), "t0", b"first build");
    let old = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    write_image(images.path(), "t0", b"second build");
    let new = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    // An unnamed blob, as a control: it must go.
    let mut w = app.blobs.writer().await.unwrap();
    w.write(b"nobody's").await.unwrap();
    let orphan = w.finish().await.unwrap();
    app.blobs.publish(&orphan).await.unwrap();

    let kept = [
        old.digest.clone(),
        new.digest.clone(),
        sha(b"first build"),
        sha(b"second build"),
        sha(b"not really an ELF vmlinux"),
    ];
    let old_time = SystemTime::now() - Duration::from_secs(7200);
    for blob in kept.iter().chain([&orphan.sha256]) {
        std::fs::File::options()
            .write(true)
            .open(app.blobs.local_file(blob))
            .unwrap()
            .set_modified(old_time)
            .unwrap();
    }
    let removed = crate::retention::collect_orphans(&app, crate::db::now_ms())
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert!(app.blobs.info(&orphan.sha256).await.unwrap().is_none());
    for blob in &kept {
        assert!(
            app.blobs.info(blob).await.unwrap().is_some(),
            "{blob} collected"
        );
    }
}

/// `GET /api/v1/images/{digest}/{part}` with `token` (and a `Range` header).
async fn fetch_part(app: &Shared, token: &str, path: &str, range: Option<&str>) -> Answer {
    let extra: Vec<(&str, String)> = range
        .map(|r| ("Range", r.to_string()))
        .into_iter()
        .collect();
    send(app, Method::GET, path, token, Body::empty(), &extra).await
}

#[tokio::test]
async fn runners_fetch_an_images_parts_by_digest_whole_or_from_a_range() {
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    let qcow2: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let manifest = write_image(images.path(), "t0", &qcow2);
    let published = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    let d = &published.digest;
    let kernel = std::fs::read(images.path().join(KERNEL)).unwrap();
    let runner = token(&app, "volunteer", "runner").await;
    let admin = token(&app, "root", "admin").await;
    for (part, bytes) in [
        ("manifest", &manifest),
        ("kernel", &kernel),
        ("disk", &qcow2),
    ] {
        for who in [&runner, &admin] {
            let a = fetch_part(&app, who, &format!("/api/v1/images/{d}/{part}"), None).await;
            assert_eq!(a.status, StatusCode::OK, "{part}");
            assert!(a.body == *bytes, "{part}: byte for byte");
            assert_eq!(a.headers["Construir-Sha256"], sha(bytes).as_str(), "{part}");
            assert_eq!(
                a.headers["Content-Length"],
                bytes.len().to_string().as_str()
            );
            assert_eq!(a.headers["Construir-Protocol"], "1");
        }
    }
    assert_eq!(sha(&manifest), *d, "the manifest's sha256 is the digest");

    // A resumed download: the tail from the middle, or one slice.
    let disk = format!("/api/v1/images/{d}/disk");
    let a = fetch_part(&app, &runner, &disk, Some("bytes=123456-")).await;
    assert_eq!(a.status, StatusCode::PARTIAL_CONTENT);
    assert!(a.body == qcow2[123_456..], "the tail");
    assert_eq!(
        a.headers["Content-Range"],
        format!("bytes 123456-199999/{}", qcow2.len()).as_str()
    );
    assert_eq!(a.headers["Content-Length"], "76544");
    assert_eq!(
        a.headers["Construir-Sha256"],
        sha(&qcow2).as_str(),
        "the whole part's"
    );
    let a = fetch_part(&app, &runner, &disk, Some("bytes=10-19")).await;
    assert_eq!(a.status, StatusCode::PARTIAL_CONTENT);
    assert!(a.body == qcow2[10..20]);

    // Past the end, or several ranges at once: 416, an API error saying the size.
    for bad in ["bytes=200000-", "bytes=999999-1000000", "bytes=0-1,5-6"] {
        let a = fetch_part(&app, &runner, &disk, Some(bad)).await;
        assert_eq!(a.status, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(a.headers["Content-Range"], "bytes */200000", "{bad}");
        assert_eq!(a.json()["error"], "bad-request", "{bad}");
        let message = a.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains("200000 bytes"), "{bad}: {message}");
        assert_eq!(a.headers["Construir-Protocol"], "1");
    }

    // Unknown digests and parts: 404, saying which.
    let other = "0".repeat(64);
    for (path, says) in [
        (format!("/api/v1/images/{other}/disk"), other.as_str()),
        (
            "/api/v1/images/not-a-digest/disk".to_string(),
            "not-a-digest",
        ),
        (format!("/api/v1/images/{d}/initrd"), "initrd"),
    ] {
        let a = fetch_part(&app, &runner, &path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.json()["error"], "not-found");
        let message = a.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{path}: {message}");
    }

    // Submitters have no use for images' bytes; no token, no bytes.
    let alice = token(&app, "alice", "submitter").await;
    let a = fetch_part(&app, &alice, &disk, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json()["error"], "forbidden");
    assert!(a.headers.get("Construir-Sha256").is_none());
    let a = fetch_part(&app, "nope", &disk, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // What a claim weighs against a fetching runner's cache: the three parts together.
    let total = (manifest.len() + kernel.len() + qcow2.len()) as u64;
    assert_eq!(app.db.image_bytes(d).await.unwrap(), Some(total));
    assert_eq!(app.db.image_bytes(d).await.unwrap(), Some(total), "cached");
    assert_eq!(app.db.image_bytes(&other).await.unwrap(), None);
}

#[tokio::test]
async fn a_pinned_job_goes_to_a_runner_that_holds_or_fetches_its_digest_only() {
    use crate::matching_tests::{claim, register, show};
    let (_d, app) = test_app().await;
    let images = tempfile::tempdir().unwrap();
    write_image(images.path(), "t0", &vec![7u8; 3 << 20]);
    let published = publish(&app.db, &app.blobs, images.path(), "t0")
        .await
        .unwrap();
    let total = app
        .db
        .image_bytes(&published.digest)
        .await
        .unwrap()
        .unwrap();
    let alice = token(&app, "alice", "submitter").await;
    let a = submit(&app, &alice, "one_t0.tar.xz", job("one")).await;
    let id = a.json()["id"].as_u64().unwrap();
    let bob = token(&app, "bob", "runner").await;
    let runner = register(&app, &bob, "home").await;

    // A local t0 is not the published one: not given, and the job says why.
    let local_only = crate::flow_tests::caps();
    assert_eq!(
        claim(&app, &bob, &runner, local_only).await.status,
        StatusCode::NO_CONTENT
    );
    let reason = show(&app, &alice, id).await["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let short = &published.digest[..12];
    assert!(
        reason.contains(&format!("t0@{short}")) && reason.contains("fetches images of 4 MiB"),
        "{reason}"
    );
    // A cache one byte too small: still not.
    let mut small = crate::flow_tests::caps();
    small["images"] = serde_json::json!([]);
    small["fetch_images"] = true.into();
    small["image_cache_bytes"] = (total - 1).into();
    assert_eq!(
        claim(&app, &bob, &runner, small.clone()).await.status,
        StatusCode::NO_CONTENT
    );
    // Room enough: given, with the digest to fetch.
    small["image_cache_bytes"] = total.into();
    let got = claim(&app, &bob, &runner, small).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(got.json()["image_digest"], published.digest.as_str());

    // One that holds it complete needs no cache at all.
    let b = submit(&app, &alice, "two_t0.tar.xz", job("two")).await;
    assert_eq!(b.status, StatusCode::CREATED);
    let mut holds = crate::flow_tests::caps();
    holds["images"] = serde_json::json!([]);
    holds["image_digests"] = serde_json::json!([published.digest]);
    let other = register(&app, &bob, "attic").await;
    let got = claim(&app, &bob, &other, holds).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(got.json()["job_id"], b.json()["id"]);
}
