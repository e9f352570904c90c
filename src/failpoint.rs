//! Failpoints: named places where a test makes the binary fail the way the outside world rarely does
//! (inotify breaking, say), so that the path that handles it is run for real. They are armed by
//! `KAKAO_TOKEND_FAILPOINTS="name,name"`, which only debug builds read: a release build has none.
//!
//! - `inotify_fails`: the inotify stream ends at the next event, as if its descriptor failed;
//! - `inotify_restart_fails`: starting inotify again fails.

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
