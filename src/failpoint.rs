//! Failpoints: named places where a test makes the binary fail the way the outside world rarely does
//! (inotify breaking, say), so that the path that handles it is run for real. They are armed by
//! `KAKAO_TOKEND_FAILPOINTS="name,name"`, which only debug builds read: a release build has none.
//!
//! - `inotify_fails`: the inotify stream ends when a file named [`INOTIFY_FAILS_TRIGGER`] changes in a
//!   watched folder, as if its descriptor failed then (a named trigger, so that the daemon's own lock
//!   and state files cannot set it off before the test is ready);
//! - `inotify_restart_fails`: starting inotify again fails.

/// The file name whose change sets off `inotify_fails`.
pub const INOTIFY_FAILS_TRIGGER: &str = "inotify-fails";

/// Whether the failpoint `name` is armed.
pub fn armed(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        std::env::var("KAKAO_TOKEND_FAILPOINTS").is_ok_and(|v| v.split(',').any(|n| n.trim() == name))
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}
