//! The website in a real browser (headless Chromium over WebDriver, support/browser.rs) against
//! construir-server on 127.0.0.1 and a real pull runner (QEMU's TCG, image t0): sign up and
//! sign in, submit a job through the form, watch its console grow live, see it succeed, download
//! its output and compare bytes, cancel one, make and revoke a token; a hostile job's console
//! and file names shown as text with nothing run; a private job another user cannot see; the
//! pages without JavaScript; headers checked with plain HTTP. Screenshots of each page at
//! desktop and phone width go to target/screenshots/, and with CONSTRUIR_SCREENSHOTS_TO_DOCS=1
//! (tools/screenshots sets it) to docs/screenshots/ too.

mod support;

use construir_tests::{TestJob, sha256_hex};
use construir_tools::pack::JobFile;
use std::time::{Duration, Instant};
use support::Farm;
use support::browser::Browser;

const LONG: Duration = Duration::from_secs(120);

/// A plain HTTP answer.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A request the way a browser (or a forger) would send it: with `cookie`, and a form body.
fn http(method: &str, url: &str, cookie: &str, form: Option<&str>) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    if !cookie.is_empty() {
        request = request.header("Cookie", cookie);
    }
    let response = match form {
        Some(f) => agent.run(
            request
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(f.to_string())
                .unwrap(),
        ),
        None => agent.run(request.body(()).unwrap()),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = response
        .into_body()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

/// The browser's cookies for the site, as a Cookie header.
fn cookie_header(b: &Browser) -> String {
    b.cookies()
        .iter()
        .map(|c| format!("{}={}", c.name, c.value))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A job for image t0 whose console ticks once a second `ticks` times, then writes `data`
/// back as `data.bin` (a plain tar).
fn ticking_job(name: &str, ticks: u32, data: &[u8]) -> TestJob {
    let script = format!(
        "#!/bin/sh\nset -e\ni=1\nwhile [ $i -le {ticks} ]; do echo \"tick $i of {ticks}\"; \
         sleep 1; i=$((i+1)); done\ncp /opt/job/data.bin /tmp/data.bin\n\
         cd /tmp && tar -cf /dev/vdb data.bin\necho written\n"
    );
    TestJob::new(
        name,
        "t0",
        &[
            JobFile::script(&script),
            JobFile::new("data.bin", data.to_vec(), 0o644),
        ],
        4 << 20,
    )
}

/// A job that prints markup, scripts and escape sequences, and names an output file with them.
fn hostile_job() -> TestJob {
    let script = r#"#!/bin/sh
echo '<script>window.__pwned = 1</script>'
echo '<img src=x onerror="window.__pwned = 2">'
printf '\033[1;31mRED\033[0m \033]0;sneaky-title\007 \033[2J done\n'
mkdir -p /tmp/o
echo hi > '/tmp/o/<img src=x onerror=window.__pwned=3>.txt'
cd /tmp/o && tar -cf /dev/vdb .
"#;
    TestJob::new("hostile", "t0", &[JobFile::script(script)], 1 << 20)
}

/// Signs up `name` with `password` through the form; it lands signed in on the jobs.
fn sign_up(b: &Browser, base: &str, name: &str, password: &str) {
    b.goto(&format!("{base}/signup"));
    b.fill("#name", name);
    b.fill("#password", password);
    b.fill("#again", password);
    b.submit("#signup button[type=submit]");
    b.wait_for_text("header", &format!("Signed in as {name}"), LONG);
}

/// Submits `job` through the form as a job file; the new job's id (from the page's address).
fn submit_form(b: &Browser, base: &str, job: &TestJob, private: bool) -> u64 {
    b.goto(&format!("{base}/submit"));
    b.select("#image", "t0");
    b.fill("#timeout_min", "5");
    b.fill("#output_size", "16M");
    b.fill("#vcpus", "1");
    b.fill("#memory_mib", "256");
    if private {
        b.click("#private");
    }
    b.fill("#job", job.path.to_str().unwrap());
    b.submit("#submit button[type=submit]");
    let url = b.current_url();
    url.rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "not on a job's page after submitting: {url}\n{}",
                b.page_source()
            )
        })
}

fn wait_state(b: &Browser, state: &str) {
    b.wait_for_text("#state", state, LONG);
}

