//! A headless Chromium driven through chromedriver (W3C WebDriver over HTTP), for the web view's
//! tests (tests/web.rs, tests/web_pipelines.rs).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{lines_of, wait_for, wait_for_line};

pub(crate) struct Browser {
    driver: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

fn agent() -> ureq::Agent {
    super::server::Server::agent()
}

impl Browser {
    pub(crate) fn start() -> Browser {
        // On a port the kernel chooses, which chromedriver reports on stdout.
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium chromium-driver)");
        let stdout = lines_of(driver.stdout.take().unwrap());
        let port = wait_for_line(&stdout, Duration::from_secs(20), |l| {
            l.strip_prefix("ChromeDriver was started successfully on port ")?
                .trim_end_matches('.')
                .parse::<u16>()
                .ok()
        })
        .unwrap_or_else(|out| panic!("chromedriver did not start:\n{out}"));
        let base = format!("http://127.0.0.1:{port}");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let mut r = agent()
            .post(&format!("{base}/session"))
            .send(caps.to_string().as_str())
            .unwrap();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
            _profile: profile,
        }
    }

    pub(crate) fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut r = match method {
            "GET" => agent().get(&url).call().unwrap(),
            "DELETE" => agent().delete(&url).call().unwrap(),
            _ => agent().post(&url).send(body.to_string().as_str()).unwrap(),
        };
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
    }

    pub(crate) fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    pub(crate) fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )["value"]
            .clone()
    }

    pub(crate) fn wait(&self, what: &str, script: &str, timeout: Duration) {
        wait_for(what, timeout, || self.eval(script) == json!(true));
    }

    pub(crate) fn click(&self, css: &str) {
        let el = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        let id = el["value"]["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("{css}: {el}"))
            .to_string();
        self.cmd("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Runs `script` as WebDriver's asynchronous script: its last argument is the callback
    /// that gives the answer.
    pub(crate) fn eval_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            json!({"script": script, "args": []}),
        )["value"]
            .clone()
    }

    /// A Chrome DevTools command through chromedriver (`Emulation.*` for widths and colour
    /// schemes).
    pub(crate) fn cdp(&self, cmd: &str, params: Value) -> Value {
        let v = self.cmd(
            "POST",
            "/goog/cdp/execute",
            json!({"cmd": cmd, "params": params}),
        );
        assert!(v["value"].get("error").is_none(), "{cmd}: {v}");
        v
    }

    /// The page's viewport: `width` CSS pixels wide, as a phone when narrower than 600 px.
    pub(crate) fn viewport(&self, width: u32, height: u32) {
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}),
        );
    }

    /// `prefers-color-scheme: dark` on or off.
    pub(crate) fn dark(&self, on: bool) {
        self.cdp(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": if on { "dark" } else { "light" }}]}),
        );
    }

    /// How many CSS pixels the page is wider than its viewport (0: no horizontal scrolling).
    pub(crate) fn horizontal_overflow(&self) -> i64 {
        self.eval(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        )
        .as_i64()
        .unwrap()
    }

    /// Keys typed into the focused element (WebDriver's key actions): `\u{E004}` is Tab,
    /// `\u{E007}` Enter, `\u{E00C}` Escape.
    pub(crate) fn keys(&self, keys: &str) {
        let mut actions = Vec::new();
        for c in keys.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.cmd(
            "POST",
            "/actions",
            json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]}),
        );
        self.cmd("DELETE", "/actions", Value::Null);
    }

    /// The critical and serious violations axe-core (vendored, tests/vendor/axe-core) finds on
    /// the page as it is now: one line per rule, with the first elements it names.
    pub(crate) fn axe_violations(&self) -> Vec<String> {
        const AXE: &str = include_str!("../vendor/axe-core/axe.min.js");
        if self.eval("return typeof window.axe === 'object';") != json!(true) {
            self.eval(&format!("{AXE}\nreturn true;"));
        }
        let v = self.eval_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, {resultTypes: ['violations']})
               .then(r => done(r.violations
                 .filter(v => v.impact === 'critical' || v.impact === 'serious')
                 .map(v => v.id + ' (' + v.impact + '): ' + v.help + ' at '
                   + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))))
               .catch(e => done(['axe failed: ' + e]));",
        );
        v.as_array()
            .unwrap_or_else(|| panic!("axe: {v}"))
            .iter()
            .map(|l| l.as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Fails the test when axe-core finds a critical or serious violation on `page`.
    pub(crate) fn assert_accessible(&self, page: &str) {
        let found = self.axe_violations();
        assert!(found.is_empty(), "{page}: {}", found.join("\n"));
    }

    pub(crate) fn alert_open(&self) -> bool {
        self.cmd("GET", "/alert/text", Value::Null)["value"]
            .get("error")
            .is_none()
    }

    /// A screenshot to `target/test-artifacts/NAME.png`, or to `$MISTRY_TEST_ARTIFACTS` (for
    /// a user who cannot write the target directory).
    pub(crate) fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let v = self.cmd("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        let dir = std::env::var_os("MISTRY_TEST_ARTIFACTS").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts"),
            PathBuf::from,
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = agent()
            .delete(&format!("{}/session/{}", self.base, self.session))
            .call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
