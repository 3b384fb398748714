//! `/runners` and `/images` in process: a runner listed with its owner, status, standing, key and
//! what it runs (a private job's id hidden from others), a hostile runner name shown as text, the
//! revoke form (its owner's, an admin's; refused to others and without its token), and the
//! images page with no image and with one and its packages.

use crate::flow_tests::{Answer, caps, json_call, send, token};
use crate::http::tests::test_app;
use crate::matching_tests::{claim, claimed};
use crate::service::Shared;
use crate::web_tests::{page, ran, sign_in, text, user_with_password};
use axum::body::Body;
use axum::http::{Method, StatusCode};
use construir_api::trust::{KeyPair, key_id};
use construir_contract::manifest::ImageManifest;
use serde_json::json;

/// A job of the submitter behind `token` (`query`: more of the submit's parameters).
async fn submitted(app: &Shared, token: &str, query: &str) -> u64 {
    crate::replica_tests::submit_replicated(app, token, query.trim_start_matches('&')).await
}

/// Registers runner `name` with `token` (and `key`, if one): its id.
async fn registered(app: &Shared, token: &str, name: &str, key: Option<&KeyPair>) -> u64 {
    let body = match key {
        Some(k) => json!({"name": name, "public_key": k.public_hex()}),
        None => json!({ "name": name }),
    };
    let reg = json_call(
        app,
        Method::POST,
        "/api/v1/runner/register",
        token,
        body,
        &[],
    )
    .await;
    assert_eq!(reg.status, StatusCode::OK, "{}", text(&reg));
    reg.json()["runner_id"].as_u64().unwrap()
}

/// The row of runner `id` on a `/runners` page.
fn row(html: &str, id: u64) -> String {
    let start = html
        .find(&format!("<tr id=\"runner-{id}\">"))
        .unwrap_or_else(|| panic!("no runner {id} on the page: {html}"));
    let end = html[start..].find("</tr>").unwrap() + start;
    html[start..end].to_string()
}

