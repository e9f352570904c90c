//! Shared by the integration tests: the fake Kakao on loopback, a temp folder with a config, and the
//! real `kakao-tokend` binary with its JSON log lines readable as events to wait for.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)]

pub mod containers;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_kakao::{FakeEvent, FakeKakao, FakeSettings};
use kakao_tokend::token::TokenFile;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub const CLIENT_ID: &str = "demo-rest-api-key";

/// The longest any one wait in a test may take before the test fails.
pub const LONG: Duration = Duration::from_secs(30);

/// The random generator of a test that draws (kill instants, a person's pace): seeded from
/// `TEST_SEED` when set, else at random, and the seed printed, so that a failure can be replayed.
pub fn seeded_rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::Rng::new().u64(..));
    eprintln!("{test}: TEST_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// Whether a test that needs something this machine may lack can run: `missing` says what is missing.
/// Where it is missing the test prints `SKIPPED: <reason>` and returns (libtest has no run-time skip,
/// and an early return counts as a pass), except under `CI=true`, where a skipped check would be a hole
/// in CI: it fails.
pub fn can_run(test: &str, missing: Option<String>) -> bool {
    let Some(why) = missing else { return true };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true, and {test} cannot run: {why}"
    );
    eprintln!("SKIPPED: {test}: {why}");
    false
}

/// For tests that mount a tmpfs or drop to uid [`NONROOT`]: root is needed.
pub fn can_run_as_root(test: &str) -> bool {
    can_run(
        test,
        (!nix::unistd::Uid::effective().is_root())
            .then(|| "needs root (it mounts a tmpfs or drops to uid 65532); CI runs as root".to_string()),
    )
}
/// The app's client secret: Env turns Client Secret on for the default app, so that every refresh in the
/// tests carries one for the secrets sweep to look for.
pub const CLIENT_SECRET: &str = "fake-cs-Q7vR2mXk9LpW4tZb8NcY";

/// What the fake's secrets start with (access and refresh tokens, authorization codes) and the client
/// secret: none may appear in anything the binary prints, the `token` command's stdout aside.
const SECRET_MARKERS: [&str; 4] = ["fake-at-", "fake-rt-", "fake-code-", CLIENT_SECRET];

/// Bytes of output swept for secrets so far in this test binary.
static SWEPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The kinds of secret `text` holds, by what they start with.
pub fn secrets_in(text: &str) -> Vec<&'static str> {
    SECRET_MARKERS.iter().copied().filter(|m| text.contains(m)).collect()
}

/// Panics if `text`, printed by the binary (`what`), holds a secret.
pub fn assert_no_secrets(what: &str, text: &str) {
    let found = secrets_in(text);
    assert!(
        found.is_empty(),
        "{what} printed a secret (starting {found:?}):\n{text}"
    );
    let total = SWEPT.fetch_add(text.len() as u64, std::sync::atomic::Ordering::Relaxed) + text.len() as u64;
    eprintln!(
        "secret sweep: {what}: {} bytes clean ({total} in this binary)",
        text.len()
    );
}

/// Runs a command of the binary to its end with the HTTP stack's own logs on (RUST_LOG=trace) and
/// sweeps everything it printed for secrets; `prints_token` exempts stdout (the `token` command). A
/// RUST_LOG the caller set is kept.
pub fn output_swept(cmd: &mut Command, prints_token: bool) -> std::process::Output {
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "trace");
    }
    let out = cmd.output().unwrap();
    let what = format!("{cmd:?}");
    assert_no_secrets(&what, &String::from_utf8_lossy(&out.stderr));
    if !prints_token {
        assert_no_secrets(&what, &String::from_utf8_lossy(&out.stdout));
    }
    out
}
pub const BIN: &str = env!("CARGO_BIN_EXE_kakao-tokend");

