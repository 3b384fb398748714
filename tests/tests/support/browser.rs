//! A real browser for the website's tests: headless Chromium driven over WebDriver by a
//! chromedriver child process on a free 127.0.0.1 port, with a fresh profile in a temporary
//! directory. The API is synchronous (the tests are plain `#[test]`s): every call blocks on a
//! current-thread runtime, is bounded in time, and panics with what it was waiting for.
//!
//! Without /usr/bin/chromium or /usr/bin/chromedriver, [`Browser::start`] says so loudly and
//! returns `None`; with `CONSTRUIR_REQUIRE_BROWSER=1` (as .ci/run sets under CI=true) it fails
//! instead. `tools/test` installs the Debian packages chromium and chromium-driver.
//!
//! WebDriver cannot see response headers: check those with plain HTTP.
//! Dropping a `Browser` ends its session and kills chromedriver and every Chromium process
//! it started.

use fantoccini::elements::Element as WdElement;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long one WebDriver command (a page load included) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long chromedriver may take to answer on its port.
const DRIVER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new session (Chromium starting) may take.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// The desktop and phone viewports of [`Browser::screenshot`]; the desktop one is the default.
pub const DESKTOP: (u32, u32) = (1280, 900);
pub const PHONE: (u32, u32) = (390, 844);

/// A cookie as the browser holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub path: Option<String>,
    pub domain: Option<String>,
    pub secure: bool,
    pub http_only: bool,
    /// "Strict", "Lax" or "None", as the browser reports it.
    pub same_site: Option<String>,
    /// Unix time; `None` for a session cookie.
    pub expires: Option<i64>,
}

/// A headless Chromium session (see the module's documentation).
pub struct Browser {
    test: String,
    // Declared before `rt`: the client's connection task lives on that runtime.
    client: Client,
    rt: tokio::runtime::Runtime,
    driver: Child,
    dir: tempfile::TempDir,
    /// The pages' own scripts run (off for [`Browser::start_without_js`]).
    javascript: bool,
}

/// One element of the current page, found by `css`.
pub struct Element<'b> {
    browser: &'b Browser,
    css: String,
    el: WdElement,
}

impl Browser {
    /// A browser with JavaScript on; `None` (after a loud line) where none is installed.
    pub fn start(test: &str) -> Option<Browser> {
        Self::launch(test, true)
    }

    /// A browser whose pages run no JavaScript (Chromium's content setting, as a person who
    /// turned it off has it); scripts sent with [`Browser::execute`] still run.
    pub fn start_without_js(test: &str) -> Option<Browser> {
        Self::launch(test, false)
    }