async fn runners_page(app: &Shared, cookies: &str) -> String {
    let a = page(app, Method::GET, "/runners", cookies, None, &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", text(&a));
    text(&a)
}

async fn sql(app: &Shared, statement: &'static str, id: u64) {
    sqlx::query(statement)
        .bind(id as i64)
        .execute(app.db.pool())
        .await
        .unwrap();
}

/// A browser's post of `form` to runner `id`'s revoke.
async fn revoke(app: &Shared, id: u64, cookies: &str, form: &str) -> Answer {
    page(
        app,
        Method::POST,
        &format!("/runners/{id}/revoke"),
        cookies,
        Some(form),
        &[],
    )
    .await
}

/// Whether `GET /api/v1/runners` says runner `id` is revoked.
async fn revoked(app: &Shared, token: &str, id: u64) -> bool {
    let a = send(
        app,
        Method::GET,
        "/api/v1/runners",
        token,
        Body::empty(),
        &[],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", text(&a));
    a.json()
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("runner {id} is not listed: {}", text(&a)))["revoked"]
        .as_bool()
        .unwrap()
}

#[tokio::test]
async fn the_runners_page_shows_each_runner_its_owner_standing_and_work_but_not_private_ids() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "alice", "alices password", false).await;
    user_with_password(&app, "bob", "bobs password", false).await;
    let alices = token(&app, "alice", "submitter").await;
    let public = submitted(&app, &alices, "&private=false").await;
    let private = submitted(&app, &alices, "&private=true").await;
    let vol = token(&app, "vol", "runner").await;
    let key = KeyPair::generate().unwrap();
    let runner = registered(&app, &vol, "r1", Some(&key)).await;
    let mut two = caps();
    two["free_slots"] = json!(2);
    let mut held = vec![
        claimed(&claim(&app, &vol, &runner.to_string(), two.clone()).await).job,
        claimed(&claim(&app, &vol, &runner.to_string(), two).await).job,
    ];
    held.sort();
    assert_eq!(held, vec![public, private]);
    sql(
        &app,
        "UPDATE runners SET agreed_in_row = 3, agreed = 5, disagreed = 1 WHERE id = $1",
        runner,
    )
    .await;
    // One long gone, and one that has done a job (`ran` reports one with an output).
    let idle = registered(&app, &vol, "r2", None).await;
    sql(
        &app,
        "UPDATE runners SET last_seen_ms = 0 WHERE id = $1",
        idle,
    )
    .await;
    let done = ran(
        &app,
        "carol",
        "",
        b"done\n",
        crate::replica_tests::output("d"),
    )
    .await;

    let (bob, _) = sign_in(&app, "bob", "bobs+password").await;
    let (alice, _) = sign_in(&app, "alice", "alices+password").await;
    for who in ["", bob.as_str()] {
        let html = runners_page(&app, who).await;
        let r = row(&html, runner);
        assert!(r.contains(">r1</span>"), "{r}");
        assert!(r.contains("<a href=\"/jobs?owner=vol\">vol</a>"), "{r}");
        assert!(r.contains(">online</span>"), "{r}");
        assert!(r.contains("last seen <time>"), "{r}");
        assert!(
            r.contains(&format!("<a href=\"/jobs/{public}\">job {public}</a>")),
            "{r}"
        );
        assert!(r.contains("a private job"), "{r}");
        assert!(!html.contains(&format!("/jobs/{private}\"")), "{html}");
        assert!(
            r.contains("3 agreed in a row; 5 agreed, 1 disagreed"),
            "{r}"
        );
        assert!(r.contains(&key_id(&key.public_hex())), "{r}");
        assert!(r.contains("<td class=\"done\">0</td>"), "{r}");
        // Nobody here owns it: no revoke form.
        assert!(!html.contains("/revoke\""), "{html}");
        let r = row(&html, idle);
        assert!(r.contains(">offline</span>"), "{r}");
        assert!(
            r.contains("last seen <time>1970-01-01 00:00:00 UTC</time>"),
            "{r}"
        );
        assert!(r.contains("<td>none</td>"), "no key: {r}");
        assert!(r.contains("<td class=\"running\">nothing</td>"), "{r}");
    }
    // The one who did a job: it counts, and it runs nothing now.
    let html = runners_page(&app, "").await;
    let carols = html
        .find("<a href=\"/jobs?owner=carol-volunteer\">")
        .expect("carol's volunteer's runner");
    let tr = html[..carols].rfind("<tr id=\"runner-").unwrap();
    let r = &html[tr..html[tr..].find("</tr>").unwrap() + tr];
    assert!(r.contains("<td class=\"done\">1</td>"), "{r}");
    assert!(!r.contains(&format!("/jobs/{done}\"")), "{r}");
    // The owner of the private job sees it; the command to lend a machine is for the signed in.
    let html = runners_page(&app, &alice).await;
    assert!(
        html.contains(&format!("<a href=\"/jobs/{private}\">job {private}</a>")),
        "{html}"
    );
    assert!(html.contains("href=\"/tokens\""), "{html}");
    let command = format!(
        "construir-runner --server {} --token-file runner.token",
        app.settings.public_url
    );
    assert!(html.contains(&command), "{html}");
    assert!(!runners_page(&app, "").await.contains("--token-file"));
}

#[tokio::test]
async fn a_hostile_runner_name_is_shown_as_text() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "vol", "vols password", false).await;
    let vol = token(&app, "vol", "runner").await;
    let runner = registered(&app, &vol, "r1", None).await;
    // The API takes only plain names; a record from elsewhere (an older server, a hand edit)
    // may hold anything.
    let refused = json_call(
        &app,
        Method::POST,
        "/api/v1/runner/register",
        &vol,
        json!({"name": "<b>x</b>"}),
        &[],
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        text(&refused)
    );
    sql(
        &app,
        "UPDATE runners SET name = '<b>x</b>\"><script>alert(1)</script>' WHERE id = $1",
        runner,
    )
    .await;
    let (cookies, _) = sign_in(&app, "vol", "vols+password").await;
    for who in ["", cookies.as_str()] {
        let html = runners_page(&app, who).await;
        assert!(
            !html.contains("<b>x</b>") && !html.contains("<script>alert"),
            "{html}"
        );
        assert!(html.contains("&#60;b&#62;x&#60;/b&#62;"), "{html}");
    }
    // In the revoke button's label too.
    let html = runners_page(&app, &cookies).await;
    assert!(
        html.contains("aria-label=\"Revoke runner &#60;b&#62;x"),
        "{html}"
    );
}

