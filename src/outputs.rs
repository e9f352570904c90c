//! What follows a successful write of a token file: the `KEY=value` env file for consumers that cannot
//! read JSON, and the account's `on_refresh` hook (certbot's deploy-hook). The hook is run without a
//! shell, with the daemon's environment minus its own settings and secrets (`KAKAO_TOKEND_*`, systemd's
//! notify socket, credentials and socket-activation variables) plus `KAKAO_TOKEND_ACCOUNT` and the file
//! paths, in a process group of its own that a timeout kills whole, keeping at most 64 KiB of output.

use std::io;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::config::Account;
use crate::store;
use crate::token::{self, TokenFile};

/// Variables never passed to a hook: the config's overrides (they may hold client secrets) and what
/// systemd hands the daemon alone.
const WITHHELD: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The env file's content, values unquoted: docker's --env-file would keep quotes as part of the value.
/// No quoting is needed, since a token outside [`token::token_chars_ok`] never gets this far.
pub fn env_file_contents(file: &TokenFile) -> Vec<u8> {
    let mut out = format!("KAKAO_ACCESS_TOKEN={}\n", file.access_token.expose());
    if let Some(exp) = file.expires_at {
        out.push_str(&format!("KAKAO_ACCESS_TOKEN_EXPIRES_AT={exp}\n"));
    }
    out.into_bytes()
}

/// Publishes `file` (as `bytes`) for `account` with all that goes with it: the account's mode and group,
/// backups, then the env file. Blocking (fsync): run it on the blocking pool. `backups` is the caller's
/// view of the backups, `None` to list the folder.
pub fn publish(
    account: &Account,
    file: &TokenFile,
    bytes: &[u8],
    keep_backups: u32,
    backups: &mut Option<store::Backups>,
    reserved: &mut Option<store::Reservation>,
) -> io::Result<store::PublishReport> {
    let now = jiff::Timestamp::now();
    let mut report = store::publish_token_with(
        &account.token_file,
        bytes,
        keep_backups,
        now,
        backups,
        account.access,
        reserved,
    )?;
    report.env_error = write_env_file(account, file).err();
    Ok(report)
}

/// What [`publish_async`] gives back besides the result: the backups view, and the temp file to try
/// again with after a failure (see [`store::Reservation`]).
#[derive(Debug)]
pub struct Published {
    pub result: io::Result<store::PublishReport>,
    pub backups: Option<store::Backups>,
    pub room: Option<store::Reservation>,
}

/// [`publish`] on the blocking pool.
pub async fn publish_async(
    account: &Account,
    file: &TokenFile,
    bytes: &[u8],
    keep_backups: u32,
    mut backups: Option<store::Backups>,
    mut room: Option<store::Reservation>,
) -> Published {
    let (account, file, bytes) = (account.clone(), file.clone(), bytes.to_vec());
    let joined = tokio::task::spawn_blocking(move || {
        let result = publish(&account, &file, &bytes, keep_backups, &mut backups, &mut room);
        Published { result, backups, room }
    })
    .await;
    joined.unwrap_or_else(|e| Published {
        result: Err(io::Error::other(e)),
        backups: None,
        room: None,
    })
}

/// Writes the account's env file, if it has one, with the token file's atomic, durable rules.
pub fn write_env_file(account: &Account, file: &TokenFile) -> io::Result<()> {
    match &account.env_file {
        // The answer was checked already; this is the last line of defence for a file adopted as it is.
        Some(_) if !token::token_chars_ok(file.access_token.expose()) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the access token holds characters no token has; the env file is left as it was",
        )),
        Some(path) => store::write_atomic(path, &env_file_contents(file), account.access),
        None => Ok(()),
    }
}

/// Runs the account's `on_refresh` hook in a task of its own, logging how it went: a slow or failing
/// hook never holds up a refresh or any other account.
pub fn spawn_hook(account: std::sync::Arc<Account>, timeout: Duration) {
    use tracing::Instrument;
    tokio::spawn(
        async move {
            match run_hook(&account, timeout).await {
                Ok(output) => tracing::info!(
                    event = crate::events::Event::HookRan.as_str(),
                    output = output.unwrap_or_default(),
                    "on_refresh hook ran"
                ),
                Err(e) => tracing::warn!(
                    event = crate::events::Event::HookFailed.as_str(),
                    "on_refresh hook failed: {e}"
                ),
            }
        }
        .instrument(tracing::Span::current()),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} did not finish within {}; it was killed", humantime::format_duration(*.timeout))]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// Runs `on_refresh`, if set: `KAKAO_TOKEND_ACCOUNT` and `KAKAO_TOKEND_TOKEN_FILE` (and
/// `KAKAO_TOKEND_ENV_FILE`) are set, the daemon's own secrets and `KAKAO_TOKEND__*` are not passed on.
/// Returns what the hook printed, on success.
pub async fn run_hook(account: &Account, timeout: Duration) -> Result<Option<String>, HookError> {
    let Some(argv) = &account.on_refresh else {
        return Ok(None);
    };
    let program = argv[0].clone();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("KAKAO_TOKEND_") || WITHHELD.contains(&k.as_ref()) {
            cmd.env_remove(&key);
        }
    }
    cmd.env("KAKAO_TOKEND_ACCOUNT", &*account.name)
        .env("KAKAO_TOKEND_TOKEN_FILE", &account.token_file);
    if let Some(env_file) = &account.env_file {
        cmd.env("KAKAO_TOKEND_ENV_FILE", &**env_file);
    }
    // Its own process group, so that a timeout kills whatever it started too.
    cmd.process_group(0);
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err) = tokio::join!(read_at_most(stdout), read_at_most(stderr));
        (child.wait().await, out, err)
    };
    let (status, stdout, stderr) = match tokio::time::timeout(timeout, run).await {
        Ok((Ok(status), out, err)) => (status, out, err),
        Ok((Err(source), ..)) => return Err(HookError::Spawn { program, source }),
        Err(_) => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            return Err(HookError::Timeout { program, timeout });
        }
    };
    let output = std::process::Output { status, stdout, stderr };
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    // The hook's words go to the log: scrubbed (and cut at 300 characters), in case it printed a token.
    let text = crate::oauth::scrub(text.trim());
    if output.status.success() {
        Ok(Some(text))
    } else {
        Err(HookError::Failed {
            program,
            status: output.status,
            output: text,
        })
    }
}

/// The most of a hook's output (stdout and stderr each) kept; the rest is read and dropped, so that a
/// chatty hook neither blocks on a full pipe nor fills the daemon's memory.
pub const HOOK_OUTPUT_CAP: usize = 64 * 1024;

async fn read_at_most<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let Some(mut pipe) = pipe else { return Vec::new() };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = HOOK_OUTPUT_CAP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_is_key_value() {
        let f = TokenFile::parse(br#"{"access_token":"AT","expires_at":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(
            String::from_utf8(env_file_contents(&f)).unwrap(),
            "KAKAO_ACCESS_TOKEN=AT\nKAKAO_ACCESS_TOKEN_EXPIRES_AT=2026-01-01T00:00:00Z\n"
        );
    }
}
