//! SIGKILL at random instants, hundreds of times, while the daemon refreshes about every second and a
//! reader reads the token file every couple of milliseconds: the reader must never see a missing or
//! torn file, and the refresh-token chain may only break where nothing can save it.
//!
//! Kakao kills the old refresh token the moment it sends a new one. Between that answer and the fsync
//! of the new file, the new token exists only in the daemon's memory: a kill there ends the chain,
//! whatever the daemon does. The test finds each such window (a rotation at the fake, up to the
//! daemon's "written and synced"), reports how long they last, and holds every broken chain to a kill
//! inside one.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, SystemTime};

use common::{Daemon, Env};
use fake_kakao::{FakeEventKind, FakeSettings};
use kakao_tokend::store;
use nix::sys::signal::Signal;

/// Kills at random instants: 240 in `cargo test`, which keeps CI within its time; `CRASH_KILLS=N` for
/// a longer run by hand (RELIABILITY.md's figures come from 300).
fn kills() -> usize {
    std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(240)
}
/// Kills aimed just after a rotation, inside its window, where a cut chain is expected.
const AIMED: usize = 20;

/// One run of the binary, from spawn to SIGKILL.
struct Life {
    spawned: SystemTime,
    /// When this run logged each durable write of the token file.
    synced: Vec<SystemTime>,
}