pub struct Env {
    pub fake: FakeKakao,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Env {
    pub async fn new(mut settings: FakeSettings) -> Env {
        for app in settings.clients.iter_mut().filter(|c| c.client_id == CLIENT_ID) {
            app.client_secret.get_or_insert_with(|| CLIENT_SECRET.into());
        }
        let fake = FakeKakao::start(settings).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        Env { fake, dir, config }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An `[accounts.NAME]` table pointing at the fake, token file `NAME.json` in the temp folder.
    pub fn account(&self, name: &str) -> String {
        account_at(name, &self.fake)
    }

    pub fn write_config(&self, daemon: &str, accounts: &[&str]) {
        let mut text = format!("[daemon]\n{daemon}\n\n");
        for a in accounts {
            text.push_str(&self.account(a));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// Logs a user in at the fake and writes the token file the way `login` would (full form).
    pub fn login(&self, name: &str) -> TokenFile {
        self.login_at(&self.fake, name)
    }

    /// The same at another fake (a second provider).
    pub fn login_at(&self, fake: &FakeKakao, name: &str) -> TokenFile {
        let raw = fake.login(CLIENT_ID);
        let resp = kakao_tokend::token::TokenResponse::parse(raw.to_string().as_bytes()).unwrap();
        let file = TokenFile::from_response(resp, jiff::Timestamp::now());
        kakao_tokend::store::publish_token(
            &self.path(&format!("{name}.json")),
            &file.to_bytes(),
            0,
            jiff::Timestamp::now(),
            kakao_tokend::store::FileAccess::default(),
        )
        .unwrap();
        file
    }

    pub fn token(&self, name: &str) -> TokenFile {
        TokenFile::parse(&std::fs::read(self.path(&format!("{name}.json"))).unwrap()).unwrap()
    }

    pub fn token_bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("{name}.json"))).unwrap()
    }

    pub fn refresh_token(&self, name: &str) -> String {
        refresh_token_of(&self.path(&format!("{name}.json")))
    }

    pub fn spawn(&self) -> Daemon {
        Daemon::spawn(&self.config, &[])
    }

    /// Waits for a fake event matching `pred`, failing the test after `limit`.
    pub async fn wait_fake(
        &self,
        rx: &mut broadcast::Receiver<FakeEvent>,
        limit: Duration,
        pred: impl Fn(&FakeEvent) -> bool,
    ) -> FakeEvent {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(ev)) if pred(&ev) => return ev,
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(e)) => panic!("fake event stream ended: {e}"),
                Err(_) => panic!("no matching fake event within {limit:?}"),
            }
        }
    }
}

/// The refresh token in a token file.
pub fn refresh_token_of(path: &Path) -> String {
    let file = TokenFile::parse(&std::fs::read(path).unwrap()).unwrap();
    file.refresh_token.unwrap().expose().to_string()
}

/// An `[accounts.NAME]` table pointing at `fake`, token file `NAME.json` beside the config.
pub fn account_at(name: &str, fake: &FakeKakao) -> String {
    let url = fake.url();
    let secret = fake
        .settings()
        .clients
        .iter()
        .find(|c| c.client_id == CLIENT_ID)
        .and_then(|c| c.client_secret.as_deref())
        .map(|s| format!("client_secret = \"{s}\"\n"))
        .unwrap_or_default();
    format!(
        "[accounts.{name}]\nclient_id = \"{CLIENT_ID}\"\n{secret}redirect_uri = \"https://localhost.com\"\ntoken_file = \"{name}.json\"\nauth_url = \"{url}\"\napi_url = \"{url}\"\n\n"
    )
}

/// The real binary, running `run`, with its stderr (JSON logs) collected line by line.
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
    /// A message from each of the two reader threads when the process's pipe it reads closes.
    pipes_closed: std::sync::mpsc::Receiver<()>,
    seen: usize,
}

impl Daemon {
    pub fn spawn(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon::from_command(cmd)
    }

