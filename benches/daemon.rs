//! The cost of keeping tokens fresh, measured on the real binary against the fake Kakao on loopback,
//! and the same figures for the seed's way (a Python process per refresh, as cron runs it).
//!
//! Run by hand: `cargo bench --bench daemon` (add `-- 1 1000` to pick account counts). Prints Markdown
//! tables for BENCHMARKS.md. Nothing here asserts: figures are read and compared by people.
//!
//! Beside the daemon it runs the floor: a bare client loop (tokio, reqwest with rustls, tracing, and one
//! durable write of each answer) against the same fake, in a process of its own (this binary again, with
//! `BENCH_FLOOR_CHILD` set), so that the daemon's CPU per refresh is a ratio to what the HTTP exchange
//! and one durable write cost on the same machine in the same run.
//!
//! `BENCH_DAY_FILES=0` leaves out the files a day of running leaves beside each token file (lock, state,
//! five backups): at 100,000 accounts writing them takes longer than the storm. The storm's first
//! refreshes then create those files rather than replace them, so its CPU figures are not comparable
//! with a default run's; its peak memory is.
//!
//! Each storm and each floor run starts after a `sync`, so that neither pays for the setup's or the other
//! run's writeback; `BENCH_SYNC=0` leaves it out, as runs before it were made.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr, clippy::expect_used)]

#[path = "../tests/common/tls.rs"]
mod tls;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_kakao::{FakeKakao, FakeSettings};
use futures_util::StreamExt;
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
    // Field 3, the state, is the first after the command name: a daemon that exited (a config it
    // refused, say) would otherwise look settled for ever.
    assert_ne!(
        fields[0], "Z",
        "the daemon exited; run it by hand on the bench's config to see why"
    );
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
    dir: tempfile::TempDir,
    config: PathBuf,
    files: Vec<PathBuf>,
}

