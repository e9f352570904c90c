//! Shared by the integration tests: the fake Kakao on loopback, a temp folder with a config, and the
//! real `kakao-tokend` binary with its JSON log lines readable as events to wait for.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stderr)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kakao_tokend::fake::{FakeEvent, FakeKakao, FakeSettings};
use kakao_tokend::token::TokenFile;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub const CLIENT_ID: &str = "demo-rest-api-key";
pub const BIN: &str = env!("CARGO_BIN_EXE_kakao-tokend");

pub struct Env {
    pub fake: FakeKakao,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Env {
    pub async fn new(settings: FakeSettings) -> Env {
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
        let url = self.fake.url();
        format!(
            "[accounts.{name}]\nclient_id = \"{CLIENT_ID}\"\nredirect_uri = \"https://localhost.com\"\ntoken_file = \"{name}.json\"\nauth_url = \"{url}\"\napi_url = \"{url}\"\n\n"
        )
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
        let raw = self.fake.login(CLIENT_ID);
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
        self.token(name).refresh_token.unwrap().expose().to_string()
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

/// The real binary, running `run`, with its stderr (JSON logs) collected line by line.
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    count: watch::Receiver<usize>,
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
        cmd.env("KAKAO_TOKEND__DAEMON__LOG_FORMAT", "json")
            .env("RUST_LOG", "kakao_tokend=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, count) = watch::channel(0usize);
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
        });
        Daemon {
            child,
            lines,
            count,
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

    /// Waits for a log event whose message contains `text`, optionally for one account.
    pub async fn wait_message(&mut self, limit: Duration, account: Option<&str>, text: &str) -> Value {
        let account = account.map(str::to_owned);
        let text = text.to_owned();
        self.wait_log(limit, move |v| {
            message(v).contains(&text) && account.as_deref().is_none_or(|a| account_of(v) == Some(a))
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
    }
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
