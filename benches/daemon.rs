//! The cost of keeping tokens fresh, measured on the real binary against the fake Kakao on loopback,
//! and the same figures for the seed's way (a Python process per refresh, as cron runs it).
//!
//! Run by hand: `cargo bench --bench daemon` (add `-- 1 1000` to pick account counts). Prints a Markdown
//! table for BENCHMARKS.md. Nothing here asserts: figures are read and compared by people.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr, clippy::expect_used)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_kakao::{FakeKakao, FakeSettings};
use jiff::{SignedDuration, Timestamp};
use kakao_tokend::token::{TokenFile, TokenResponse};

const BIN: &str = env!("CARGO_BIN_EXE_kakao-tokend");
const CLIENT_ID: &str = "demo-rest-api-key";
const CONCURRENCY: usize = 16;

fn clock_ticks_per_sec() -> f64 {
    // Linux reports utime/stime in USER_HZ, 100 on every mainstream architecture.
    100.0
}

/// (user + system CPU seconds, peak RSS in KiB) of a live process.
fn cpu_and_peak_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / clock_ticks_per_sec(), hwm)
}

/// Context switches of every live thread of a process: each is a wakeup.
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(entry.unwrap().path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:") || line.starts_with("nonvoluntary_ctxt_switches:") {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(Iterator::count)
        .unwrap_or(0)
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    files: Vec<PathBuf>,
}

