//! `fake-kakao`: the fake provider as a program of its own, for tests that run it in a container, and
//! two helpers those tests run beside the daemon.
//!
//! ```text
//! fake-kakao serve [--listen 0.0.0.0:8080] [--access-ttl S] [--refresh-ttl S] [--rotate-within S]
//!                  [--client-id ID] [--client-secret SECRET] [--redirect-uri URI]...
//! fake-kakao read --file PATH [--file PATH]... --check URL [--every MS]
//! fake-kakao orphan [--linger MS]
//! ```
//!
//! - `serve` answers as the fake Kakao (and its `/admin/` interface) until SIGTERM.
//! - `read` is a consumer of the token file: every `--every` ms it reads the file and asks the fake
//!   whether its `access_token` works. Each failure is printed as it happens, and a summary line at
//!   SIGTERM: `{"summary":{"reads":…,"valid":…,"invalid":…,"unreadable":…,"tokens":…}}`.
//! - `orphan` starts a child of its own that outlives it by `--linger` ms, and exits at once: a hook
//!   that leaves an orphan behind, for whoever is PID 1 to reap.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line test helper: its output is what it is for"
)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use fake_kakao::{FakeClient, FakeKakao, FakeSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn usage() -> ExitCode {
    eprintln!(
        "usage: fake-kakao serve [--listen ADDR] [--access-ttl S] [--refresh-ttl S] [--rotate-within S] \
         [--client-id ID] [--client-secret SECRET] [--redirect-uri URI]...\n\
         \x20      fake-kakao read --file PATH [--file PATH]... --check URL [--every MS]\n\
         \x20      fake-kakao orphan [--linger MS]"
    );
    ExitCode::from(2)
}

/// `--key value` pairs; a key may repeat.
fn options(args: &[String]) -> Option<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut it = args.iter();
    while let Some(key) = it.next() {
        let key = key.strip_prefix("--")?;
        out.entry(key.to_string()).or_default().push(it.next()?.clone());
    }
    Some(out)
}

fn one<T: std::str::FromStr>(opts: &HashMap<String, Vec<String>>, key: &str) -> Result<Option<T>, String> {
    opts.get(key)
        .and_then(|v| v.last())
        .map(|v| v.parse::<T>().map_err(|_| format!("--{key} {v:?} is not valid")))
        .transpose()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        return usage();
    };
    let Some(opts) = options(rest) else {
        return usage();
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fake-kakao: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command.as_str() {
        "serve" => runtime.block_on(serve(&opts)),
        "read" => runtime.block_on(read(&opts)),
        "orphan" => orphan(&opts),
        "linger" => linger(&opts),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-kakao {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn terminated() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn serve(opts: &HashMap<String, Vec<String>>) -> Result<(), String> {
    let listen: SocketAddr = one(opts, "listen")?.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    let defaults = FakeSettings::default();
    let access_ttl = one(opts, "access-ttl")?.unwrap_or(defaults.access_ttl);
    let refresh_ttl = one(opts, "refresh-ttl")?.unwrap_or(defaults.refresh_ttl);
    let mut settings = FakeSettings::fast(access_ttl, refresh_ttl);
    if let Some(within) = one(opts, "rotate-within")? {
        settings.rotate_within = within;
    }
    let mut client = FakeClient::new(&one::<String>(opts, "client-id")?.unwrap_or_else(|| "demo-rest-api-key".into()));
    client.client_secret = one(opts, "client-secret")?;
    if let Some(uris) = opts.get("redirect-uri") {
        client.redirect_uris.clone_from(uris);
    }
    settings.clients = vec![client];
    let fake = FakeKakao::start_at(settings, listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    println!("fake-kakao listening on {}", fake.url());
    terminated().await
}

#[derive(Debug, Default)]
struct Reads {
    reads: u64,
    valid: u64,
    invalid: u64,
    unreadable: u64,
    tokens: HashSet<String>,
}

async fn read(opts: &HashMap<String, Vec<String>>) -> Result<(), String> {
    let files: Vec<String> = opts.get("file").cloned().unwrap_or_default();
    if files.is_empty() {
        return Err("--file is required".into());
    }
    let check: String = one(opts, "check")?.ok_or("--check is required")?;
    let every = Duration::from_millis(one(opts, "every")?.unwrap_or(100));
    let check = url::Url::parse(&check).map_err(|e| format!("--check {check:?}: {e}"))?;
    let host = check.host_str().ok_or("--check needs a host")?.to_string();
    let port = check.port_or_known_default().unwrap_or(80);

    let mut reads = Reads::default();
    let mut tick = tokio::time::interval(every);
    let stop = terminated();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            _ = tick.tick() => {}
        }
        for file in &files {
            read_once(&mut reads, file, &host, port).await;
        }
    }
    println!(
        "{}",
        serde_json::json!({"summary": {
            "reads": reads.reads, "valid": reads.valid, "invalid": reads.invalid,
            "unreadable": reads.unreadable, "tokens": reads.tokens.len(),
        }})
    );
    Ok(())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// One read of one token file; a failure is printed with its file and time (Unix ms).
async fn read_once(reads: &mut Reads, file: &str, host: &str, port: u16) {
    reads.reads += 1;
    let token = match std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()))
    {
        Ok(v) => v.get("access_token").and_then(|t| t.as_str()).map(str::to_owned),
        Err(e) => {
            reads.unreadable += 1;
            println!(
                "{}",
                serde_json::json!({"unreadable": e, "file": file, "at_ms": now_ms()})
            );
            return;
        }
    };
    let Some(token) = token else {
        reads.unreadable += 1;
        println!(
            "{}",
            serde_json::json!({"unreadable": "no access_token", "file": file, "at_ms": now_ms()})
        );
        return;
    };
    match token_works(host, port, &token).await {
        Ok(true) => {
            reads.valid += 1;
            if reads.tokens.insert(token) {
                println!("{}", serde_json::json!({"new_token": reads.tokens.len(), "file": file}));
            }
        }
        Ok(false) => {
            reads.invalid += 1;
            println!(
                "{}",
                serde_json::json!({"invalid": reads.reads, "file": file, "at_ms": now_ms()})
            );
        }
        // The fake itself unreachable is not the token file's fault: said, and not counted as valid.
        Err(e) => println!("{}", serde_json::json!({"check_failed": e, "file": file})),
    }
}

/// Asks the fake's `/v1/user/access_token_info` whether `token` works: a plain HTTP/1.1 request, so the
/// helper needs no HTTP client library.
async fn token_works(host: &str, port: u16, token: &str) -> Result<bool, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        let request = format!(
            "GET /v1/user/access_token_info HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status_line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    Ok(status_line.starts_with(b"HTTP/1.1 200"))
}

fn orphan(opts: &HashMap<String, Vec<String>>) -> Result<(), String> {
    let linger: u64 = one(opts, "linger")?.unwrap_or(100);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Not waited for: once this process exits, the child is reparented to PID 1.
    std::process::Command::new(exe)
        .args(["linger", "--ms", &linger.to_string()])
        .spawn()
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn linger(opts: &HashMap<String, Vec<String>>) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(one(opts, "ms")?.unwrap_or(100)));
    Ok(())
}
