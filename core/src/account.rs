//! One account as the rest of the program sees it: resolved from the config (paths absolute, the secret
//! read, URLs parsed). Plain data; loading and checking it is the config's job.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use url::Url;

use crate::secret::Secret;

/// Who may read a published file: its mode and group. Backups stay 0600 whatever these say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAccess {
    pub mode: u32,
    pub gid: Option<u32>,
}

impl Default for FileAccess {
    fn default() -> Self {
        FileAccess { mode: 0o600, gid: None }
    }
}

/// One account, resolved: paths absolute, secret read, URLs parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// Shared with the reports and the metrics table, which key on it without a copy.
    pub name: Arc<str>,
    /// Shared by the accounts of one app.
    pub client_id: Arc<str>,
    pub client_secret: Option<Secret>,
    /// Where the secret was read from, when it was a file (its mode is checked).
    pub client_secret_file: Option<Box<Path>>,
    pub redirect_uri: Option<Box<str>>,
    pub token_file: PathBuf,
    /// Shared by the accounts that name the same URL (a provider's many users).
    pub token_url: Arc<Url>,
    pub authorize_url: Arc<Url>,
    pub api_url: Arc<Url>,
    /// Consent items asked for at login, comma-separated as Kakao wants them (e.g. "talk_message").
    pub scope: Option<Box<str>>,
    /// The link `send` attaches when none is given.
    pub message_link: Option<Box<str>>,
    /// A program (and its arguments) run after each successful write of the token file.
    pub on_refresh: Option<Box<[String]>>,
    /// A `KAKAO_ACCESS_TOKEN=...` file kept beside the JSON one, for systemd's EnvironmentFile= and
    /// docker's --env-file.
    pub env_file: Option<Box<Path>>,
    /// Mode and group of the token file and the env file (backups stay 0600).
    pub access: FileAccess,
    /// A PEM file of CA certificates trusted besides the system's, for a provider or proxy behind a
    /// private CA.
    pub ca_file: Option<Box<Path>>,
    /// When the refresh token is about to die (or has died) and the access token still works, send
    /// the owner a KakaoTalk message saying what to run.
    pub notify_by_message: bool,
    /// Plain `http://` endpoints on hosts other than loopback are allowed (a test provider on a private
    /// network); otherwise they are a config error, since the refresh token and the client secret would
    /// cross the network in the clear.
    pub allow_insecure_http: bool,
    /// `login` sends a PKCE S256 challenge (and the code exchange its verifier); off only for a
    /// provider that refuses it.
    pub pkce: bool,
}