#[tokio::test]
async fn a_runners_owner_revokes_it_others_cannot_and_a_post_needs_its_token() {
    let (_d, app) = test_app().await;
    user_with_password(&app, "vol", "vols password", false).await;
    user_with_password(&app, "bob", "bobs password", false).await;
    user_with_password(&app, "root", "roots password", true).await;
    let alices = token(&app, "alice", "submitter").await;
    let held = submitted(&app, &alices, "").await;
    let vol = token(&app, "vol", "runner").await;
    let runner = registered(&app, &vol, "r1", None).await;
    let other = registered(&app, &vol, "r2", None).await;
    assert_eq!(
        claimed(&claim(&app, &vol, &runner.to_string(), caps()).await).job,
        held
    );
    let (vols, vol_csrf) = sign_in(&app, "vol", "vols+password").await;
    let (bobs, bob_csrf) = sign_in(&app, "bob", "bobs+password").await;
    let action = format!("action=\"/runners/{runner}/revoke\"");
    assert!(row(&runners_page(&app, &vols).await, runner).contains(&action));
    assert!(!runners_page(&app, &bobs).await.contains(&action));

    // Another user's post: no such runner of theirs.
    let r = revoke(&app, runner, &bobs, &format!("csrf={bob_csrf}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", text(&r));
    assert!(!revoked(&app, &vol, runner).await);
    // The owner's, without the form's token, or with another session's.
    for form in [String::new(), format!("csrf={bob_csrf}")] {
        let r = revoke(&app, runner, &vols, &form).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", text(&r));
    }
    assert!(!revoked(&app, &vol, runner).await);
    // Nobody signed in: refused too.
    let r = revoke(&app, runner, "", &format!("csrf={vol_csrf}")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", text(&r));

    let r = revoke(&app, runner, &vols, &format!("csrf={vol_csrf}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    assert_eq!(r.headers["location"], "/runners");
    assert!(revoked(&app, &vol, runner).await);
    assert!(!revoked(&app, &vol, other).await);
    let html = runners_page(&app, &vols).await;
    let r = row(&html, runner);
    assert!(
        r.contains(">revoked</span>") && !r.contains(">online</span>"),
        "{r}"
    );
    assert!(!r.contains(&action), "nothing left to revoke: {r}");
    // Its job was told: the attempt it held has ended.
    assert!(r.contains("<td class=\"running\">nothing</td>"), "{r}");
    // An admin revokes anyone's.
    let (roots, root_csrf) = sign_in(&app, "root", "roots+password").await;
    assert!(
        runners_page(&app, &roots)
            .await
            .contains(&format!("/runners/{other}/revoke"))
    );
    let r = revoke(&app, other, &roots, &format!("csrf={root_csrf}")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", text(&r));
    assert!(revoked(&app, &vol, other).await);
}

#[tokio::test]
async fn the_images_page_says_how_to_publish_then_lists_an_image_and_its_packages() {
    let (_d, app) = test_app().await;
    let none = page(&app, Method::GET, "/images", "", None, &[]).await;
    assert_eq!(none.status, StatusCode::OK);
    assert!(
        text(&none).contains("construir-server --data DIR image publish i0"),
        "{}",
        text(&none)
    );

    let dir = tempfile::tempdir().unwrap();
    let bytes = crate::image_tests::write_image(dir.path(), "t0", b"qcow2 bits");
    let mut manifest: ImageManifest = serde_json::from_slice(&bytes).unwrap();
    manifest.installed = std::iter::once("<script>alert(1)</script>".to_string())
        .chain((0..2500).map(|i| format!("pkg{i}=1.{i}")))
        .collect();
    std::fs::write(
        dir.path().join("t0.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let published = crate::images::publish(&app.db, &app.blobs, dir.path(), "t0")
        .await
        .unwrap();
    let html = text(&page(&app, Method::GET, "/images", "", None, &[]).await);
    assert!(html.contains(&published.digest), "{html}");
    assert!(html.contains("Image t0"), "{html}");
    assert!(html.contains(">current</span>"), "{html}");
    assert!(html.contains("<summary>2501 packages</summary>"), "{html}");
    assert!(html.contains("<li><code>pkg0=1.0</code></li>"), "{html}");
    assert!(
        html.contains("<li><code>pkg1998=1.1998</code></li>"),
        "{html}"
    );
    assert!(!html.contains("pkg1999=1.1999"), "capped at 2000: {html}");
    assert!(html.contains("The first 2000 are listed here."), "{html}");
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{html}"
    );
    assert!(html.contains("qcow2 10 B"), "{html}");
    assert!(!html.contains("image publish i0"), "{html}");
}