fn synced_at(d: &Daemon) -> Vec<SystemTime> {
    d.events()
        .iter()
        .filter(|v| common::message(v) == "token file written and synced")
        .filter_map(|v| v["timestamp"].as_str()?.parse::<jiff::Timestamp>().ok())
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_nanos(t.as_nanosecond() as u64))
        .collect()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_never_leaves_a_torn_or_missing_file() {
    // 3 s access tokens refreshed with 2 s left: about one refresh a second. Refresh tokens live an
    // hour, so that no burst of kills can let one run out, and rotate once they are a second old, so
    // that most refreshes rotate.
    let env = Env::new(FakeSettings {
        rotate_within: 3599,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    env.write_config("refresh_before_expiry = \"66%\"\nbackups = 3", &["me"]);
    env.login("me");
    let path = env.path("me.json");
    let reader = common::FileReader::start(path.clone());

    let mut lives: Vec<Life> = Vec::new();
    let (mut cuts, mut aimed_cuts) = (0usize, 0usize);
    let mut rotations = env.fake.subscribe();
    let kills = kills();
    let mut rng = common::seeded_rng("sigkill_at_random_instants");
    for i in 0..kills + AIMED {
        let aimed = i >= kills;
        let d = env.spawn();
        let spawned = SystemTime::now();
        if aimed {
            // Just after the fake answers with a new refresh token: inside the window, most likely.
            env.wait_fake(&mut rotations, Duration::from_secs(30), |e| {
                e.at >= spawned && matches!(e.kind, FakeEventKind::Issued { rotated: true, .. })
            })
            .await;
        } else {
            // The kill instant is the point of the test: random, anywhere in the refresh cycle.
            tokio::time::sleep(Duration::from_millis(rng.u64(50..700))).await;
        }
        d.signal(Signal::SIGKILL);
        let mut d = d;
        d.wait_exit(Duration::from_secs(10)).await;
        lives.push(Life {
            spawned,
            synced: synced_at(&d),
        });
        drop(d);

        // A chain cut by this kill must have a rotation answered to this run that it never synced.
        let rt = env.refresh_token("me");
        if !env.fake.refresh_token_alive(&rt) {
            cuts += 1;
            aimed_cuts += usize::from(aimed);
            let unsynced = unsynced_rotations(&env, &lives, lives.len() - 1, SystemTime::now());
            assert!(
                unsynced > 0,
                "the chain broke although every rotation of this run was synced before the kill"
            );
            // Nothing can recover a token Kakao has killed: log in again, as a person would.
            env.login("me");
        }
    }

    // One clean run: it removes what the kills left and keeps refreshing from the file's token.
    let mut d = env.spawn();
    d.wait_event(common::LONG, Some("me"), "refreshed").await;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
    let counts = reader.finish();

    // Every rotation's window: from the fake's answer to the sync by the run it was answered to.
    let mut windows: Vec<Duration> = Vec::new();
    let mut killed_inside = 0usize;
    let last = SystemTime::now();
    for (i, life) in lives.iter().enumerate() {
        let until = lives.get(i + 1).map_or(last, |next| next.spawned);
        for r in rotations_between(&env, life.spawned, until) {
            match life.synced.iter().find(|s| **s >= r) {
                Some(s) => windows.push(s.duration_since(r).unwrap_or_default()),
                None => killed_inside += 1,
            }
        }
    }
    windows.sort();
    let fsync = fsync_cost(env.dir.path());
    let stats = env.fake.stats();
    let pick = |q: f64| windows[((windows.len() - 1) as f64 * q).round() as usize];
    eprintln!(
        "{kills} kills; {} reads: {} torn, {} missing; {} refreshes, {} rotations; windows synced: {}, \
         median {:.2} ms, p99 {:.2} ms, max {:.2} ms (the durable publish alone: median {:.2} ms); \
         kills inside a window: {killed_inside}; chains cut: {cuts} ({aimed_cuts} by the {AIMED} aimed kills)",
        counts.reads,
        counts.torn,
        counts.missing,
        stats.refreshes,
        stats.rotations,
        windows.len(),
        millis(pick(0.5)),
        millis(pick(0.99)),
        millis(*windows.last().unwrap()),
        millis(fsync),
    );
    assert!(counts.reads > 20_000, "the reader hardly ran: {counts:?}");
    assert_eq!((counts.torn, counts.missing), (0, 0), "{counts:?}");
    assert!(
        stats.rotations as usize >= kills / 4,
        "too few rotations to mean anything: {stats:?}"
    );
    // Each cut was explained above by a kill inside a window. The converse need not hold: a kill after
    // the rename but before the folder's fsync leaves the new token in place.
    assert!(
        cuts <= killed_inside,
        "{cuts} chains cut, {killed_inside} kills inside a window"
    );
    assert!(
        aimed_cuts > 0,
        "no aimed kill landed inside a window: the windows were not found"
    );
    let leftovers = common::temp_files(env.dir.path(), "me.json");
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(store::list_backups(&path).unwrap().len() <= 3);
    assert!(env.fake.refresh_token_alive(&env.refresh_token("me")));
}

/// Rotations the fake answered from `from` until `until`.
fn rotations_between(env: &Env, from: SystemTime, until: SystemTime) -> Vec<SystemTime> {
    env.fake
        .events()
        .iter()
        .filter(|e| matches!(e.kind, FakeEventKind::Issued { rotated: true, .. }))
        .map(|e| e.at)
        .filter(|at| *at >= from && *at < until)
        .collect()
}

/// Rotations answered to run `i` (up to `until`, when the next run has not started) that it never
/// synced. A request on the wire when the kill came is answered after it, and counts.
fn unsynced_rotations(env: &Env, lives: &[Life], i: usize, until: SystemTime) -> usize {
    let life = &lives[i];
    rotations_between(env, life.spawned, until)
        .iter()
        .filter(|r| !life.synced.iter().any(|s| s >= *r))
        .count()
}

/// What one durable publish costs on this disk, without HTTP, as the daemon does it here: temp file,
/// fsync, a backup (3 kept), rename, folder fsync.
fn fsync_cost(dir: &std::path::Path) -> Duration {
    let mut times: Vec<Duration> = (0..21)
        .map(|i| {
            let t = std::time::Instant::now();
            store::publish_token(
                &dir.join("fsync-probe.json"),
                format!("{{\"n\":{i}}}").as_bytes(),
                3,
                jiff::Timestamp::now(),
                store::FileAccess::default(),
            )
            .unwrap();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
