//! Who else can touch the files the daemon trusts: the token folder, a config that holds the client
//! secret, and a secret file. Loose modes are warned about at start and by `check-config`; a token folder
//! anyone may write to without the sticky bit is refused, since anyone could replace a token file, its
//! lock or its state file. The rules are pure functions of a mode; [`check`] reads the modes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warn,
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
}

fn warn(message: String) -> Option<Finding> {
    Some(Finding {
        severity: Severity::Warn,
        message,
    })
}

/// The folder a token file lives in.
pub fn token_folder(path: &Path, mode: u32) -> Option<Finding> {
    let shown = path.display();
    let (group_w, world_w, sticky) = (mode & 0o020 != 0, mode & 0o002 != 0, mode & 0o1000 != 0);
    if world_w && !sticky {
        return Some(Finding {
            severity: Severity::Refuse,
            message: format!(
                "token folder {shown} is writable by everyone without the sticky bit (mode {:04o}): anyone could \
                 replace a token file or its lock; fix: chmod o-w {shown}",
                mode & 0o7777
            ),
        });
    }
    if world_w || group_w {
        return warn(format!(
            "token folder {shown} is writable by {} (mode {:04o}): others could plant files beside the token \
             files; fix: chmod go-w {shown}",
            if world_w { "everyone" } else { "its group" },
            mode & 0o7777
        ));
    }
    None
}

/// The config file, when it holds a `client_secret` itself.
pub fn config_file(path: &Path, mode: u32, holds_secret: bool) -> Option<Finding> {
    if holds_secret && mode & 0o004 != 0 {
        let shown = path.display();
        return warn(format!(
            "config {shown} holds a client_secret and is readable by everyone (mode {:04o}); fix: chmod o-r {shown}, \
             or move the secret to client_secret_file or KAKAO_TOKEND__ACCOUNTS__NAME__CLIENT_SECRET",
            mode & 0o7777
        ));
    }
    None
}

/// A `client_secret_file`.
pub fn secret_file(path: &Path, mode: u32) -> Option<Finding> {
    if mode & 0o004 != 0 || mode & 0o022 != 0 {
        let shown = path.display();
        return warn(format!(
            "secret file {shown} can be {} by others (mode {:04o}); fix: chmod 0600 {shown} (0640 for a group that needs it)",
            if mode & 0o022 != 0 { "written" } else { "read" },
            mode & 0o7777
        ));
    }
    None
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

/// Every finding for `config`, the token folders that exist so far among them.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Some(mode) = mode_of(&config.path) {
        out.extend(config_file(&config.path, mode, config.secret_in_file));
    }
    let mut folders = std::collections::BTreeSet::new();
    for a in config.accounts.values() {
        if let Some(dir) = a.token_file.parent() {
            folders.insert(dir.to_path_buf());
        }
        if let Some(file) = &a.client_secret_file
            && let Some(mode) = mode_of(file)
        {
            out.extend(secret_file(file, mode));
        }
    }
    for dir in folders {
        if let Some(mode) = mode_of(&dir) {
            out.extend(token_folder(&dir, mode));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn severity(f: Option<Finding>) -> Option<Severity> {
        f.map(|f| f.severity)
    }

    #[test]
    fn token_folders() {
        let p = Path::new("/var/lib/kakao-tokend");
        assert_eq!(severity(token_folder(p, 0o40700)), None);
        assert_eq!(severity(token_folder(p, 0o40750)), None);
        assert_eq!(severity(token_folder(p, 0o40770)), Some(Severity::Warn));
        assert_eq!(severity(token_folder(p, 0o41777)), Some(Severity::Warn));
        assert_eq!(severity(token_folder(p, 0o40777)), Some(Severity::Refuse));
        assert_eq!(severity(token_folder(p, 0o40757)), Some(Severity::Refuse));
        assert!(
            token_folder(p, 0o40777)
                .unwrap()
                .message
                .contains("chmod o-w /var/lib/kakao-tokend")
        );
    }

    #[test]
    fn configs_and_secret_files() {
        let p = Path::new("/etc/kakao-tokend/config.toml");
        assert_eq!(severity(config_file(p, 0o100644, false)), None);
        assert_eq!(severity(config_file(p, 0o100640, true)), None);
        assert_eq!(severity(config_file(p, 0o100644, true)), Some(Severity::Warn));
        let s = Path::new("/run/secrets/kakao");
        assert_eq!(severity(secret_file(s, 0o100600)), None);
        assert_eq!(severity(secret_file(s, 0o100640)), None);
        assert_eq!(severity(secret_file(s, 0o100644)), Some(Severity::Warn));
        assert_eq!(severity(secret_file(s, 0o100620)), Some(Severity::Warn));
    }
}
