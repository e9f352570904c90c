//! Container helpers shared by the tests that run the image: the build (once per test binary), one
//! scope of networks and containers per test, the fake provider in its own container, `docker logs -f`
//! as lines to wait for, and health events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{CLIENT_ID, CLIENT_SECRET, assert_no_secrets};

pub const IMAGE: &str = "kakao-tokend:test";
pub const RUNTIME: &str = "kakao-tokend-runtime:standin";
pub const NONROOT: u32 = 65532;
/// The longest any single wait here may take before the test fails.
pub const LONG: Duration = Duration::from_secs(2 * super::LONG.as_secs());

pub struct Built {
    pub fake_bin: PathBuf,
}

pub static BUILT: OnceLock<Option<Built>> = OnceLock::new();

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The image and the fake's binary, built once; `None` (the test is skipped) without a Docker engine.
pub fn built() -> Option<&'static Built> {
    BUILT
        .get_or_init(|| {
            let probe = Command::new("docker")
                .args(["version", "--format", "{{.Server.Version}}"])
                .output();
            let missing = match &probe {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "no Docker engine: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Some(format!("no Docker engine (no docker command: {e})")),
            };
            // The tests give folders to the image's user and read named volumes: root, as CI runs.
            let missing = missing.or_else(|| {
                (!nix::unistd::Uid::effective().is_root())
                    .then(|| "needs root (it chowns folders to uid 65532 and reads volumes)".to_string())
            });
            if !super::can_run("the container tests", missing) {
                return None;
            }
            let started = Instant::now();
            let out = Command::new("bash")
                .arg(repo().join("docker/build-image.sh"))
                .arg(IMAGE)
                .current_dir(repo())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker/build-image.sh failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "image built in {:.1} s: {}",
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
            Some(Built {
                fake_bin: repo().join("target/debug/fake-kakao"),
            })
        })
        .as_ref()
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

/// Runs docker, panics naming the command if it fails, returns its stdout trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn inspect(object: &str, format: &str) -> String {
    docker_ok(&["inspect", "-f", format, object])
}

/// One test's private network, containers, volumes and folder, all removed when it ends.
pub struct Scope {
    pub id: String,
    pub dir: tempfile::TempDir,
}

