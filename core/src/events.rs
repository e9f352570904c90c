//! The `event` field of the log lines people and tools react to: one stable name per kind of line, so
//! that a log reader (a test, an alert rule, `jq 'select(.event == "refreshed")'`) matches a field, not
//! English text that may be reworded. The names are an interface, listed in the README: renaming one
//! breaks its readers.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The daemon started (config loaded, accounts spawned).
    Started,
    /// SIGTERM or SIGINT: no new refresh starts.
    ShuttingDown,
    /// The daemon stopped.
    Stopped,
    /// SIGHUP received.
    Reloading,
    /// A reload applied (`added`, `removed`).
    Reloaded,
    /// A reload failed; the running config stays.
    ReloadFailed,
    /// `/metrics` and `/healthz` are served (`listen` holds the bound address).
    MetricsServing,
    /// `metrics_listen` is not a loopback address.
    MetricsPublic,
    /// The open-file limit is below what refreshes and scrapes may need (`limit`, `need`).
    DescriptorsLow,
    /// The wall clock jumped against the monotonic one (`drift_secs`).
    ClockJumped,
    /// inotify failed (and was restarted, or the daemon stops).
    InotifyFailed,
    /// Running as PID 1 with hooks and no init.
    Pid1,
    /// Temp files left by a crash were removed (`count`).
    TempFilesRemoved,
    /// Every account has loaded its token file and is scheduled or parked (`accounts`; `from_index`:
    /// how many started from the start index instead of reading their files).
    Loaded,
    /// A folder's start index was not used (`folder`): damaged, unreadable, or from another build.
    StartIndexUnusable,
    /// The start indexes were written at stop (`accounts`, `folders`).
    StartIndexWritten,
    /// The next refresh is scheduled (debug level).
    Scheduled,
    /// A refreshed token was written (`expires_at`, `next_refresh`, `backup`).
    Refreshed,
    /// The provider rotated the refresh token (`written`).
    Rotated,
    /// A refresh worked again after failures (`after_failures`).
    Recovered,
    /// A token file written by someone else (a login, another daemon) was adopted.
    Adopted,
    /// A token file in the seed's format is refreshed at once.
    SeedFormat,
    /// The account's `token_file` changed in the config.
    TokenFileMoved,
    /// A refresh failed and is retried with backoff.
    RefreshFailed,
    /// A refresh was refused for good; the account is parked until its file changes or a reload.
    RefreshRefused,
    /// A refresh did not move the expiry forward; backing off.
    NoProgress,
    /// The lock could not be taken.
    LockFailed,
    /// The token file could not be written (full disk, unwritable folder).
    WriteFailed,
    /// The token file was written, its backup was not.
    BackupFailed,
    /// The token file was written, the env file was not.
    EnvFileFailed,
    /// The token file does not exist: a login is needed.
    TokenFileMissing,
    /// The token file cannot be read or parsed; it is left alone.
    TokenFileUnreadable,
    /// The token file holds no refresh token: a login is needed.
    NoRefreshToken,
    /// The refresh token dies soon and the provider has sent no new one.
    RefreshTokenExpiring,
    /// The refresh token is dead: a login is needed.
    RefreshTokenDead,
    /// The alert was sent by KakaoTalk message.
    AlertSent,
    /// The alert could not be sent by message.
    AlertFailed,
    /// The `on_refresh` hook ran (`output`).
    HookRan,
    /// The `on_refresh` hook failed or timed out.
    HookFailed,
    /// The daemon stops with a refreshed token it could not write.
    UnwrittenAtStop,
    /// etcd answered again (or for the first time): the store is up.
    StoreUp,
    /// etcd stopped answering: the store is degraded; local files keep the last token, and no refresh is sent.
    StoreDown,
    /// This replica's etcd lease lapsed: every lock it held is gone.
    LeaseLost,
    /// The account's lock was lost before the write; the rotated token went to `pending/`.
    LockLost,
    /// A rotated token that could not be written under the lock was kept (`place`: etcd or local).
    PendingStored,
    /// The lock holder merged a pending token into the record.
    PendingMerged,
    /// A pending token made from an older record was deleted (`count`).
    PendingDiscarded,
    /// A record from etcd was published to this replica's local files (`revision`).
    RecordPublished,
    /// A local token file became the account's first record in etcd.
    RecordImported,
    /// A KOE322 under the lock was explained by a late write; no login is needed.
    RefusalExplained,
    /// A KOE322 seen after the lock was lost was discarded.
    RefusalDiscarded,
}