    fn launch(test: &str, javascript: bool) -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            let what = format!(
                "{} missing (tools/test installs the Debian packages chromium and chromium-driver)",
                missing.join(" and ")
            );
            if std::env::var("CONSTRUIR_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("{test}: no browser: {what}, and CONSTRUIR_REQUIRE_BROWSER=1 requires one");
            }
            // Straight to stderr, past the test harness's capture: a skip is never silent.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!!!! SKIPPED {test}: no browser: {what} (set CONSTRUIR_REQUIRE_BROWSER=1 to make this a failure) !!!!!!!!!!\n"
            );
            return None;
        }

        let dir = tempfile::Builder::new()
            .prefix("construir-browser.")
            .tempdir()
            .expect("a temporary directory for the browser");
        let profile = dir.path().join("profile");
        std::fs::create_dir(&profile).expect("the browser's profile directory");
        let log = dir.path().join("chromedriver.log");
        let out = File::create(dir.path().join("chromedriver.out")).expect("chromedriver.out");
        let driver = Command::new(CHROMEDRIVER)
            // A port of its own choosing, which it prints: no race for a free one.
            .arg("--port=0")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("chromedriver.out"))
            .stderr(out)
            // Its own process group, so Drop can kill Chromium with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot start {CHROMEDRIVER}: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut starting = Starting {
            driver: Some(driver),
            dir: dir.path().to_path_buf(),
        };
        let port = starting.wait_for_driver(test);

        let mut prefs = serde_json::Map::new();
        if !javascript {
            prefs.insert(
                "profile.managed_default_content_settings.javascript".into(),
                json!(2),
            );
        }
        let caps = json!({
            "browserName": "chrome",
            "timeouts": { "pageLoad": COMMAND_TIMEOUT.as_millis() as u64, "script": COMMAND_TIMEOUT.as_millis() as u64, "implicit": 0 },
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox", // we run as root
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    // No outside network here: keep Chromium from calling home.
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={},{}", DESKTOP.0, DESKTOP.1),
                ],
                "prefs": prefs,
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connect = async {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
        };
        let client = match block_on_within(&rt, SESSION_TIMEOUT, connect) {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => starting.fail(test, &format!("chromedriver opened no session: {e}")),
            Err(_) => starting.fail(
                test,
                &format!("chromedriver opened no session within {SESSION_TIMEOUT:?}"),
            ),
        };
        let driver = starting.driver.take().expect("chromedriver");
        let browser = Browser {
            test: test.to_string(),
            client,
            rt,
            driver,
            dir,
            javascript,
        };
        browser.set_window_size(DESKTOP.0, DESKTOP.1);
        Some(browser)
    }

    /// The profile directory, which every Chromium process of this browser names on its
    /// command line.
    pub fn profile_dir(&self) -> PathBuf {
        self.dir.path().join("profile")
    }

    /// chromedriver's process id.
    pub fn driver_pid(&self) -> u32 {
        self.driver.id()
    }

    /// Loads `url` and waits for it to load.
    #[track_caller]
    pub fn goto(&self, url: &str) {
        self.run(&format!("loading {url}"), self.client.goto(url));
    }

    #[track_caller]
    pub fn back(&self) {
        self.run("going back", self.client.back());
    }

    #[track_caller]
    pub fn current_url(&self) -> String {
        self.run("the current URL", self.client.current_url())
            .to_string()
    }

    #[track_caller]
    pub fn title(&self) -> String {
        self.run("the page's title", self.client.title())
    }

    /// The current page's HTML as the browser has it now (after scripts ran).
    #[track_caller]
    pub fn page_source(&self) -> String {
        self.run("the page's source", self.client.source())
    }

    /// The first element matching `css`; panics (with the URL and the page's start) if none.
    #[track_caller]
    pub fn find(&self, css: &str) -> Element<'_> {
        match self.try_find(css) {
            Some(el) => el,
            None => panic!(
                "{}: no element matches `{css}` on {}; the page:\n{}",
                self.test,
                self.current_url(),
                clip(&self.page_source(), 3000)
            ),
        }
    }

    /// The first element matching `css`, if any.
    #[track_caller]
    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        self.find_all(css).into_iter().next()
    }

    /// Every element matching `css`, in document order.
    #[track_caller]
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        self.run(
            &format!("finding `{css}`"),
            self.client.find_all(Locator::Css(css)),
        )
        .into_iter()
        .map(|el| Element {
            browser: self,
            css: css.to_string(),
            el,
        })
        .collect()
    }

    #[track_caller]
    pub fn exists(&self, css: &str) -> bool {
        !self.find_all(css).is_empty()
    }

    /// The rendered text of the first element matching `css`.
    #[track_caller]
    pub fn text_of(&self, css: &str) -> String {
        self.find(css).text()
    }

    /// An attribute of the first element matching `css`.
    #[track_caller]
    pub fn attr_of(&self, css: &str, name: &str) -> Option<String> {
        self.find(css).attr(name)
    }

    /// Clicks the first element matching `css` (does not wait for what follows: see
    /// [`Browser::submit`]).
    #[track_caller]
    pub fn click(&self, css: &str) {
        self.find(css).click();
    }

    /// Replaces the value of the input or textarea matching `css` by typing `value`.
    #[track_caller]
    pub fn fill(&self, css: &str, value: &str) {
        self.find(css).fill(value);
    }

    /// Chooses the option whose value is `value` in the `<select>` matching `css`.
    #[track_caller]
    pub fn select(&self, css: &str, value: &str) {
        let el = self.find(css);
        self.run(
            &format!("choosing `{value}` in `{css}`"),
            el.el.select_by_value(value),
        );
    }

    /// Clicks the button matching `css` and waits until the browser has left the page and
    /// loaded the next one (a form's submission, a link). Panics if the page stays.
    #[track_caller]
    pub fn submit(&self, button_css: &str) {
        let old = self.find("html");
        self.click(button_css);
        let start = Instant::now();
        // The old document's root goes stale once the next page replaced it.
        while self.rt.block_on(old.el.tag_name()).is_ok() {
            if start.elapsed() > COMMAND_TIMEOUT {
                panic!(
                    "{}: after clicking `{button_css}`, still on {} after {COMMAND_TIMEOUT:?} (no navigation)",
                    self.test,
                    self.current_url()
                );
            }
            std::thread::sleep(POLL);
        }
        self.wait_until("body", COMMAND_TIMEOUT);
    }

    /// Waits until an element matches `css`, and returns it.
    #[track_caller]
    pub fn wait_until(&self, css: &str, timeout: Duration) -> Element<'_> {
        let start = Instant::now();
        loop {
            if let Some(el) = self.try_find(css) {
                return el;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: waited {timeout:?} for `{css}` on {}; the page:\n{}",
                    self.test,
                    self.current_url(),
                    clip(&self.page_source(), 3000)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the first element matching `css` shows text containing `needle`; its text.
    #[track_caller]
    pub fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Some(el) = self.try_find(css) {
                // The element may be replaced between finding and reading it.
                if let Ok(text) = self.rt.block_on(el.el.text()) {
                    if text.contains(needle) {
                        return text;
                    }
                    last = Some(text);
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: waited {timeout:?} for `{css}` to contain {needle:?} on {}; its text: {last:?}",
                    self.test,
                    self.current_url()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Runs `script` (a function body: `return` gives the result; `arguments[i]` are `args`)
    /// in the page, and returns what it returned.
    #[track_caller]
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.run(
            &format!("running the script {:?}", clip(script, 200)),
            self.client.execute(script, args),
        )
    }

    /// Resizes the window so that the page's viewport (`innerWidth` x `innerHeight`, what
    /// CSS media queries see) is `width` x `height`. (Headless Chromium's window is taller
    /// than its viewport by a pretend browser UI; this measures and makes up the difference.)
    #[track_caller]
    pub fn set_window_size(&self, width: u32, height: u32) {
        let resize = |w: u32, h: u32| {
            self.run(
                &format!("resizing the window to {w}x{h}"),
                self.client.set_window_size(w, h),
            )
        };
        resize(width, height);
        let (w, h) = self.viewport();
        if (w, h) == (width, height) {
            return;
        }
        resize(
            (2 * width).saturating_sub(w),
            (2 * height).saturating_sub(h),
        );
        let now = self.viewport();
        assert_eq!(
            now,
            (width, height),
            "{}: the viewport after resizing the window for {width}x{height}",
            self.test
        );
    }

    /// The page's viewport, `innerWidth` x `innerHeight`.
    #[track_caller]
    pub fn viewport(&self) -> (u32, u32) {
        let size = self.execute("return [window.innerWidth, window.innerHeight]", vec![]);
        let n = |i: usize| size[i].as_u64().unwrap_or(0) as u32;
        (n(0), n(1))
    }

    /// Screenshots of the current page at the desktop and the phone size, as
    /// `target/screenshots/NAME-desktop.png` and `NAME-phone.png` (tools/screenshots copies
    /// them into docs/screenshots/); the window is back at the desktop size after. Their paths.
    #[track_caller]
    pub fn screenshot(&self, name: &str) -> (PathBuf, PathBuf) {
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{}: screenshot name {name:?}: use letters, digits, - and _",
            self.test
        );
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut paths = Vec::new();
        for (kind, (w, h)) in [("phone", PHONE), ("desktop", DESKTOP)] {
            self.set_window_size(w, h);
            // Let a layout that depends on the width settle (two frames; without the page's
            // JavaScript a promise never settles, so a pause instead).
            if self.javascript {
                self.execute(
                    "return new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))",
                    vec![],
                );
            } else {
                std::thread::sleep(Duration::from_millis(300));
            }
            let png = self.run(&format!("a {w}x{h} screenshot"), self.client.screenshot());
            let path = dir.join(format!("{name}-{kind}.png"));
            std::fs::write(&path, &png)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            // The flag that copies them into the docs (tools/screenshots sets it).
            if std::env::var_os("CONSTRUIR_SCREENSHOTS_TO_DOCS").is_some() {
                let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
                std::fs::create_dir_all(&docs)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", docs.display()));
                let copy = docs.join(format!("{name}-{kind}.png"));
                std::fs::write(&copy, &png)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", copy.display()));
            }
            paths.push(path);
        }
        let desktop = paths.pop().expect("desktop");
        let phone = paths.pop().expect("phone");
        (desktop, phone)
    }

    /// Every cookie the browser holds for the current page.
    #[track_caller]
    pub fn cookies(&self) -> Vec<Cookie> {
        self.run("the page's cookies", self.client.get_all_cookies())
            .into_iter()
            .map(|c| Cookie {
                name: c.name().to_string(),
                value: c.value().to_string(),
                path: c.path().map(String::from),
                domain: c.domain().map(String::from),
                secure: c.secure().unwrap_or(false),
                http_only: c.http_only().unwrap_or(false),
                same_site: c.same_site().map(|s| s.to_string()),
                expires: c
                    .expires()
                    .and_then(|e| e.datetime())
                    .map(|t| t.unix_timestamp()),
            })
            .collect()
    }

    /// The cookie called `name` for the current page, if the browser holds one.
    #[track_caller]
    pub fn cookie(&self, name: &str) -> Option<Cookie> {
        self.cookies().into_iter().find(|c| c.name == name)
    }

    #[track_caller]
    pub fn delete_cookies(&self) {
        self.run("deleting the cookies", self.client.delete_all_cookies());
    }

    /// Runs one WebDriver command, bounded by [`COMMAND_TIMEOUT`]; panics saying `what` it was.
    #[track_caller]
    fn run<T>(&self, what: &str, command: impl Future<Output = Result<T, CmdError>>) -> T {
        match block_on_within(&self.rt, COMMAND_TIMEOUT, command) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("{}: {what}: {e}", self.test),
            Err(_) => panic!(
                "{}: {what}: no answer from chromedriver within {COMMAND_TIMEOUT:?}",
                self.test
            ),
        }
    }
}