impl Scope {
    pub fn new(test: &str) -> Scope {
        let id = format!("kt{}-{test}", std::process::id());
        docker_ok(&["network", "create", "--label", &format!("kakao-tokend-test={id}"), &id]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Scope { id, dir }
    }

    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.id)
    }

    /// `docker run -d` on this scope's network, labelled for clean-up; returns the container's name.
    pub fn run(&self, what: &str, options: &[&str], image_and_args: &[&str]) -> String {
        let name = self.name(what);
        let label = format!("kakao-tokend-test={}", self.id);
        let mut args = vec!["run", "-d", "--name", &name, "--label", &label];
        if !options.contains(&"--network") {
            args.extend_from_slice(&["--network", &self.id]);
        }
        args.extend_from_slice(options);
        args.extend_from_slice(image_and_args);
        docker_ok(&args);
        name
    }

    /// Another private network of this scope's, removed with it; returns its name.
    pub fn network(&self, what: &str) -> String {
        let name = self.name(what);
        docker_ok(&[
            "network",
            "create",
            "--label",
            &format!("kakao-tokend-test={}", self.id),
            &name,
        ]);
        name
    }

    /// The fake Kakao, reachable as `fake` on the network, its Client Secret on.
    pub fn fake(&self, built: &Built, access_ttl: u64, refresh_ttl: u64) -> Fake {
        self.fake_on(built, &self.id, access_ttl, refresh_ttl, &[])
    }

    /// The fake on `network`, with more `serve` options (`--rotate-within S`, say).
    pub fn fake_on(&self, built: &Built, network: &str, access_ttl: u64, refresh_ttl: u64, more: &[&str]) -> Fake {
        let bin = format!("{}:/usr/local/bin/fake-kakao:ro", built.fake_bin.display());
        let (access, refresh) = (access_ttl.to_string(), refresh_ttl.to_string());
        let mut args = vec![
            RUNTIME,
            "/usr/local/bin/fake-kakao",
            "serve",
            "--access-ttl",
            &access,
            "--refresh-ttl",
            &refresh,
            "--client-secret",
            CLIENT_SECRET,
        ];
        args.extend_from_slice(more);
        let name = self.run(
            "fake",
            &[
                "--network",
                network,
                "--network-alias",
                "fake",
                "--read-only",
                "--user",
                "65532:65532",
                "-v",
                &bin,
            ],
            &args,
        );
        let fake = Fake {
            addr: format!("{}:8080", ip(&name)),
        };
        // Listening once its first line is out.
        LogStream::follow(&name).wait_line(|l| l.contains("fake-kakao listening"));
        fake
    }

    /// A folder of the scope's, made for the config (mounted read-only at /etc/kakao-tokend).
    pub fn config_dir(&self, toml: &str) -> PathBuf {
        let dir = self.dir.path().join("etc");
        std::fs::create_dir_all(&dir).unwrap();
        write_by_rename(&dir.join("config.toml"), toml);
        dir
    }

    /// A folder of the scope's for token files, owned by `uid:gid`, 0750.
    pub fn tokens_dir(&self, uid: u32, gid: u32) -> PathBuf {
        let dir = self.dir.path().join("tokens");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        dir
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let label = format!("label=kakao-tokend-test={}", self.id);
        let ids = docker(&["ps", "-aq", "--filter", &label]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            docker(&["rm", "-f", "-v", id]);
        }
        let volumes = docker(&["volume", "ls", "-q", "--filter", &label]);
        for v in String::from_utf8_lossy(&volumes.stdout).split_whitespace() {
            docker(&["volume", "rm", "-f", v]);
        }
        let networks = docker(&["network", "ls", "-q", "--filter", &label]);
        for n in String::from_utf8_lossy(&networks.stdout).split_whitespace() {
            docker(&["network", "rm", n]);
        }
    }
}