/// `n` accounts logged in at the fake, their token files expiring `expires_in_secs` from now.
fn setup(fake: &FakeKakao, n: usize, expires_in_secs: i64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url = fake.url();
    let mut config =
        format!("[daemon]\nbackups = 1\nmax_concurrent_refreshes = {CONCURRENCY}\nrefresh_before_expiry = \"33%\"\n\n");
    let mut files = Vec::with_capacity(n);
    let now = Timestamp::now();
    for i in 0..n {
        let name = format!("a{i}");
        let raw = fake.login(CLIENT_ID);
        let mut file = TokenFile::from_response(TokenResponse::parse(raw.to_string().as_bytes()).unwrap(), now);
        file.expires_at = Some(now + SignedDuration::from_secs(expires_in_secs));
        let path = dir.path().join("tokens").join(format!("{name}.json"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, file.to_bytes()).unwrap();
        writeln!(
            config,
            "[accounts.{name}]\nclient_id = \"{CLIENT_ID}\"\ntoken_file = \"{}\"\nauth_url = \"{url}\"\napi_url = \"{url}\"\n",
            path.display()
        )
        .unwrap();
        files.push(path);
    }
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    Setup {
        _dir: dir,
        config: config_path,
        files,
    }
}

/// The daemon on `config`. With `profile` and BENCH_PROFILE=DIR set, it runs under `perf record -g`
/// into DIR/perf.data (figures are then those of perf plus the daemon: for where the time goes, not for
/// the table).
fn spawn(config: &Path, profile: bool) -> Child {
    let mut cmd = match std::env::var("BENCH_PROFILE") {
        Ok(dir) if profile => {
            let mut c = Command::new("perf");
            c.args(["record", "-g", "-o"])
                .arg(Path::new(&dir).join("perf.data"))
                .arg("--")
                .arg(BIN);
            c
        }
        _ => Command::new(BIN),
    };
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the daemon's CPU time stops moving: start-up (config, every token file read) is over.
fn settle(pid: u32) -> (f64, u64) {
    let mut last = cpu_and_peak_rss(pid);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = cpu_and_peak_rss(pid);
        if (now.0 - last.0).abs() < 0.005 {
            return now;
        }
        last = now;
    }
}

async fn wait_refreshes(fake: &FakeKakao, target: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    while fake.stats().refreshes < target {
        assert!(
            start.elapsed() < limit,
            "only {} of {target} refreshes",
            fake.stats().refreshes
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

struct Row {
    accounts: usize,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    startup_cpu_s: f64,
    cpu_per_refresh_ms: f64,
    refreshes_per_sec: f64,
    idle_wakeups_per_min: f64,
    threads: usize,
}

async fn measure(n: usize, idle: Duration) -> Row {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();

    // 1. Start-up and idle: 6 h tokens, nothing due.
    let s = setup(&fake, n, 6 * 3600);
    let mut child = spawn(&s.config, false);
    let pid = child.id();
    let (startup_cpu_s, _) = settle(pid);
    let idle_rss_kib = cpu_and_peak_rss(pid).1;
    let before = context_switches(pid);
    tokio::time::sleep(idle).await;
    let idle_wakeups = context_switches(pid).saturating_sub(before);
    let threads = threads(pid);
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let _ = child.wait();
    assert_eq!(fake.stats().refreshes, 0, "nothing was due");

    // 2. A refresh storm: every token expired, all due at start, max_concurrent_refreshes in flight.
    let s2 = setup(&fake, n, -60);
    let mut child = spawn(&s2.config, true);
    let pid = child.id();
    let took = wait_refreshes(&fake, n as u64, Duration::from_secs(1800)).await;
    // Let the last writes finish before reading the CPU.
    let (cpu, peak_rss_kib) = settle(pid);
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let _ = child.wait();
    // Every file was rewritten in full form.
    assert!(s2.files.iter().all(|f| {
        TokenFile::parse(&std::fs::read(f).unwrap())
            .unwrap()
            .expires_at
            .unwrap()
            > Timestamp::now()
    }));
    drop(s);
    Row {
        accounts: n,
        idle_rss_kib,
        peak_rss_kib,
        startup_cpu_s,
        cpu_per_refresh_ms: ((cpu - startup_cpu_s).max(0.0) * 1000.0) / n as f64,
        refreshes_per_sec: n as f64 / took.as_secs_f64(),
        idle_wakeups_per_min: idle_wakeups as f64 * 60.0 / idle.as_secs_f64(),
        threads,
    }
}

/// The seed's way: one Python process per refresh. Returns (CPU ms per refresh, peak RSS KiB of one
/// run, refreshes per second) over `runs` refreshes.
async fn measure_seed(runs: usize) -> (f64, u64, f64) {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    let s = setup(&fake, 1, 6 * 3600);
    // The seed's file is the raw response.
    let raw = fake.login(CLIENT_ID);
    std::fs::write(&s.files[0], raw.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/seed_refresh.py");
    let url = format!("{}/oauth/token", fake.url());
    let run = |report: bool| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(&url)
            .arg(CLIENT_ID)
            .arg(&s.files[0])
            .stderr(Stdio::piped());
        if report {
            cmd.env("BENCH_REPORT_RSS", "1");
        }
        cmd
    };
    let before = children_cpu();
    let start = Instant::now();
    for _ in 0..runs {
        let mut cmd = run(false);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let took = start.elapsed();
    let cpu_ms = (children_cpu() - before) * 1000.0 / runs as f64;
    let mut cmd = run(true);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let rss = String::from_utf8_lossy(&out.stderr).trim().parse().unwrap_or(0);
    (cpu_ms, rss, runs as f64 / took.as_secs_f64())
}

/// CPU seconds of waited-for children, from /proc/self/stat's cutime and cstime.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[13].parse::<f64>().unwrap() + fields[14].parse::<f64>().unwrap();
    ticks / clock_ticks_per_sec()
}

fn main() {
    let mut counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if counts.is_empty() {
        counts = vec![1, 1000, 10000, 100000];
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let idle = Duration::from_secs(std::env::var("BENCH_IDLE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
        println!("| accounts | idle RSS | peak RSS | start-up CPU | CPU per refresh | refreshes/s | idle wakeups/min | threads |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut per_refresh = None;
        for n in counts {
            let r = measure(n, idle).await;
            if n >= 1000 && per_refresh.is_none() {
                per_refresh = Some(r.cpu_per_refresh_ms);
            }
            println!(
                "| {} | {:.1} MiB | {:.1} MiB | {:.2} s | {:.3} ms | {:.0} | {:.1} | {} |",
                r.accounts,
                r.idle_rss_kib as f64 / 1024.0,
                r.peak_rss_kib as f64 / 1024.0,
                r.startup_cpu_s,
                r.cpu_per_refresh_ms,
                r.refreshes_per_sec,
                r.idle_wakeups_per_min,
                r.threads
            );
        }
        let runs = 50;
        let (seed_cpu, seed_rss, seed_rate) = measure_seed(runs).await;
        println!();
        println!(
            "seed's way ({runs} refreshes, one python3 process each): {seed_cpu:.1} ms CPU per refresh, {:.1} MiB peak resident per run, {seed_rate:.1} refreshes/s",
            seed_rss as f64 / 1024.0
        );
        if let Some(ours) = per_refresh {
            println!("ratio of CPU per refresh, seed / kakao-tokend: {:.0}x", seed_cpu / ours.max(0.001));
        }
    });
}