/// `n` accounts logged in at the fake, their token files expiring `expires_in_secs` from now, on the
/// shipped defaults (`backups = 5`, `max_concurrent_refreshes = 16`, the state file). `ca` is the PEM of
/// a private CA every account trusts (for the fake behind TLS).
fn setup(fake: &FakeKakao, n: usize, expires_in_secs: i64, ca: Option<&Path>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url = fake.url();
    let mut config = String::from("[daemon]\n\n");
    let ca_line = match ca {
        Some(pem) => {
            std::fs::copy(pem, dir.path().join("ca.pem")).unwrap();
            format!("ca_file = \"{}\"\n", dir.path().join("ca.pem").display())
        }
        None => String::new(),
    };
    let mut files = Vec::with_capacity(n);
    let now = Timestamp::now();
    let day_files = env_or("BENCH_DAY_FILES", 1) != 0;
    for i in 0..n {
        let name = format!("a{i}");
        let raw = fake.login(CLIENT_ID);
        let mut file = TokenFile::from_response(TokenResponse::parse(raw.to_string().as_bytes()).unwrap(), now);
        file.expires_at = Some(now + SignedDuration::from_secs(expires_in_secs));
        let path = dir.path().join("tokens").join(format!("{name}.json"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // 0600, as `login` and the daemon write them: a file readable by others gets a private copy as
        // its first backup instead of a hard link, once.
        write_private(&path, &file.to_bytes());
        if day_files {
            leave_what_a_daemon_leaves(&path, &file.to_bytes(), now);
        }
        // Relative to the config's folder: with absolute paths, 100,000 sections pass the config's 16 MiB cap.
        writeln!(
            config,
            "[accounts.{name}]\nclient_id = \"{CLIENT_ID}\"\ntoken_file = \"tokens/{name}.json\"\nauth_url = \"{url}\"\napi_url = \"{url}\"\n{ca_line}"
        )
        .unwrap();
        files.push(path);
    }
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    Setup {
        dir,
        config: config_path,
        files,
    }
}

/// The daemon measured: this build's, or `BENCH_BIN` (another build, for a before and after).
fn bin() -> PathBuf {
    std::env::var_os("BENCH_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// A file written 0600 (no fsync: setup, not the measured work).
fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

/// Beside a token file, what a daemon that has run for a day leaves there: its lock file, its state
/// file and `backups = 5` backups. The storm then measures refreshes as they are made day after day (a
/// backup linked and the oldest pruned, the state rewritten), not the first creation of every file.
fn leave_what_a_daemon_leaves(path: &Path, bytes: &[u8], now: Timestamp) {
    use kakao_tokend::store::{self, StateFile};
    std::fs::write(store::lock_path(path), b"").unwrap();
    store::AccountState::default().save(path).unwrap();
    let name = store::file_name(path);
    for k in 1..=5 {
        let stamp = now - SignedDuration::from_hours(4 * k);
        write_private(&store::folder(path).join(store::backup_name(&name, stamp, 0)), bytes);
    }
}

/// The daemon on `config`, logging at its default level to /dev/null. With `profile` and
/// BENCH_PROFILE=DIR set, it runs under `perf record` (DWARF call graphs) into DIR/perf.data (figures are then those of
/// perf plus the daemon: for where the time goes, not for the table).
fn spawn(config: &Path, profile: bool) -> Child {
    let mut cmd = match std::env::var("BENCH_PROFILE") {
        Ok(dir) if profile => {
            let mut c = Command::new("perf");
            c.args(["record", "--call-graph", "dwarf,16384", "-F", "1999", "-o"])
                .arg(Path::new(&dir).join("perf.data"))
                .arg("--")
                .arg(bin());
            c
        }
        _ => Command::new(bin()),
    };
    cmd.args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
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

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
}

struct Idle {
    rss_kib: u64,
    startup_cpu_s: f64,
    wakeups_per_min: f64,
    threads: usize,
}

/// Start-up and idle: 6 h tokens, nothing due. With a zero `window`, start-up only.
async fn idle(fake: &FakeKakao, n: usize, window: Duration, ca: Option<&Path>) -> Idle {
    let s = setup(fake, n, 6 * 3600, ca);
    let before_refreshes = fake.stats().refreshes;
    let child = spawn(&s.config, false);
    let pid = child.id();
    let (startup_cpu_s, _) = settle(pid);
    let rss_kib = cpu_and_peak_rss(pid).1;
    let before = context_switches(pid);
    tokio::time::sleep(window).await;
    let wakeups = context_switches(pid).saturating_sub(before);
    let threads = threads(pid);
    stop(child);
    keep_until_the_end(s.dir);
    assert_eq!(fake.stats().refreshes, before_refreshes, "nothing was due");
    Idle {
        rss_kib,
        startup_cpu_s,
        wakeups_per_min: if window.is_zero() {
            0.0
        } else {
            wakeups as f64 * 60.0 / window.as_secs_f64()
        },
        threads,
    }
}

struct Storm {
    cpu_per_refresh_ms: f64,
    peak_rss_kib: u64,
    refreshes_per_sec: f64,
}

/// A refresh storm: every token expired, all due at start, 16 in flight. The daemon's CPU minus its
/// start-up CPU (`startup_cpu_s`, from an idle run on as many accounts) is the refreshes'.
async fn storm(fake: &FakeKakao, n: usize, startup_cpu_s: f64, ca: Option<&Path>, profile: bool) -> Storm {
    let s = setup(fake, n, -60, ca);
    let target = fake.stats().refreshes + n as u64;
    write_back();
    let child = spawn(&s.config, profile);
    let pid = child.id();
    let took = wait_refreshes(fake, target, Duration::from_secs(1800)).await;
    // Let the last writes finish before reading the CPU.
    let (cpu, peak_rss_kib) = settle(pid);
    stop(child);
    // Every file was rewritten in full form.
    assert!(s.files.iter().all(|f| {
        TokenFile::parse(&std::fs::read(f).unwrap())
            .unwrap()
            .expires_at
            .unwrap()
            > Timestamp::now()
    }));
    keep_until_the_end(s.dir);
    Storm {
        cpu_per_refresh_ms: ((cpu - startup_cpu_s).max(0.0) * 1000.0) / n as f64,
        peak_rss_kib,
        refreshes_per_sec: n as f64 / took.as_secs_f64(),
    }
}

/// The floor: `n` refreshes by the bare client loop in a process of its own, 16 in flight. Returns its
/// (CPU ms per refresh, refreshes per second).
async fn floor(fake: &FakeKakao, n: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let mut list = String::new();
    for _ in 0..n {
        let raw = fake.login(CLIENT_ID);
        list.push_str(raw["refresh_token"].as_str().unwrap());
        list.push('\n');
    }
    std::fs::write(&tokens, list).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    // Each answer replaces a file, as a refreshed token file replaces the last version.
    for i in 0..n {
        write_private(&out_dir.join(format!("a{i}.json")), &[b' '; 600]);
    }
    write_back();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env("BENCH_FLOOR_CHILD", "1")
        .env("BENCH_FLOOR_URL", format!("{}/oauth/token", fake.url()))
        .env("BENCH_FLOOR_TOKENS", &tokens)
        .env("BENCH_FLOOR_DIR", &out_dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "the floor loop failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut parts = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    let (cpu_s, wall_s) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        n,
        "every answer was written"
    );
    keep_until_the_end(dir);
    (cpu_s * 1000.0 / n as f64, n as f64 / wall_s)
}

/// Writes out the file system's dirty data before a measured run. Otherwise the setup's files (80,000 at
/// 10,000 accounts, written without fsync) and what the run before left (the daemon saves state files
/// without fsync) are written back during the run, and land on whichever process's fsyncs come first:
/// the floor moved by up to 30 % with which run came before it. `BENCH_SYNC=0` leaves it out.
fn write_back() {
    if env_or("BENCH_SYNC", 1) != 0 {
        nix::unistd::sync();
    }
}

/// Folders of finished runs. ext4 without a journal skips inodes freed in the last minute when it
/// allocates one, so tens of thousands of files deleted just before a run would slow that run's every
/// file creation: nothing is deleted until all runs are over.
static FINISHED: std::sync::Mutex<Vec<tempfile::TempDir>> = std::sync::Mutex::new(Vec::new());

fn keep_until_the_end(dir: tempfile::TempDir) {
    FINISHED.lock().unwrap().push(dir);
}

/// CPU seconds (user + system) of this process so far, to the microsecond.
fn own_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// The floor loop's process: tokio on two workers as the daemon, reqwest with rustls, a tracing line per
/// refresh to stderr, and one durable write of each answer (temp file, fsync, rename, folder fsync) on
/// the blocking pool. Prints its CPU seconds and wall seconds for the loop alone.
fn floor_child() {
    use tracing_subscriber::filter::LevelFilter;
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::INFO)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    let url = std::env::var("BENCH_FLOOR_URL").unwrap();
    let tokens = std::fs::read_to_string(std::env::var("BENCH_FLOOR_TOKENS").unwrap()).unwrap();
    let dir = PathBuf::from(std::env::var("BENCH_FLOOR_DIR").unwrap());
    let rt = runtime();
    rt.block_on(async {
        kakao_tokend::crypto::install_provider();
        let client = reqwest::Client::builder().build().unwrap();
        let before = own_cpu();
        let start = Instant::now();
        futures_util::stream::iter(tokens.lines().enumerate())
            .map(|(i, refresh_token)| {
                let (client, url, dir) = (client.clone(), url.clone(), dir.clone());
                async move {
                    let answer = client
                        .post(&url)
                        .form(&[
                            ("grant_type", "refresh_token"),
                            ("client_id", CLIENT_ID),
                            ("refresh_token", refresh_token),
                        ])
                        .send()
                        .await
                        .unwrap();
                    assert!(answer.status().is_success());
                    let body = answer.bytes().await.unwrap();
                    let path = dir.join(format!("a{i}.json"));
                    tokio::task::spawn_blocking(move || durable_write(&path, &body))
                        .await
                        .unwrap();
                    tracing::info!(account = i, "refreshed");
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<()>()
            .await;
        println!("{} {}", own_cpu() - before, start.elapsed().as_secs_f64());
    });
}

/// Tokio on two workers, as the daemon runs.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn durable_write(path: &Path, bytes: &[u8]) {
    use std::io::Write as _;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::File::open(path.parent().unwrap()).unwrap().sync_all().unwrap();
}

/// The fake behind TLS, closing every connection after its answer, as a provider does between
/// refreshes hours apart. Returns it, its handshake counts, and the CA's PEM file.
async fn tls_fake(dir: &Path, resumption: bool) -> (FakeKakao, std::sync::Arc<tls::Handshakes>, PathBuf) {
    let (chain, key) = tls::private_ca(dir);
    let (listener, handshakes) = tls::TlsListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls::server_config(chain, key, resumption),
    );
    let settings = FakeSettings {
        close_connections: true,
        ..FakeSettings::default()
    };
    let fake = FakeKakao::start_on(settings, listener, "https").await.unwrap();
    (fake, handshakes, dir.join("ca.pem"))
}

/// The seed's way: one Python process per refresh. Returns (CPU ms per refresh, peak RSS KiB of one
/// run, refreshes per second) over `runs` refreshes.
async fn measure_seed(runs: usize) -> (f64, u64, f64) {
    let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
    let s = setup(&fake, 1, 6 * 3600, None);
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    if std::env::var_os("BENCH_FLOOR_CHILD").is_some() {
        floor_child();
        return;
    }
    let mut counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if counts.is_empty() {
        counts = vec![1, 1000, 10000, 100000];
    }
    let idle_window = Duration::from_secs(env_or("BENCH_IDLE_SECS", 60));
    // Storm and floor run in turn this many times; the tables give medians.
    let rounds: usize = env_or("BENCH_ROUNDS", 3).max(1);
    let tls_accounts: usize = env_or("BENCH_TLS_ACCOUNTS", 1000);
    let rt = runtime();
    rt.block_on(async {
        println!("Daemon: medians of {rounds} storms; floor: the bare client loop, run in turn with each storm.");
        println!();
        println!("| accounts | idle RSS | peak RSS | start-up CPU | CPU per refresh | floor | ratio to floor | refreshes/s | idle wakeups/min | threads |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut reference: Option<(usize, f64, f64)> = None;
        for &n in &counts {
            let fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
            let i = idle(&fake, n, idle_window, None).await;
            let (mut ours, mut floors, mut rates, mut peaks) = (vec![], vec![], vec![], vec![]);
            for round in 0..rounds {
                // In turn, and in alternating order: neither always runs on the file system as the
                // other left it.
                if n > 1 && round % 2 == 1 {
                    floors.push(floor(&fake, n).await.0);
                }
                let s = storm(&fake, n, i.startup_cpu_s, None, round == 0).await;
                ours.push(s.cpu_per_refresh_ms);
                rates.push(s.refreshes_per_sec);
                peaks.push(s.peak_rss_kib as f64);
                if n > 1 && round % 2 == 0 {
                    floors.push(floor(&fake, n).await.0);
                }
            }
            // Each storm's ratio to the floor run just after it.
            let ratios: Vec<f64> = ours.iter().zip(&floors).map(|(o, f)| o / f).collect();
            // Each round on its own line (stderr, beside the table): the medians hide how far they spread.
            for ((o, f), r) in ours.iter().zip(&floors).zip(&ratios) {
                eprintln!("{n} accounts, one round: {o:.3} ms per refresh, floor {f:.3} ms, ratio {r:.2}");
            }
            let (ours, peak, rate) = (median(ours), median(peaks), median(rates));
            let (floor_text, ratio_text) = if floors.is_empty() {
                ("n/a".to_string(), "n/a".to_string())
            } else {
                let f = median(floors);
                if n >= 1000 && reference.is_none_or(|r| r.0 < n && n <= 10000) {
                    reference = Some((n, ours, median(ratios.clone())));
                }
                (format!("{f:.3} ms"), format!("{:.2}", median(ratios)))
            };
            println!(
                "| {n} | {:.1} MiB | {:.1} MiB | {:.2} s | {ours:.3} ms | {floor_text} | {ratio_text} | {rate:.0} | {:.1} | {} |",
                mib(i.rss_kib),
                peak / 1024.0,
                i.startup_cpu_s,
                i.wakeups_per_min,
                i.threads
            );
        }

        if tls_accounts > 0 {
            // TLS as in production: a new connection per refresh, with and without resumption, beside
            // the plain keep-alive storm on as many accounts.
            println!();
            println!("TLS, {tls_accounts} accounts, a new connection per refresh (medians of {rounds}):");
            println!();
            println!("| case | CPU per refresh | handshakes full / resumed | over keep-alive http |");
            println!("|---|---:|---:|---:|");
            let plain_fake = FakeKakao::start(FakeSettings::default()).await.unwrap();
            let plain_startup = idle(&plain_fake, tls_accounts, Duration::ZERO, None).await.startup_cpu_s;
            let mut plain = vec![];
            let certs = tempfile::tempdir().unwrap();
            let mut cases: Vec<(&str, Vec<f64>, u64, u64)> = vec![];
            for resumption in [true, false] {
                let (fake, handshakes, ca) = tls_fake(certs.path(), resumption).await;
                let startup = idle(&fake, tls_accounts, Duration::ZERO, Some(&ca)).await.startup_cpu_s;
                let (full0, resumed0) = (handshakes.full(), handshakes.resumed());
                let mut cpu = vec![];
                for _ in 0..rounds {
                    cpu.push(storm(&fake, tls_accounts, startup, Some(&ca), false).await.cpu_per_refresh_ms);
                    if resumption {
                        plain.push(storm(&plain_fake, tls_accounts, plain_startup, None, false).await.cpu_per_refresh_ms);
                    }
                }
                let name = if resumption { "TLS, resumption (rustls defaults)" } else { "TLS, every handshake full" };
                cases.push((name, cpu, handshakes.full() - full0, handshakes.resumed() - resumed0));
            }
            let plain = median(plain);
            println!("| http, keep-alive | {plain:.3} ms | n/a | n/a |");
            for (name, cpu, full, resumed) in cases {
                let c = median(cpu);
                println!(
                    "| {name} | {c:.3} ms | {full} / {resumed} | +{:.3} ms ({:.0} % of the refresh) |",
                    c - plain,
                    (c - plain) / c * 100.0
                );
            }
        }

        let runs: usize = env_or("BENCH_SEED_RUNS", 50);
        if runs == 0 {
            return;
        }
        let (seed_cpu, seed_rss, seed_rate) = measure_seed(runs).await;
        println!();
        println!(
            "seed's way ({runs} refreshes, one python3 process each): {seed_cpu:.1} ms CPU per refresh, {:.1} MiB peak resident per run, {seed_rate:.1} refreshes/s",
            mib(seed_rss)
        );
        if let Some((n, ours, ratio)) = reference {
            println!("at {n} accounts: kakao-tokend / floor = {ratio:.2}; seed's way / kakao-tokend = {:.0}x", seed_cpu / ours.max(0.001));
        }
    });
    FINISHED.lock().unwrap().clear();
}