impl Element<'_> {
    /// The element's rendered text.
    #[track_caller]
    pub fn text(&self) -> String {
        self.browser
            .run(&format!("the text of `{}`", self.css), self.el.text())
    }

    /// The element's HTML attribute `name`.
    #[track_caller]
    pub fn attr(&self, name: &str) -> Option<String> {
        self.browser.run(
            &format!("the attribute {name} of `{}`", self.css),
            self.el.attr(name),
        )
    }

    /// The element's DOM property `name` (an input's current `value`, a checkbox's `checked`).
    #[track_caller]
    pub fn prop(&self, name: &str) -> Option<String> {
        self.browser.run(
            &format!("the property {name} of `{}`", self.css),
            self.el.prop(name),
        )
    }

    #[track_caller]
    pub fn tag_name(&self) -> String {
        self.browser
            .run(&format!("the tag of `{}`", self.css), self.el.tag_name())
    }

    #[track_caller]
    pub fn is_displayed(&self) -> bool {
        self.browser.run(
            &format!("whether `{}` is displayed", self.css),
            self.el.is_displayed(),
        )
    }

    #[track_caller]
    pub fn click(&self) {
        self.browser
            .run(&format!("clicking `{}`", self.css), self.el.click());
    }

    /// Clears the field and types `value`.
    #[track_caller]
    pub fn fill(&self, value: &str) {
        self.browser
            .run(&format!("clearing `{}`", self.css), self.el.clear());
        self.browser.run(
            &format!("typing into `{}`", self.css),
            self.el.send_keys(value),
        );
    }

    /// The element's outer HTML.
    #[track_caller]
    pub fn html(&self) -> String {
        self.browser
            .run(&format!("the HTML of `{}`", self.css), self.el.html(false))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() {
            show_log(&self.test, self.dir.path());
        }
        // Ending the session makes chromedriver close Chromium; whatever is left is killed.
        let close = self.client.clone().close();
        let _ = block_on_within(&self.rt, Duration::from_secs(10), close);
        kill_all(&mut self.driver, &self.dir.path().join("profile"));
    }
}