    /// Runs `cmd` (which ends up running `kakao-tokend run`) with JSON logs collected from stderr.
    pub fn from_command(mut cmd: Command) -> Daemon {
        // Trace level, unless the caller chose one: the HTTP and TLS stacks' own logs are swept for
        // secrets too.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "trace");
        }
        cmd.env("KAKAO_TOKEND__DAEMON__LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let (stderr, stdout) = (child.stderr.take().unwrap(), child.stdout.take().unwrap());
        let (lines, out_lines) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let (tx, count) = watch::channel(0usize);
        let (closed_tx, pipes_closed) = std::sync::mpsc::channel();
        let (err_closed, out_closed) = (closed_tx.clone(), closed_tx);
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut all = sink.lock().unwrap();
                all.push(line);
                let n = all.len();
                drop(all);
                let _ = tx.send(n);
            }
            let _ = err_closed.send(());
        });
        let sink = out_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
            let _ = out_closed.send(());
        });
        Daemon {
            child,
            lines,
            stdout: out_lines,
            count,
            pipes_closed,
            seen: 0,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap();
    }

    pub fn all_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.all_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for the next log event (after those already waited for) that matches `pred`.
    pub async fn wait_log(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let lines = self.all_lines();
            while self.seen < lines.len() {
                let line = &lines[self.seen];
                self.seen += 1;
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && pred(&v)
                {
                    return v;
                }
            }
            match tokio::time::timeout_at(deadline, self.count.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!(
                    "daemon's stderr closed before a matching line; log:\n{}",
                    lines.join("\n")
                ),
                Err(_) => panic!("no matching log line within {limit:?}; log:\n{}", lines.join("\n")),
            }
        }
    }

    /// Waits for the next log line whose `event` field is `event` (the stable names of src/events.rs,
    /// listed in the README), optionally for one account. Tests wait on these, not on English text.
    pub async fn wait_event(&mut self, limit: Duration, account: Option<&str>, event: &str) -> Value {
        let account = account.map(str::to_owned);
        let event = event.to_owned();
        self.wait_log(limit, move |v| {
            v["event"] == event.as_str() && account.as_deref().is_none_or(|a| account_of(v) == Some(a))
        })
        .await
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Every line the daemon wrote is collected once the reader sees the pipe's end.
                while tokio::time::timeout(limit, self.count.changed())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {}
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "daemon did not exit within {limit:?}; log:\n{}",
                    self.all_lines().join("\n")
                );
            }
            // Child exit has no async notification in std; this bounded poll only waits for the exit.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        // Everything the process printed, read to the pipes' end: a hook the daemon started may still
        // hold them for a moment, so the wait is bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..2 {
            let _ = self
                .pipes_closed
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        let pid = self.child.id();
        assert_no_secrets(&format!("daemon {pid} (stderr)"), &self.all_lines().join("\n"));
        assert_no_secrets(
            &format!("daemon {pid} (stdout)"),
            &self.stdout.lock().unwrap().join("\n"),
        );
    }
}

/// A log line's `event` field ("" when it has none).
pub fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or_default()
}

pub fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

pub fn account_of(v: &Value) -> Option<&str> {
    v["span"]["account"].as_str()
}

pub fn level(v: &Value) -> &str {
    v["level"].as_str().unwrap_or_default()
}

/// Reads a token file every couple of milliseconds on a thread of its own and counts what it sees: a
/// reader of the published file must never find it missing or torn.
pub struct FileReader {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<ReadCounts>>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReadCounts {
    pub reads: u64,
    pub torn: u64,
    pub missing: u64,
}

impl FileReader {
    pub fn start(path: PathBuf) -> FileReader {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut counts = ReadCounts::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match std::fs::read(&path) {
                    Ok(bytes) => match TokenFile::parse(&bytes) {
                        Ok(f) if !f.access_token.is_empty() => {}
                        _ => counts.torn += 1,
                    },
                    Err(_) => counts.missing += 1,
                }
                counts.reads += 1;
                // The reader's pace, not a wait for anything.
                std::thread::sleep(Duration::from_millis(2));
            }
            counts
        });
        FileReader {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> ReadCounts {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for FileReader {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Temp files of `name` left in `dir` (a crash's leftovers, or a write that failed half-way).
pub fn temp_files(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| kakao_tokend::store::is_temp_name(name, n))
        .collect()
}

/// The container image's user, which the tests that need a user without root's powers run as.
pub const NONROOT: u32 = 65532;
/// distroless/cc's PATH; the image sets nothing else.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The binary with `args` as uid/gid [`NONROOT`] through setpriv, with only the image's environment.
/// Root ignores file modes, so a test of a folder the daemon cannot write to needs this.
pub fn as_nonroot(args: &[&str], config: &Path) -> Command {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test drops to uid {NONROOT} with setpriv and needs root (CI runs as root)"
    );
    let mut cmd = Command::new("setpriv");
    cmd.args([
        format!("--reuid={NONROOT}"),
        format!("--regid={NONROOT}"),
        "--clear-groups".into(),
        "--".into(),
    ])
    .arg(BIN)
    .args(args)
    .arg("--config")
    .arg(config)
    .env_clear()
    .env("PATH", IMAGE_PATH);
    cmd
}