#[test]
fn the_website_in_a_real_browser() {
    let Some(b) = Browser::start("the_website_in_a_real_browser") else {
        return;
    };
    let farm = Farm::start(&["--open-signup"]);
    // An operator's account, made with the server's own command (the password on stdin).
    let mut add = std::process::Command::new(construir_tests::binary("construir-server"))
        .arg("--data")
        .arg(&farm.server.data)
        .args(["user", "add", "root", "--admin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("construir-server user add");
    {
        use std::io::Write;
        let mut stdin = add.stdin.take().unwrap();
        stdin.write_all(b"root's long password\n").unwrap();
    }
    let added = add.wait_with_output().unwrap();
    assert!(added.status.success(), "user add: {}", added.status);
    let _runner = farm.runner("web-1", &farm.server.url, &[]);
    let base = farm.server.url.clone();

    // Sign up, sign out, sign in again.
    sign_up(&b, &base, "ana", "ana's long password");
    let session = b.cookie("construir_session").expect("a session cookie");
    assert!(session.http_only, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Lax"), "{session:?}");
    b.submit("form[action$='/signout'] button");
    b.wait_for_text("header", "Sign in", LONG);
    b.goto(&format!("{base}/signin"));
    b.screenshot("signin");
    b.fill("#name", "ana");
    b.fill("#password", "ana's long password");
    b.submit("#signin button[type=submit]");
    b.wait_for_text("header", "Signed in as ana", LONG);

    // Submit through the form and watch the console grow while the job runs.
    b.goto(&format!("{base}/submit"));
    b.screenshot("submit");
    let data = construir_tests::random_bytes(300_000, 5);
    let ticking = ticking_job("ticks", 8, &data);
    let id = submit_form(&b, &base, &ticking, false);
    let first = b.wait_for_text("#console", "tick 2 of 8", LONG);
    let started = Instant::now();
    let later = b.wait_for_text("#console", "tick 5 of 8", LONG);
    assert!(
        later.len() > first.len(),
        "the console grew on the page: {first:?} then {later:?}"
    );
    // It grew without the page being drawn again: live.js appended the pieces.
    let received = b.attr_of("#console", "data-received");
    assert!(received.is_some(), "the live console appended pieces");
    eprintln!("ticks 2 to 5 arrived live in {:?}", started.elapsed());
    b.screenshot("job-running");
    wait_state(&b, "succeeded");
    b.wait_for_text("#console", "written", LONG);
    b.screenshot("job-succeeded");
    let cookie = cookie_header(&b);
    let output = http("GET", &format!("{base}/jobs/{id}/output"), &cookie, None);
    assert_eq!(output.status, 200);
    assert!(
        output
            .header("content-disposition")
            .unwrap()
            .starts_with("attachment;")
    );
    let tar_data = construir_contract::archive::read_file(&output.body[..], "data.bin", 1 << 20)
        .unwrap()
        .expect("data.bin in the output");
    assert_eq!(
        sha256_hex(&tar_data),
        sha256_hex(&data),
        "the output's bytes"
    );
    let href = b
        .attr_of("#files a", "href")
        .expect("a file's download link");
    let one = http("GET", &format!("{base}{href}"), &cookie, None);
    assert_eq!(one.body, data, "the single file's bytes");

    // The jobs list, with its filters.
    b.goto(&format!("{base}/jobs?state=succeeded"));
    b.wait_until(&format!("#job-{id}"), LONG);
    b.screenshot("jobs");

    // A form post without its CSRF token is refused, even with the session.
    let forged = http(
        "POST",
        &format!("{base}/jobs/{id}/resubmit"),
        &cookie,
        Some(""),
    );
    assert_eq!(forged.status, 403);
    // The headers every page carries, and no inline script on any page.
    for path in [
        "/jobs",
        &format!("/jobs/{id}"),
        "/submit",
        "/signin",
        "/signup",
        "/tokens",
        "/runners",
        "/images",
        "/no-such-page",
    ] {
        let page = http("GET", &format!("{base}{path}"), &cookie, None);
        let csp = page.header("content-security-policy").unwrap_or("");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        let html = String::from_utf8_lossy(&page.body);
        for (at, _) in html.match_indices("<script") {
            let tag = &html[at..at + html[at..].find('>').unwrap()];
            assert!(tag.contains(" src="), "{path}: an inline script: {tag}");
        }
    }

    // Cancel a long job from its page.
    let long = ticking_job("long", 300, b"x");
    let long_id = submit_form(&b, &base, &long, false);
    b.wait_for_text("#console", "tick 1 of 300", LONG);
    b.submit("#cancel button");
    wait_state(&b, "canceled");

    // A hostile job: its console and file names are text, and none of it runs.
    let hostile = hostile_job();
    let hostile_id = submit_form(&b, &base, &hostile, false);
    wait_state(&b, "succeeded");
    b.wait_until("#files a", LONG);
    let console = b.text_of("#console");
    assert!(
        console.contains("<script>window.__pwned = 1</script>"),
        "{console}"
    );
    assert!(
        console.contains("RED") && !console.contains("sneaky-title"),
        "{console}"
    );
    let files = b.text_of("#files");
    assert!(
        files.contains("<img src=x onerror=window.__pwned=3>.txt"),
        "{files}"
    );
    assert_eq!(
        b.execute(
            "return [typeof window.__pwned, document.querySelectorAll('#console *:not(span), #files img').length]",
            vec![]
        ),
        serde_json::json!(["undefined", 0]),
        "nothing the job wrote became markup or ran"
    );
    assert_eq!(
        b.execute(
            "return getComputedStyle(document.querySelector('#console .f1')).fontWeight",
            vec![]
        ),
        serde_json::json!("700"),
        "its colour codes became styling"
    );
    b.screenshot("job-hostile");

    // Tokens: made, shown once, revoked; a revoked token no longer works.
    b.goto(&format!("{base}/tokens"));
    b.select("#role", "submitter");
    b.submit("#make-token button");
    let token = b.text_of("#new-token");
    assert!(token.starts_with("cst_"), "{token}");
    b.screenshot("tokens");
    let whoami = |t: &str| {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        agent
            .get(format!("{base}/api/v1/whoami"))
            .header("Construir-Protocol", "1")
            .header("Authorization", format!("Bearer {t}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(whoami(&token), 200);
    b.goto(&format!("{base}/tokens"));
    assert!(!b.page_source().contains(&token), "the token is shown once");
    b.submit("#tokens-list button, table button");
    assert_eq!(whoami(&token), 401, "the revoked token");

    // A private job: its owner sees it, another user gets a 404.
    let private = ticking_job("mine", 1, b"private bytes");
    let private_id = submit_form(&b, &base, &private, true);
    wait_state(&b, "succeeded");
    b.delete_cookies();
    sign_up(&b, &base, "ben", "ben's long password");
    b.goto(&format!("{base}/jobs/{private_id}"));
    b.wait_for_text("main", "no job", LONG);
    let not_found = http(
        "GET",
        &format!("{base}/jobs/{private_id}"),
        &cookie_header(&b),
        None,
    );
    assert_eq!(not_found.status, 404);
    b.goto(&format!("{base}/jobs"));
    assert!(!b.exists(&format!("#job-{private_id}")));
    assert!(b.exists(&format!("#job-{hostile_id}")));
    let _ = long_id;
    drop(b);

    // Without JavaScript: the pages still show everything, and a form still works.
    let Some(plain) = Browser::start_without_js("the_website_without_javascript") else {
        return;
    };
    plain.goto(&format!("{base}/jobs/{id}"));
    let console = plain.text_of("#console");
    assert!(console.contains("tick 8 of 8"), "{console}");
    assert!(plain.text_of("#state").contains("succeeded"));
    plain.goto(&format!("{base}/signin"));
    plain.fill("#name", "ben");
    plain.fill("#password", "ben's long password");
    plain.submit("#signin button[type=submit]");
    plain.wait_for_text("header", "Signed in as ben", LONG);
    plain.goto(&format!("{base}/runners"));
    plain.screenshot("runners");
    plain.goto(&format!("{base}/images"));
    plain.screenshot("images");
    // The operator's page, for an admin only.
    plain.goto(&format!("{base}/admin"));
    plain.wait_for_text("main", "no such page", LONG);
    plain.delete_cookies();
    plain.goto(&format!("{base}/signin"));
    plain.fill("#name", "root");
    plain.fill("#password", "root's long password");
    plain.submit("#signin button[type=submit]");
    plain.wait_for_text("header", "Signed in as root", LONG);
    plain.goto(&format!("{base}/admin"));
    plain.wait_for_text("main", "ana", LONG);
    plain.screenshot("admin");
    plain.goto(&format!("{base}/signup"));
    plain.screenshot("signup");
}