/// As an editor saves: a new file renamed over the old one.
pub fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A user logs in at the fake; the answer becomes `ACCOUNT.json` in `dir` (the seed's format), owned by
/// `owner`, as the container's user will find it.
pub fn seed_login(dir: &Path, account: &str, fake: &Fake, owner: u32) {
    let file = dir.join(format!("{account}.json"));
    write_by_rename(&file, &fake.login());
    std::os::unix::fs::chown(&file, Some(owner), Some(owner)).unwrap();
}

/// `-v` for the config folder (read-only) and for the token folder.
pub fn etc_mount(dir: &Path) -> String {
    format!("{}:/etc/kakao-tokend:ro", dir.display())
}

pub fn tokens_mount(dir: &Path) -> String {
    format!("{}:/var/lib/kakao-tokend", dir.display())
}

/// The account's Client Secret, from the environment.
pub fn secret_env() -> String {
    format!("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET={CLIENT_SECRET}")
}

pub fn ip(container: &str) -> String {
    inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
}

/// One HTTP/1.1 request from the host to a container's address; (status, body).
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot reach {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    // Both servers here answer with a Content-Length, never chunked, so the body is what follows the head.
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// The fake in its container, driven through its admin interface.
pub struct Fake {
    pub addr: String,
}

impl Fake {
    pub fn admin(&self, method: &str, path: &str) -> String {
        let (status, body) = http(&self.addr, method, path);
        assert_eq!(status, 200, "{method} {path}: {body}");
        body
    }

    /// A user logs in: the token response, to be written as a token file (the seed's format).
    pub fn login(&self) -> String {
        self.admin("POST", &format!("/admin/login?client_id={CLIENT_ID}"))
    }

    pub fn revoke(&self) {
        self.admin("POST", "/admin/revoke");
    }

    pub fn delay(&self, ms: u64) {
        self.admin("POST", &format!("/admin/delay?ms={ms}"));
    }

    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.admin("GET", "/admin/stats")).unwrap()
    }

    /// Every answer waits `ms` after the request was carried out (a rotation committed as it arrives).
    pub fn hold_answers(&self, ms: u64) {
        self.admin("POST", &format!("/admin/delay?ms={ms}&commit=first"));
    }

    /// Waits until the counter reaches `n`; the counters then.
    pub fn wait(&self, counter: &str, n: u64) -> Value {
        let body = self.admin(
            "GET",
            &format!("/admin/wait?{counter}={n}&timeout_ms={}", LONG.as_millis()),
        );
        serde_json::from_str(&body).unwrap()
    }

    /// The browser step: the address the browser would land on, for pasting into `login`.
    pub fn authorize(&self, authorize_url: &str) -> String {
        let query = authorize_url.split_once('?').unwrap().1;
        self.admin("GET", &format!("/admin/authorize?{query}"))
            .trim()
            .to_string()
    }

    pub fn access_token_works(&self, token: &str) -> bool {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        write!(
            stream,
            "GET /v1/user/access_token_info HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer.starts_with("HTTP/1.1 200")
    }
}

/// The config every container test starts from: one account against the fake, over plain http on the
/// private network (hence the opt-in), Client Secret given by the environment or a secret file.
pub fn config(daemon_extra: &str, account_extra: &str) -> String {
    format!(
        r#"[daemon]
request_timeout = "5s"
{daemon_extra}

[accounts.me]
client_id = "{CLIENT_ID}"
redirect_uri = "https://localhost.com"
auth_url = "http://fake:8080"
api_url = "http://fake:8080"
allow_insecure_http = true
{account_extra}
"#
    )
}

/// `docker logs -f`: every line the container prints, as it comes.
pub struct LogStream {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    child: std::process::Child,
}

impl LogStream {
    pub fn follow(container: &str) -> LogStream {
        Self::spawn(Command::new("docker").args(["logs", "-f", container]))
    }

    pub fn spawn(cmd: &mut Command) -> LogStream {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        LogStream {
            lines,
            seen: Vec::new(),
            child,
        }
    }

    /// The first line from now on for which `pred` holds; panics after LONG with what was seen.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no such line within {LONG:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The first JSON log line from now on whose `event` field is `event` (the stable names listed in
    /// the README) and, when given, whose account span is `account`.
    pub fn wait_event(&mut self, event: &str, account: Option<&str>) -> Value {
        let line = self.wait_line(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["event"] == event && account.is_none_or(|a| v["span"]["account"] == a))
        });
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `docker events` for one container's health, from before it started: waits for `status`.
pub fn wait_health(container: &str, since: &str, status: &str) {
    let filter = format!("container={container}");
    let mut events = LogStream::spawn(Command::new("docker").args([
        "events",
        "--since",
        since,
        "--filter",
        &filter,
        "--filter",
        "event=health_status",
        "--format",
        "{{.Status}}",
    ]));
    events.wait_line(|l| l.trim() == format!("health_status: {status}"));
}

pub fn now_for_events() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
}

/// `docker exec -i CONTAINER kakao-tokend login` with the paste flow: the authorize address is read from
/// its stdout, the fake completes the browser step, the landing address is pasted back.
pub fn login_by_paste(container: &str, fake: &Fake, account: &str) {
    let mut login = Command::new("docker")
        .args(["exec", "-i", container, "kakao-tokend", "login", "--account", account])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(login.stdout.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "login printed no authorize address"
        );
        if line.contains("/oauth/authorize?") {
            break line.trim().to_string();
        }
    };
    let landing = fake.authorize(&url);
    assert!(landing.starts_with("https://localhost.com/?code="), "{landing}");
    let mut stdin = login.stdin.take().unwrap();
    writeln!(stdin, "{landing}").unwrap();
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = login.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "login failed: {stderr}");
    assert_no_secrets("login in the container", &format!("{line}{rest}{stderr}"));
}

pub fn token_file(dir: &Path, account: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("{account}.json"))).unwrap()).unwrap()
}

pub fn logs(container: &str) -> String {
    let out = docker(&["logs", container]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
