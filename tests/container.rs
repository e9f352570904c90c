//! The binary run the way the container image runs it: as the image's non-root user (65532, through
//! setpriv) with only the environment the image sets, writing into a volume that user owns, and the
//! image's HEALTHCHECK (`kakao-tokend status`).

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::{Daemon, Env, NONROOT, as_nonroot};
use fake_kakao::FakeSettings;
use nix::sys::signal::Signal;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_images_non_root_user_with_only_its_environment() {
    let env = Env::new(FakeSettings::fast(3, 3600)).await;
    env.write_config("", &["me"]);
    env.login("me");
    // The volume belongs to the image's user; the config is mounted read-only (readable by all).
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        std::os::unix::fs::chown(&p, Some(NONROOT), Some(NONROOT)).unwrap();
    }
    std::os::unix::fs::chown(env.dir.path(), Some(NONROOT), Some(NONROOT)).unwrap();
    std::fs::set_permissions(&env.config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut d = Daemon::from_command(as_nonroot(&["run"], &env.config));
    d.wait_message(LONG, Some("me"), "refreshed").await;
    let meta = std::fs::metadata(env.path("me.json")).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (NONROOT, 0o600));

    // The HEALTHCHECK, as the same user.
    let mut status = as_nonroot(&["status"], &env.config);
    let out = tokio::task::spawn_blocking(move || common::output_swept(&mut status, false))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(LONG).await.code(), Some(0));
}
