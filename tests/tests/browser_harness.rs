//! The browser harness (support/browser.rs) works here: a tiny page served from a thread on
//! 127.0.0.1, driven through headless Chromium: a form filled, submitted and echoed back, a
//! cookie's flags, screenshots at both sizes, a session without JavaScript, and no Chromium
//! process left behind.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use support::browser::{self, Browser};

const FORM_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>harness</title>
<style>body { font: 18px sans-serif; margin: 2em } @media (max-width: 600px) { body { background: #eef } }</style>
</head><body>
<h1>construir harness</h1>
<p id="x">static</p>
<form method="post" action="/echo">
  <input name="msg" value="replace me">
  <select name="color"><option value="red">red</option><option value="blue">blue</option></select>
  <button id="send" type="submit">Send</button>
</form>
<script>document.getElementById('x').textContent = 'changed by script';</script>
</body></html>"#;

/// Serves `/` (the form) and `POST /echo` (the posted fields, with a cookie) on 127.0.0.1 until
/// the test process ends; the base URL.
fn serve() -> String {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // A connection per thread: Chromium may open one it never sends on.
            std::thread::spawn(move || {
                let _ = answer(stream);
            });
        }
    });
    base
}

fn answer(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let (status, extra, page) = match request_line.split_whitespace().take(2).collect::<Vec<_>>()[..]
    {
        ["GET", "/"] => ("200 OK", "", FORM_PAGE.to_string()),
        ["POST", "/echo"] => {
            let fields = form_fields(&String::from_utf8_lossy(&body));
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| escape(v))
                    .unwrap_or_default()
            };
            let page = format!(
                r#"<!doctype html><html><head><meta charset="utf-8"><title>echo</title></head><body>
<p id="echo" data-len="{}">{}</p><p id="color">{}</p><a id="home" href="/">home</a></body></html>"#,
                field("msg").len(),
                field("msg"),
                field("color")
            );
            (
                "200 OK",
                "Set-Cookie: harness=1; Path=/; HttpOnly; SameSite=Strict\r\n",
                page,
            )
        }
        _ => ("404 Not Found", "", "not found".to_string()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{page}",
        page.len()
    )
}

/// application/x-www-form-urlencoded, decoded.
fn form_fields(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && i + 2 < bytes.len()
                && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                out.push(b);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(n, v)| (decode(n), decode(v)))
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[test]
fn drives_chromium_through_a_form_and_takes_screenshots() {
    let started = Instant::now();
    let Some(b) = Browser::start("browser_harness") else {
        return;
    };
    let base = serve();
    b.goto(&format!("{base}/"));
    assert_eq!(b.title(), "harness");
    // JavaScript runs in this session.
    b.wait_for_text("#x", "changed by script", Duration::from_secs(5));
    assert_eq!(
        b.execute("return [window.innerWidth, window.innerHeight]", vec![]),
        serde_json::json!([1280, 900]),
        "the desktop viewport"
    );

    // Both sizes of the form page (its background turns blue under 600 px).
    let (desktop, phone) = b.screenshot("harness");
    for (path, size) in [(&desktop, browser::DESKTOP), (&phone, browser::PHONE)] {
        let png = std::fs::read(path).unwrap();
        assert!(browser::is_png(&png), "{} is not a PNG", path.display());
        assert_eq!(browser::png_size(&png), Some(size), "{}", path.display());
    }
    assert_eq!(
        desktop,
        browser::screenshots_dir().join("harness-desktop.png")
    );

    let message = "héllo & <b>bold</b> ünïcode";
    b.fill("input[name=msg]", message);
    assert_eq!(
        b.find("input[name=msg]").prop("value").as_deref(),
        Some(message)
    );
    b.select("select[name=color]", "blue");
    b.submit("#send");

    assert!(b.current_url().ends_with("/echo"), "at {}", b.current_url());
    assert_eq!(b.text_of("#echo"), message);
    assert_eq!(b.text_of("#color"), "blue");
    assert_eq!(
        b.attr_of("#echo", "data-len"),
        Some(escape(message).len().to_string())
    );
    assert!(b.page_source().contains("&lt;b&gt;bold"));
    assert!(!b.exists("#x"));
    assert_eq!(b.find_all("p").len(), 2);

    let cookie = b.cookie("harness").expect("the cookie /echo set");
    assert_eq!(cookie.value, "1");
    assert!(cookie.http_only, "{cookie:?}");
    assert!(!cookie.secure, "{cookie:?}");
    assert_eq!(cookie.same_site.as_deref(), Some("Strict"), "{cookie:?}");
    assert_eq!(cookie.expires, None, "a session cookie: {cookie:?}");

    // A wait that fails says what it waited for.
    eprintln!("browser_harness: a wait that must fail (its panic message is expected):");
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        b.wait_until("#never", Duration::from_millis(300));
    }))
    .expect_err("#never is not on the page");
    let message = failed.downcast_ref::<String>().expect("a formatted panic");
    assert!(
        message.contains("waited 300ms for `#never` on"),
        "{message}"
    );

    // A link, and back.
    b.submit("#home");
    b.wait_for_text("#x", "changed by script", Duration::from_secs(5));
    b.back();
    b.wait_until("#echo", Duration::from_secs(5));

    let profile = b.profile_dir();
    let driver = b.driver_pid();
    assert!(!browser::processes_naming(&profile.display().to_string()).is_empty());
    drop(b);
    assert_no_process_left(&profile.display().to_string(), driver);

    // Without JavaScript, the page's script does not run.
    let b = Browser::start_without_js("browser_harness (no JS)").expect("a browser, as above");
    b.goto(&format!("{base}/"));
    assert_eq!(b.text_of("#x"), "static");
    b.fill("input[name=msg]", "no script");
    b.submit("#send");
    assert_eq!(b.text_of("#echo"), "no script");
    let profile = b.profile_dir().display().to_string();
    let driver = b.driver_pid();
    drop(b);
    assert_no_process_left(&profile, driver);
    eprintln!("browser_harness: both sessions in {:?}", started.elapsed());
}

fn assert_no_process_left(profile: &str, driver: u32) {
    let left = browser::processes_naming(profile);
    assert!(left.is_empty(), "Chromium processes left behind: {left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{driver}")).exists(),
        "chromedriver (pid {driver}) is still there"
    );
}