impl Event {
    pub const ALL: [Event; 51] = [
        Event::Started,
        Event::ShuttingDown,
        Event::Stopped,
        Event::Reloading,
        Event::Reloaded,
        Event::ReloadFailed,
        Event::MetricsServing,
        Event::MetricsPublic,
        Event::DescriptorsLow,
        Event::ClockJumped,
        Event::InotifyFailed,
        Event::Pid1,
        Event::TempFilesRemoved,
        Event::Loaded,
        Event::StartIndexUnusable,
        Event::StartIndexWritten,
        Event::Scheduled,
        Event::Refreshed,
        Event::Rotated,
        Event::Recovered,
        Event::Adopted,
        Event::SeedFormat,
        Event::TokenFileMoved,
        Event::RefreshFailed,
        Event::RefreshRefused,
        Event::NoProgress,
        Event::LockFailed,
        Event::WriteFailed,
        Event::BackupFailed,
        Event::EnvFileFailed,
        Event::TokenFileMissing,
        Event::TokenFileUnreadable,
        Event::NoRefreshToken,
        Event::RefreshTokenExpiring,
        Event::RefreshTokenDead,
        Event::AlertSent,
        Event::AlertFailed,
        Event::HookRan,
        Event::HookFailed,
        Event::UnwrittenAtStop,
        Event::StoreUp,
        Event::StoreDown,
        Event::LeaseLost,
        Event::LockLost,
        Event::PendingStored,
        Event::PendingMerged,
        Event::PendingDiscarded,
        Event::RecordPublished,
        Event::RecordImported,
        Event::RefusalExplained,
        Event::RefusalDiscarded,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Event::Started => "started",
            Event::ShuttingDown => "shutting_down",
            Event::Stopped => "stopped",
            Event::Reloading => "reloading",
            Event::Reloaded => "reloaded",
            Event::ReloadFailed => "reload_failed",
            Event::MetricsServing => "metrics_serving",
            Event::MetricsPublic => "metrics_public",
            Event::DescriptorsLow => "descriptors_low",
            Event::ClockJumped => "clock_jumped",
            Event::InotifyFailed => "inotify_failed",
            Event::Pid1 => "pid1_without_init",
            Event::TempFilesRemoved => "temp_files_removed",
            Event::Loaded => "loaded",
            Event::StartIndexUnusable => "start_index_unusable",
            Event::StartIndexWritten => "start_index_written",
            Event::Scheduled => "scheduled",
            Event::Refreshed => "refreshed",
            Event::Rotated => "rotated",
            Event::Recovered => "recovered",
            Event::Adopted => "adopted",
            Event::SeedFormat => "seed_format",
            Event::TokenFileMoved => "token_file_moved",
            Event::RefreshFailed => "refresh_failed",
            Event::RefreshRefused => "refresh_refused",
            Event::NoProgress => "no_progress",
            Event::LockFailed => "lock_failed",
            Event::WriteFailed => "write_failed",
            Event::BackupFailed => "backup_failed",
            Event::EnvFileFailed => "env_file_failed",
            Event::TokenFileMissing => "token_file_missing",
            Event::TokenFileUnreadable => "token_file_unreadable",
            Event::NoRefreshToken => "no_refresh_token",
            Event::RefreshTokenExpiring => "refresh_token_expiring",
            Event::RefreshTokenDead => "refresh_token_dead",
            Event::AlertSent => "alert_sent",
            Event::AlertFailed => "alert_failed",
            Event::HookRan => "hook_ran",
            Event::HookFailed => "hook_failed",
            Event::UnwrittenAtStop => "unwritten_at_stop",
            Event::StoreUp => "store_up",
            Event::StoreDown => "store_down",
            Event::LeaseLost => "lease_lost",
            Event::LockLost => "lock_lost",
            Event::PendingStored => "pending_stored",
            Event::PendingMerged => "pending_merged",
            Event::PendingDiscarded => "pending_discarded",
            Event::RecordPublished => "record_published",
            Event::RecordImported => "record_imported",
            Event::RefusalExplained => "refusal_explained",
            Event::RefusalDiscarded => "refusal_discarded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_snake_case() {
        let names: std::collections::BTreeSet<&str> = Event::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names.len(), Event::ALL.len());
        assert!(names.iter().all(|n| {
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
        }));
    }
}