/// chromedriver until the session is open: killed, with its log shown, on a failure.
struct Starting {
    driver: Option<Child>,
    dir: PathBuf,
}

impl Starting {
    /// Waits until chromedriver says which port it listens on and answers there; the port.
    fn wait_for_driver(&mut self, test: &str) -> u16 {
        let start = Instant::now();
        let mut port = None;
        loop {
            if let Some(status) = self
                .driver
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten())
            {
                self.fail(
                    test,
                    &format!("{CHROMEDRIVER} exited ({status}) before answering"),
                );
            }
            if port.is_none() {
                port = driver_port(&self.dir.join("chromedriver.out"));
            }
            if let Some(port) = port
                && driver_ready(port)
            {
                return port;
            }
            if start.elapsed() > DRIVER_START_TIMEOUT {
                let what = match port {
                    Some(port) => format!("answer GET /status on 127.0.0.1:{port}"),
                    None => "say \"started successfully on port N\"".to_string(),
                };
                self.fail(
                    test,
                    &format!("{CHROMEDRIVER} did not {what} within {DRIVER_START_TIMEOUT:?}"),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn fail(&mut self, test: &str, why: &str) -> ! {
        show_log(test, &self.dir);
        if let Some(mut driver) = self.driver.take() {
            kill_all(&mut driver, &self.dir.join("profile"));
        }
        panic!("{test}: {why} (its log is above)");
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            kill_all(&mut driver, &self.dir.join("profile"));
        }
    }
}

/// Runs `future` on `rt` for at most `limit`.
fn block_on_within<T>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    future: impl Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    // The timer must be made inside the runtime.
    rt.block_on(async { tokio::time::timeout(limit, future).await })
}

/// Where [`Browser::screenshot`] writes: `target/screenshots/`.
pub fn screenshots_dir() -> PathBuf {
    let profile_dir = construir_tests::target_dir();
    profile_dir
        .parent()
        .unwrap_or(&profile_dir)
        .join("screenshots")
}

/// Whether the first bytes are a PNG's signature.
pub fn is_png(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

/// A PNG's width and height, from its IHDR chunk.
pub fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if !is_png(bytes) || bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// The port chromedriver printed ("ChromeDriver was started successfully on port N.").
fn driver_port(out: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(out).ok()?;
    let (_, rest) = text.split_once("started successfully on port ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Whether chromedriver answers `GET /status` with `"ready": true`.
fn driver_ready(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"ready\":true") || answer.contains("\"ready\": true")
}

/// Kills chromedriver's process group (Chromium is in it), then any process that still names
/// `profile` (a Chromium helper that left the group), and reaps chromedriver.
fn kill_all(driver: &mut Child, profile: &Path) {
    let pid = driver.id() as i32;
    // SAFETY: signalling the process group of our own child (it leads it: process_group(0)).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = driver.wait();
    let needle = profile.display().to_string();
    for _ in 0..50 {
        let left = processes_naming(&needle);
        if left.is_empty() {
            return;
        }
        for pid in left {
            // SAFETY: a Chromium process this browser started (its command line names our
            // fresh profile directory).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes whose command line contains `needle` (zombies have an empty one).
pub fn processes_naming(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The end of chromedriver's log and output, to stderr.
fn show_log(test: &str, dir: &Path) {
    for name in ["chromedriver.log", "chromedriver.out"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        eprintln!(
            "----- {test}: the last {} lines of {name} -----",
            tail.len()
        );
        for line in tail {
            eprintln!("{}", clip(line, 400));
        }
    }
    eprintln!("----- {test}: end of chromedriver's log -----");
}

/// At most `max` bytes of `s` (on a character boundary), marked when cut.
fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes more)", &s[..end], s.len() - end)
}
