//! SIGKILL at random instants while the daemon refreshes about every second and a reader reads the
//! token file every couple of milliseconds: the reader must never see a missing or torn file.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use common::Env;
use kakao_tokend::fake::{FakeEventKind, FakeSettings};
use kakao_tokend::store;
use kakao_tokend::token::TokenFile;
use nix::sys::signal::Signal;

const KILLS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_never_leaves_a_torn_or_missing_file() {
    // 3 s access tokens refreshed with 2 s left: about one refresh a second. Refresh tokens live an
    // hour, so that kills coming faster than refreshes cannot let one run out, and rotate once they are
    // two seconds old, so that most refreshes rotate: the chain can then only be cut by a kill between a
    // rotation at the fake and the daemon's fsync.
    let env = Env::new(FakeSettings {
        rotate_within: 3598,
        ..FakeSettings::fast(3, 3600)
    })
    .await;
    env.write_config("refresh_before_expiry = \"66%\"\nbackups = 3", &["me"]);
    env.login("me");
    let path = env.path("me.json");

    let reader = common::FileReader::start(path.clone());

    let mut kills: Vec<SystemTime> = Vec::new();
    for _ in 0..KILLS {
        let d = env.spawn();
        // The kill instant is the point of the test: random, anywhere in the refresh cycle.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..1500))).await;
        d.signal(Signal::SIGKILL);
        kills.push(SystemTime::now());
        drop(d);
    }

    // One clean run: it removes what the kills left and keeps refreshing from the file's token.
    let mut d = env.spawn();
    d.wait_message(Duration::from_secs(30), Some("me"), "refreshed").await;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)).await.code(), Some(0));
    let common::ReadCounts { reads, torn, missing } = reader.finish();
    let stats = env.fake.stats();
    eprintln!(
        "{KILLS} kills, {reads} reads, {torn} torn, {missing} missing, {} refreshes, {} rotations",
        stats.refreshes, stats.rotations
    );
    assert!(reads > 5000, "the reader hardly ran: {reads}");
    assert_eq!(torn, 0);
    assert_eq!(missing, 0);
    assert!(
        stats.refreshes >= KILLS as u64 / 2,
        "too few refreshes to mean anything: {stats:?}"
    );

    let leftovers = common::temp_files(env.dir.path(), "me.json");
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(store::list_backups(&path).unwrap().len() <= 3);

    // The refresh token chain is alive, unless a kill fell between a rotation at the fake and the
    // daemon's fsync of the new token: Kakao kills the old token the moment it answers, so nothing can
    // save a chain cut there. Such a kill must come within moments of a rotation.
    let rt = env.refresh_token("me");
    if !env.fake.refresh_token_alive(&rt) {
        let rotations: Vec<SystemTime> = env
            .fake
            .events()
            .iter()
            .filter(|e| matches!(e.kind, FakeEventKind::Issued { rotated: true, .. }))
            .map(|e| e.at)
            .collect();
        let in_window = kills.iter().any(|k| {
            rotations
                .iter()
                .any(|r| k.duration_since(*r).is_ok_and(|d| d < Duration::from_millis(100)))
        });
        assert!(
            in_window,
            "the refresh token chain died although no kill fell right after a rotation"
        );
        eprintln!("a kill fell inside a rotation window; the chain ended there, as it must with Kakao");
    }
}
