#![cfg(feature = "demo")]
//! `kakao-tokend demo`, the README's first command: the daemon against the built-in fake Kakao, with
//! everything it prints (the fake's own logs included, at trace level) swept for secrets.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

#[test]
fn the_demo_runs_through_rotations_and_prints_no_secret() {
    // 16 s: refresh tokens (20 s) rotate from 10 s on, and the 6 s access tokens are refreshed every 4 s.
    let out = common::output_swept(Command::new(common::BIN).args(["demo", "--duration", "16s"]), false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("every refresh token chain survived its rotations"),
        "{stdout}"
    );
    let counts = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("refreshes:"))
        .unwrap();
    let number = |label: &str| -> u64 {
        let rest = counts.split(label).nth(1).unwrap().trim_start();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(number("refreshes:") >= 6, "{counts}");
    assert!(number("rotations:") >= 1, "{counts}");
    assert_eq!(number("refused:"), 0, "{counts}");
    // The demo's folder is removed at the end.
    let folder = stdout.split("files in ").nth(1).unwrap().lines().next().unwrap();
    assert!(!std::path::Path::new(folder).exists(), "{folder} was left behind");
}
