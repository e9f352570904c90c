//! The configuration: one TOML file, overridden key by key from `KAKAO_TOKEND__SECTION__KEY` variables.
//!
//! Loading is strict: unknown keys, bad durations, bad URLs and unreadable secret files are errors that
//! name the key, so a typo never silently becomes a default.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/kakao-tokend/config.toml";
pub const ENV_PREFIX: &str = "KAKAO_TOKEND";
pub const DEFAULT_AUTH_URL: &str = "https://kauth.kakao.com";
pub const DEFAULT_API_URL: &str = "https://kapi.kakao.com";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kakao-tokend";

/// A config larger than this is refused before it is parsed (comments may be long; a FIFO or a device
/// given as the config cannot fill memory).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("config file {path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn de_refresh_before<'de, D: Deserializer<'de>>(d: D) -> Result<RefreshBefore, D::Error> {
    String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|_| serde::de::Error::custom("is not a duration such as \"30s\""))
}

/// `[daemon]`: settings shared by every account.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    pub log_format: LogFormat,
    #[serde(deserialize_with = "de_refresh_before")]
    pub refresh_before_expiry: RefreshBefore,
    pub backups: u32,
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    pub max_concurrent_refreshes: usize,
    /// The longest an `on_refresh` hook may run before it is killed.
    #[serde(deserialize_with = "de_duration")]
    pub hook_timeout: Duration,
    /// `127.0.0.1:9090`: serve `/metrics` (Prometheus) and `/healthz` there. Off when absent.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the wall clock is compared with the monotonic clock, to notice a suspend or a clock
    /// step: the only wakeup while idle besides the scheduled refreshes.
    #[serde(deserialize_with = "de_duration")]
    pub clock_check_interval: Duration,
    /// While token files change, how often at most the start indexes are brought up to date, so that a
    /// start after a crash reads only the files changed since. Zero: only at a clean stop.
    #[serde(deserialize_with = "de_duration")]
    pub start_index_interval: Duration,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            refresh_before_expiry: RefreshBefore::default(),
            backups: 5,
            request_timeout: Duration::from_secs(30),
            max_concurrent_refreshes: 16,
            hook_timeout: Duration::from_secs(30),
            metrics_listen: None,
            clock_check_interval: Duration::from_secs(60),
            start_index_interval: Duration::from_secs(600),
        }
    }
}

/// `[accounts.NAME]` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    client_id: String,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    redirect_uri: Option<String>,
    token_file: Option<PathBuf>,
    auth_url: Option<String>,
    api_url: Option<String>,
    token_url: Option<String>,
    authorize_url: Option<String>,
    scope: Option<String>,
    message_link: Option<String>,
    on_refresh: Option<Vec<String>>,
    env_file: Option<PathBuf>,
    file_mode: Option<String>,
    file_group: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    notify_by_message: bool,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default = "on")]
    pkce: bool,
}

fn on() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: DaemonSettings,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    accounts: BTreeMap<String, RawAccount>,
}

/// `[store]` as written in the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    endpoints: Option<Vec<String>>,
    prefix: Option<String>,
    lease_ttl: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
}

/// `[store]`: where the record of each account's token lives.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StoreSettings {
    /// Each account's token file is the record (one host; the default).
    #[default]
    File,
    /// etcd holds the records; every replica keeps its local files as outputs.
    Etcd(EtcdSettings),
}

/// `[store] kind = "etcd"`.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    pub endpoints: Vec<Url>,
    /// Every key lives under it, without a trailing slash.
    pub prefix: String,
    pub lease_ttl: Duration,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// Below this, a lock's lease leaves no room for a request (3 s) and a keep-alive in between.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(5);

pub use kakao_tokend_core::account::{Account, FileAccess};
pub use kakao_tokend_core::schedule::RefreshBefore;

/// `"0640"` → 0o640. Token files may be shared for reading, never written by others nor executed.
fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
        .map_err(|_| "is not an octal mode such as \"0640\"".to_string())?;
    if mode & !0o644 != 0 {
        return Err("would let others write or execute the token file: use a mode within 0644 (e.g. \"0640\")".into());
    }
    if mode & 0o600 != 0o600 {
        return Err("must let the owner read and write (0600 at least)".into());
    }
    Ok(mode)
}

/// A group name or number → gid.
fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.trim().parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s.trim()) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err("names no group on this system".into()),
        Err(e) => Err(format!("cannot look up the group: {e}")),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonSettings,
    pub store: StoreSettings,
    pub accounts: BTreeMap<String, Arc<Account>>,
    /// The file itself sets a `client_secret` (so who may read it matters).
    pub secret_in_file: bool,
}

/// Where `client_secret_file` points. Under systemd, `LoadCredential=NAME:/path` puts the secret in
/// `$CREDENTIALS_DIRECTORY/NAME`, readable only by the service: a relative name found there wins;
/// otherwise a relative path is relative to the config file's folder.
fn secret_file_path(file: &Path, relative: &dyn Fn(&Path) -> PathBuf) -> PathBuf {
    if file.is_relative()
        && let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY")
    {
        let candidate = Path::new(&dir).join(file);
        if candidate.exists() {
            return candidate;
        }
    }
    relative(file)
}

/// `localhost`, 127.0.0.0/8 or `::1`, from the address alone: no DNS lookup decides what is private.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        None => false,
    }
}

/// `p` without a `//`, a `.` inside or a `/` at the end, as its components read: one spelling for each
/// path, so that token files compare and hash as bytes (the daemon finds a file's account so).
fn normal_form(p: PathBuf) -> PathBuf {
    let b = p.as_os_str().as_bytes();
    let not_normal = b.windows(2).any(|w| w == b"//")
        || b.windows(3).any(|w| w == b"/./")
        || b.ends_with(b"/.")
        || (b.len() > 1 && b.ends_with(b"/"));
    if not_normal { p.components().collect() } else { p }
}

/// Account names appear in logs, file names and commands: keep them plain.
pub fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Config {
    /// Loads `path`, then applies `KAKAO_TOKEND__*` variables from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, environment())
    }

    fn load_with_env(path: &Path, env: config::Environment) -> Result<Config, ConfigError> {
        let load_err = |message: String| ConfigError::Load {
            path: path.to_path_buf(),
            message,
        };
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(load_err("is not a regular file".into())),
            Err(e) => {
                return Err(load_err(format!(
                    "cannot be read ({e}); pass --config PATH or set KAKAO_TOKEND_CONFIG"
                )));
            }
        }
        // Read once, and parsed here first: a syntax error is then reported by position and key, never
        // with the line it is on (which may hold the client secret).
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_CONFIG_BYTES as u64 + 1), &mut bytes)
            })
            .map_err(|e| load_err(format!("cannot be read ({e})")))?;
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(load_err(format!("is larger than {MAX_CONFIG_BYTES} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let (line, column) = crate::config_errors::locate_offset(&e);
            load_err(format!("is not UTF-8 text (line {line}, column {column})"))
        })?;
        let vars = config::Source::collect(&env).unwrap_or_default();
        // With nothing from the environment, the text deserializes straight into the config: no table of
        // values beside it, and no second parse and path-keyed tree by the config crate (at 100,000
        // accounts, 100 MiB and 2 s of CPU). What it refuses (the config crate's lenient conversions,
        // every error) the config crate reads, leniently as before, or explains.
        if vars.is_empty()
            && let Some(config) = read_direct(path, &text)
        {
            return config;
        }
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| load_err(crate::config_errors::syntax(&text, &e)))?;
        // In the file itself, not from the environment.
        let secret_in_file = table
            .get("accounts")
            .and_then(toml::Value::as_table)
            .is_some_and(|accounts| {
                accounts
                    .values()
                    .any(|a| a.as_table().is_some_and(|a| a.contains_key("client_secret")))
            });
        drop(table);
        let raw = read_with_config_crate(&text, env, vars).map_err(load_err)?;
        let mut config = Self::resolve(path, raw)?;
        config.secret_in_file = secret_in_file;
        Ok(config)
    }

    fn resolve(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut resolver = Resolver::new(path, &raw.daemon)?;
        for (name, a) in raw.accounts {
            resolver.add(name, a)?;
        }
        resolver.finish(raw.daemon, raw.store)
    }
}

/// Turns each `[accounts.NAME]` as written into the account the daemon runs, one at a time, so that a
/// config of many accounts is not held twice; what accounts have in common (an app's `client_id`, a
/// provider's endpoints) is parsed and kept once.
struct Resolver<'p> {
    path: &'p Path,
    /// The config file's folder, which relative paths are relative to.
    base: PathBuf,
    client_ids: foldhash::HashSet<Arc<str>>,
    urls: foldhash::HashMap<String, Arc<Url>>,
    /// An `auth_url` → the token and authorize endpoints under it, unless set on their own.
    under_auth_url: foldhash::HashMap<String, (Arc<Url>, Arc<Url>)>,
    /// In the order read; sorted by name once all are in (a bulk build of the map, not an insert each).
    accounts: Vec<(String, Arc<Account>)>,
}

impl<'p> Resolver<'p> {
    /// Checks `[daemon]`, which comes before any account.
    fn new(path: &'p Path, d: &DaemonSettings) -> Result<Resolver<'p>, ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        };
        if d.max_concurrent_refreshes == 0 {
            return Err(invalid("daemon.max_concurrent_refreshes", "must be at least 1"));
        }
        if d.request_timeout < Duration::from_secs(1) {
            return Err(invalid("daemon.request_timeout", "must be at least 1s"));
        }
        if d.clock_check_interval < Duration::from_secs(1) {
            return Err(invalid("daemon.clock_check_interval", "must be at least 1s"));
        }
        if !d.start_index_interval.is_zero() && d.start_index_interval < Duration::from_secs(1) {
            return Err(invalid(
                "daemon.start_index_interval",
                "must be at least 1s, or \"0s\" to write the start index only at a clean stop",
            ));
        }
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = std::path::absolute(&base).unwrap_or(base);
        Ok(Resolver {
            path,
            base,
            client_ids: Default::default(),
            urls: Default::default(),
            under_auth_url: Default::default(),
            accounts: Vec::new(),
        })
    }

    fn invalid(&self, key: String, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key,
            message,
        }
    }

    fn relative(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() { p } else { self.base.join(p) }
    }

    /// [`relative`](Self::relative) for the helpers that take a borrowed path.
    fn relative_to(&self) -> impl Fn(&Path) -> PathBuf + '_ {
        |p| self.relative(p.to_path_buf())
    }

    /// `s` as an http or https URL, parsed once however many accounts name it.
    fn url(&mut self, s: &str, key: impl FnOnce() -> String) -> Result<Arc<Url>, ConfigError> {
        if let Some(url) = self.urls.get(s) {
            return Ok(url.clone());
        }
        let url = match Url::parse(s) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Arc::new(url),
            Ok(_) => return Err(self.invalid(key(), "must be an http or https URL".into())),
            Err(e) => return Err(self.invalid(key(), format!("is not a URL ({e})"))),
        };
        self.urls.insert(s.to_owned(), url.clone());
        Ok(url)
    }

    /// The token and authorize endpoints under `auth_url` (already trimmed of a last `/`).
    fn under_auth_url(
        &mut self,
        auth_url: &str,
        key: impl Fn() -> String,
    ) -> Result<(Arc<Url>, Arc<Url>), ConfigError> {
        if let Some(both) = self.under_auth_url.get(auth_url) {
            return Ok(both.clone());
        }
        self.url(auth_url, &key)?;
        let both = (
            self.url(&format!("{auth_url}/oauth/token"), &key)?,
            self.url(&format!("{auth_url}/oauth/authorize"), &key)?,
        );
        self.under_auth_url.insert(auth_url.to_owned(), both.clone());
        Ok(both)
    }

    fn add(&mut self, name: String, a: RawAccount) -> Result<(), ConfigError> {
        let key = |k: &str| format!("accounts.{name}.{k}");
        if !valid_account_name(&name) {
            return Err(self.invalid(
                format!("accounts.{name}"),
                "account names may hold only a-z, 0-9 and _".into(),
            ));
        }
        if a.client_id.trim().is_empty() {
            return Err(self.invalid(key("client_id"), "is empty; set it to the app's REST API key".into()));
        }
        let mut secret_path = None;
        let client_secret = match (a.client_secret, a.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    key("client_secret_file"),
                    "set either client_secret or client_secret_file, not both".into(),
                ));
            }
            (Some(s), None) => Some(Secret::new(s.trim())),
            (None, Some(file)) => {
                let file = secret_file_path(&file, &self.relative_to());
                // A secret is a line, not a stream: a FIFO or a device here cannot hang or fill memory.
                let (bytes, _) = crate::store::read_regular(&file, 64 * 1024, true).map_err(|e| {
                    self.invalid(
                        key("client_secret_file"),
                        format!("{} cannot be read: {e}", file.display()),
                    )
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    self.invalid(
                        key("client_secret_file"),
                        format!("{} is not UTF-8 text", file.display()),
                    )
                })?;
                secret_path = Some(file);
                Some(Secret::new(text.trim()))
            }
            (None, None) => None,
        }
        .filter(|s| !s.is_empty());

        let auth_url = a.auth_url.as_deref().unwrap_or(DEFAULT_AUTH_URL).trim_end_matches('/');
        let (under_token, under_authorize) = self.under_auth_url(auth_url, || key("auth_url"))?;
        // The endpoints that carry the refresh token, the client secret or the access token, each with
        // the key it came from.
        let token_url = match &a.token_url {
            Some(u) => (self.url(u, || key("token_url"))?, "token_url"),
            None => (under_token, "auth_url"),
        };
        let authorize_url = match &a.authorize_url {
            Some(u) => (self.url(u, || key("authorize_url"))?, "authorize_url"),
            None => (under_authorize, "auth_url"),
        };
        let api_url = (
            self.url(a.api_url.as_deref().unwrap_or(DEFAULT_API_URL), || key("api_url"))?,
            "api_url",
        );
        for (url, k) in [&token_url, &authorize_url, &api_url] {
            if url.scheme() == "http" && !a.allow_insecure_http && !is_loopback(url) {
                return Err(self.invalid(
                    key(k),
                    format!(
                        "is plain http to a host that is not loopback: tokens and the client secret \
                         would cross the network in the clear. Use https, or set \
                         accounts.{name}.allow_insecure_http = true (a test provider on a private network)"
                    ),
                ));
            }
        }
        if let Some(r) = &a.redirect_uri {
            self.url(r, || key("redirect_uri"))?;
        }
        if let Some(l) = &a.message_link {
            self.url(l, || key("message_link"))?;
        }
        let on_refresh = match a.on_refresh {
            Some(cmd) if cmd.is_empty() || cmd[0].trim().is_empty() => {
                return Err(self.invalid(
                    key("on_refresh"),
                    "must name a program: [\"program\", \"arg\", ...]".into(),
                ));
            }
            other => other,
        };
        let access = FileAccess {
            mode: a
                .file_mode
                .as_deref()
                .map(parse_mode)
                .transpose()
                .map_err(|m| self.invalid(key("file_mode"), m))?
                .unwrap_or(0o600),
            gid: a
                .file_group
                .as_deref()
                .map(parse_group)
                .transpose()
                .map_err(|m| self.invalid(key("file_group"), m))?,
        };
        let env_file = a.env_file.map(|p| self.relative(p));
        let ca_file = a.ca_file.map(|p| self.relative(p));
        if let Some(ca) = &ca_file {
            crate::ca::load_ca_file(ca).map_err(|m| self.invalid(key("ca_file"), m))?;
        }
        let scope = a.scope.map(|s| {
            s.split([',', ' '])
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        });

        let token_file = normal_form(
            self.relative(
                a.token_file
                    .unwrap_or_else(|| Path::new(DEFAULT_STATE_DIR).join(format!("{name}.json"))),
            ),
        );
        if token_file.file_name().is_none() {
            return Err(self.invalid(key("token_file"), "must name a file".into()));
        }
        let client_id = match self.client_ids.get(a.client_id.trim()) {
            Some(id) => id.clone(),
            None => {
                let id: Arc<str> = a.client_id.trim().into();
                self.client_ids.insert(id.clone());
                id
            }
        };
        let account = Arc::new(Account {
            name: name.as_str().into(),
            client_id,
            client_secret,
            // The optional strings boxed to their length: 8 bytes less each, in every account.
            client_secret_file: secret_path.map(Into::into),
            redirect_uri: a.redirect_uri.map(Into::into),
            token_file,
            token_url: token_url.0,
            authorize_url: authorize_url.0,
            api_url: api_url.0,
            scope: scope.filter(|s| !s.is_empty()).map(Into::into),
            message_link: a.message_link.map(Into::into),
            on_refresh: on_refresh.map(Into::into),
            env_file: env_file.map(Into::into),
            access,
            ca_file: ca_file.map(Into::into),
            notify_by_message: a.notify_by_message,
            allow_insecure_http: a.allow_insecure_http,
            pkce: a.pkce,
        });
        self.accounts.push((name, account));
        Ok(())
    }

    /// Sorts the accounts by name; false if a name is there twice (only a config read a section at a
    /// time can have that: a map of accounts has each name once).
    fn sort(&mut self) -> bool {
        // Stable and linear on names already in order, as a generated config's usually are.
        self.accounts.sort_by(|(a, _), (b, _)| a.cmp(b));
        self.accounts.windows(2).all(|w| w[0].0 != w[1].0)
    }

    fn finish(mut self, daemon: DaemonSettings, store: RawStore) -> Result<Config, ConfigError> {
        // Built at once from names in order (see `sort`), not searched for an insert each.
        let accounts: BTreeMap<String, Arc<Account>> = std::mem::take(&mut self.accounts).into_iter().collect();
        // Checked over the accounts made, not with a copy of every path and name as they are made: those
        // copies, freed at once, left holes between the accounts that stayed resident. Hashed, not
        // ordered: comparing paths component by component was a tenth of a 100,000-account start.
        // As bytes: token files are kept in one spelling (see `normal_form`).
        let mut files: foldhash::HashMap<&[u8], &str> =
            foldhash::HashMap::with_capacity_and_hasher(accounts.len(), Default::default());
        for a in accounts.values() {
            if let Some(other) = files.insert(a.token_file.as_os_str().as_bytes(), &a.name) {
                return Err(self.invalid(
                    format!("accounts.{}.token_file", a.name),
                    format!(
                        "{} is already the token file of account {other}",
                        a.token_file.display()
                    ),
                ));
            }
        }
        drop(files);
        let store =
            resolve_store(store, &self.relative_to()).map_err(|(k, m)| self.invalid(format!("store.{k}"), m))?;
        Ok(Config {
            path: self.path.to_path_buf(),
            daemon,
            store,
            accounts,
            secret_in_file: false,
        })
    }
}

/// The file as it is, when it deserializes without the config crate's conversions: one section at a
/// time where the layout is the plain one (no document of the whole file held at once), else whole.
/// `None` where it does not deserialize so, which the config crate then reads or explains. Each account
/// is resolved as it is read; a section further on that does not read this way still gives `None`,
/// so that the whole file's reading reports it.
fn read_direct(path: &Path, text: &str) -> Option<Result<Config, ConfigError>> {
    let whole = |text: &str| {
        let raw = toml::from_str::<RawConfig>(text).ok()?;
        let secret = raw.accounts.values().any(|a| a.client_secret.is_some());
        Some(Config::resolve(path, raw).map(|c| Config {
            secret_in_file: secret,
            ..c
        }))
    };
    let Some(sections) = crate::config_sections::split(text) else {
        return whole(text);
    };
    let raw: RawConfig = toml::from_str(&sections.head).ok()?;
    // Accounts named in the head too (`accounts.a.client_id = ...`): the whole file decides.
    if !raw.accounts.is_empty() {
        return whole(text);
    }
    let mut resolver = match Resolver::new(path, &raw.daemon) {
        Ok(r) => r,
        Err(e) => return Some(Err(e)),
    };
    resolver.accounts.reserve_exact(sections.accounts.len());
    let mut secret = false;
    let mut first_error = None;
    for (name, body) in sections.accounts {
        let account = match crate::config_sections::read_plain::<RawAccount>(body) {
            Some(account) => account,
            None => toml::from_str::<RawAccount>(body).ok()?,
        };
        secret |= account.client_secret.is_some();
        if first_error.is_none()
            && let Err(e) = resolver.add(name.to_owned(), account)
        {
            first_error = Some(e);
        }
    }
    // A table defined twice is an error, which the whole file's reading reports.
    if !resolver.sort() {
        return None;
    }
    if let Some(e) = first_error {
        return Some(Err(e));
    }
    Some(resolver.finish(raw.daemon, raw.store).map(|c| Config {
        secret_in_file: secret,
        ..c
    }))
}

/// The file with the environment over it (`vars`, collected from `env`), through the config crate: its
/// conversions (`backups = "5"`) and its errors, described without any value from the file or the
/// environment.
fn read_with_config_crate(
    text: &str,
    env: config::Environment,
    vars: config::Map<String, config::Value>,
) -> Result<RawConfig, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| crate::config_errors::syntax(text, &e))?;
    let mut values = crate::config_errors::string_values(&table);
    values.extend(vars.into_values().filter_map(|v| v.into_string().ok()));
    // The environment is added last so that it wins over the file.
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(env)
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| crate::config_errors::describe(&e, text, &values))
}

/// The `KAKAO_TOKEND__SECTION__KEY` variables; `store.endpoints` takes a comma-separated list.
fn environment() -> config::Environment {
    config::Environment::with_prefix(ENV_PREFIX)
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("store.endpoints")
}

/// Checks `[store]`; an error names the key under `store.` and what to do.
fn resolve_store(raw: RawStore, relative: &dyn Fn(&Path) -> PathBuf) -> Result<StoreSettings, (&'static str, String)> {
    match raw.kind.as_deref().unwrap_or("file") {
        "file" => {
            if raw.endpoints.is_some() {
                return Err((
                    "endpoints",
                    "is set, but store.kind is \"file\"; set kind = \"etcd\" to use etcd".into(),
                ));
            }
            return Ok(StoreSettings::File);
        }
        "etcd" => {}
        _ => return Err(("kind", "must be \"file\" or \"etcd\"".into())),
    }
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        return Err((
            "endpoints",
            "is empty: list the etcd members, e.g. [\"https://etcd-1:2379\"]".into(),
        ));
    }
    let mut urls = Vec::new();
    for e in &endpoints {
        let url =
            Url::parse(e.trim()).map_err(|err| ("endpoints", format!("holds an entry that is not a URL ({err})")))?;
        match url.scheme() {
            "https" => {}
            "http" if raw.allow_insecure_http || is_loopback(&url) => {}
            "http" => {
                return Err((
                    "endpoints",
                    "holds a plain http endpoint off loopback: tokens would cross the network in the clear. \
                     Use https, or set store.allow_insecure_http = true (a private network)"
                        .into(),
                ));
            }
            _ => return Err(("endpoints", "must hold http or https URLs".into())),
        }
        if url.host_str().is_none() {
            return Err(("endpoints", "holds a URL without a host".into()));
        }
        urls.push(url);
    }
    let prefix = raw.prefix.unwrap_or_else(|| "/kakao-tokend".into());
    let prefix = prefix.trim_end_matches('/').to_string();
    if !prefix.starts_with('/') || prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err((
            "prefix",
            "must start with / and hold no spaces or control characters".into(),
        ));
    }
    let lease_ttl = match raw.lease_ttl.as_deref() {
        Some(s) => {
            humantime::parse_duration(s).map_err(|_| ("lease_ttl", "is not a duration such as \"15s\"".to_string()))?
        }
        None => Duration::from_secs(15),
    };
    if lease_ttl < MIN_LEASE_TTL {
        return Err((
            "lease_ttl",
            format!(
                "is under {}s: a request needs 3 s of lease left and a keep-alive must fit in between; use \"15s\"",
                MIN_LEASE_TTL.as_secs()
            ),
        ));
    }
    if lease_ttl.subsec_nanos() != 0 {
        return Err((
            "lease_ttl",
            "must be whole seconds (etcd grants leases in seconds)".into(),
        ));
    }
    let ca_file = raw.ca_file.as_deref().map(relative);
    if let Some(ca) = &ca_file {
        crate::ca::load_ca_file(ca).map_err(|m| ("ca_file", m))?;
    }
    let cert_file = raw.cert_file.as_deref().map(relative);
    let key_file = raw.key_file.as_deref().map(relative);
    match (&cert_file, &key_file) {
        (Some(_), None) => return Err(("key_file", "is missing: cert_file needs its key_file".into())),
        (None, Some(_)) => return Err(("cert_file", "is missing: key_file needs its cert_file".into())),
        _ => {}
    }
    for (k, f) in [("cert_file", &cert_file), ("key_file", &key_file)] {
        if let Some(f) = f {
            crate::store::read_regular(f, 1 << 20, true)
                .map_err(|e| (k, format!("{} cannot be read: {e}", f.display())))?;
        }
    }
    let password = match (&raw.username, &raw.password_file) {
        (Some(_), Some(file)) => {
            let file = secret_file_path(file, relative);
            let (bytes, _) = crate::store::read_regular(&file, 64 * 1024, true)
                .map_err(|e| ("password_file", format!("{} cannot be read: {e}", file.display())))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| ("password_file", format!("{} is not UTF-8 text", file.display())))?;
            Some(Secret::new(text.trim()))
        }
        (Some(_), None) => return Err(("password_file", "is missing: username needs a password_file".into())),
        (None, Some(_)) => return Err(("username", "is missing: password_file needs a username".into())),
        (None, None) => None,
    };
    Ok(StoreSettings::Etcd(EtcdSettings {
        endpoints: urls,
        prefix,
        lease_ttl,
        ca_file,
        cert_file,
        key_file,
        username: raw.username,
        password,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        let vars: HashMap<String, String> = env.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        Config::load_with_env(&path, environment().source(Some(vars)))
    }

    const ETCD: &str = r#"
        [store]
        kind = "etcd"
        endpoints = ["https://etcd-1:2379", "https://etcd-2:2379"]
        lease_ttl = "5s"

        [accounts.me]
        client_id = "abc"
        token_file = "me.json"
    "#;

    #[test]
    fn the_store_is_the_file_unless_etcd_is_named() {
        assert_eq!(load_str(MINIMAL, &[]).unwrap().store, StoreSettings::File);
        let c = load_str(ETCD, &[]).unwrap();
        let StoreSettings::Etcd(e) = c.store else {
            panic!("etcd")
        };
        assert_eq!(e.endpoints.len(), 2);
        assert_eq!(e.prefix, "/kakao-tokend");
        assert_eq!(e.lease_ttl, Duration::from_secs(5));
    }

    #[test]
    fn etcd_endpoints_come_from_the_environment_as_a_list() {
        let c = load_str(
            ETCD,
            &[(
                "KAKAO_TOKEND__STORE__ENDPOINTS",
                "https://a:2379,https://b:2379,https://c:2379",
            )],
        )
        .unwrap();
        let StoreSettings::Etcd(e) = c.store else {
            panic!("etcd")
        };
        let hosts: Vec<_> = e.endpoints.iter().map(|u| u.host_str().unwrap().to_string()).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
    }

    #[test]
    fn a_short_lease_plain_http_and_stray_endpoints_are_refused_by_key() {
        let short = ETCD.replace("\"5s\"", "\"3s\"");
        let e = load_str(&short, &[]).unwrap_err().to_string();
        assert!(e.contains("store.lease_ttl") && e.contains("5s"), "{e}");
        let plain = ETCD.replace("https://etcd-1", "http://etcd-1");
        let e = load_str(&plain, &[]).unwrap_err().to_string();
        assert!(
            e.contains("store.endpoints") && e.contains("allow_insecure_http"),
            "{e}"
        );
        let allowed = plain.replace("lease_ttl", "allow_insecure_http = true\n        lease_ttl");
        assert!(load_str(&allowed, &[]).is_ok());
        let stray = MINIMAL.to_string() + "\n[store]\nendpoints = [\"https://x:2379\"]\n";
        let e = load_str(&stray, &[]).unwrap_err().to_string();
        assert!(e.contains("store.endpoints") && e.contains("kind"), "{e}");
        let prefix = ETCD.replace("lease_ttl", "prefix = \"no-slash\"\n        lease_ttl");
        let e = load_str(&prefix, &[]).unwrap_err().to_string();
        assert!(e.contains("store.prefix"), "{e}");
    }

    const MINIMAL: &str = r#"
        [accounts.me]
        client_id = "abc"
        token_file = "me.json"
    "#;

    /// Every key, each set away from its default.
    const EVERY_KEY: &str = r#"
        [daemon]
        log_format = "json"
        refresh_before_expiry = "40%"
        backups = 3
        request_timeout = "20s"
        max_concurrent_refreshes = 4
        hook_timeout = "10s"
        metrics_listen = "127.0.0.1:9184"
        clock_check_interval = "30s"
        start_index_interval = "5m"

        [store]
        kind = "etcd"
        endpoints = ["https://etcd-1:2379", "https://etcd-2:2379"]
        prefix = "/tokens"
        lease_ttl = "10s"
        ca_file = "ca.pem"
        cert_file = "cert.pem"
        key_file = "key.pem"
        username = "kt"
        password_file = "etcd-password"

        [accounts.me]
        client_id = "abc"
        client_secret = "s3cret"
        redirect_uri = "http://localhost:8080/callback"
        token_file = "me.json"
        auth_url = "https://kauth.example"
        api_url = "https://kapi.example"
        token_url = "https://kauth.example/token"
        authorize_url = "https://kauth.example/authorize"
        scope = "talk_message profile_nickname"
        message_link = "https://example.com"
        on_refresh = ["/bin/true", "--flag"]
        env_file = "me.env"
        file_mode = "0640"
        file_group = "0"
        ca_file = "ca.pem"
        notify_by_message = false
        allow_insecure_http = true
        pkce = false

        [accounts.other]
        client_id = "def"
        client_secret_file = "secret"
    "#;

    /// Without the environment, a file is read straight from its TOML table: that reading must give what
    /// the config crate gives, or give way to it.
    #[test]
    fn the_direct_reading_agrees_with_the_config_crate() {
        let shipped = include_str!("../config/kakao-tokend.toml");
        let dotted = "accounts.me.client_id = \"1\"\n[accounts.you]\nclient_id = \"2\"\n";
        let quoted = "[accounts.\"me\"]\nclient_id = \"1\"\n";
        // The files EVERY_KEY names, so that both readings resolve it whole.
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), ca.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ca.signing_key.serialize_pem()).unwrap();
        for secret in ["secret", "etcd-password"] {
            std::fs::write(dir.path().join(secret), "s3cret\n").unwrap();
        }
        let path = &dir.path().join("config.toml");
        for text in [MINIMAL, ETCD, EVERY_KEY, shipped, dotted, quoted] {
            // The plain layouts are cut into sections (accounts in the head are then read whole).
            assert_eq!(crate::config_sections::split(text).is_some(), text != quoted, "{text}");
            let direct = read_direct(path, text).expect("read directly").unwrap();
            let through = read_with_config_crate(text, environment(), config::Map::new()).unwrap();
            let through = Config {
                secret_in_file: direct.secret_in_file,
                ..Config::resolve(path, through).unwrap()
            };
            assert_eq!(direct, through, "{text}");
        }
        // What only the config crate converts is left to it, and read as before.
        let lenient = format!("[daemon]\nbackups = \"5\"\n{MINIMAL}");
        assert!(read_direct(Path::new("c.toml"), &lenient).is_none());
        assert_eq!(load_str(&lenient, &[]).unwrap().daemon.backups, 5);
        // An error is the config crate's, naming the key.
        let unknown = format!("[daemon]\nbakups = 5\n{MINIMAL}");
        assert!(read_direct(Path::new("c.toml"), &unknown).is_none());
        let e = load_str(&unknown, &[]).unwrap_err().to_string();
        assert!(e.contains("bakups"), "{e}");
        // So is an error in one account's section, and an account defined twice.
        let unknown = format!("{MINIMAL}[accounts.you]\nclient_id = \"2\"\ntoken_fil = \"x\"\n");
        assert!(read_direct(Path::new("c.toml"), &unknown).is_none());
        let e = load_str(&unknown, &[]).unwrap_err().to_string();
        assert!(e.contains("token_fil"), "{e}");
        // Text that is no TOML, which the cut by lines and TOML's lexer cut differently: an error either way.
        for bad in ["x = \"\"a\"{\"\n", "x = 1']'\n"] {
            assert!(load_str(&format!("{bad}{MINIMAL}"), &[]).is_err(), "{bad}");
        }
        let twice = format!("{MINIMAL}{MINIMAL}");
        assert!(read_direct(Path::new("c.toml"), &twice).is_none());
        assert!(load_str(&twice, &[]).is_err());
    }

    /// However a token file's path is written, it is kept in one spelling, and that spelling is its
    /// folder, a `/` and its name: what an inotify event's path is made of.
    #[test]
    fn token_files_are_kept_in_one_spelling() {
        for (written, kept) in [
            ("/t//a/./b.json", "/t/a/b.json"),
            ("/t/a/b.json/", "/t/a/b.json"),
            ("/t/a/.", "/t/a"),
            ("/t/a/b.json", "/t/a/b.json"),
            ("/b.json", "/b.json"),
            ("/t/../b.json", "/t/../b.json"),
        ] {
            let p = normal_form(PathBuf::from(written));
            assert_eq!(p.as_os_str(), kept, "{written}");
            let rebuilt = p.parent().unwrap().join(p.file_name().unwrap());
            assert_eq!(rebuilt.as_os_str(), p.as_os_str(), "{written}");
        }
        let c = load_str(
            &MINIMAL.replace("token_file = \"me.json\"", "token_file = \"./x//me.json\""),
            &[],
        )
        .unwrap();
        let kept = c.accounts["me"].token_file.as_os_str().to_str().unwrap().to_owned();
        assert!(
            kept.ends_with("/x/me.json") && !kept.contains("//") && !kept.contains("/./"),
            "{kept}"
        );
    }

    /// A client secret written in the file is noticed whichever way the file is read, and one that comes
    /// from the environment alone is not the file's.
    #[test]
    fn a_secret_in_the_file_is_noticed_both_ways() {
        let with_secret = format!("{MINIMAL}client_secret = \"s3cr3t\"\n");
        assert!(load_str(&with_secret, &[]).unwrap().secret_in_file);
        let env = [("KAKAO_TOKEND__DAEMON__BACKUPS", "3")];
        assert!(load_str(&with_secret, &env).unwrap().secret_in_file);
        assert!(!load_str(MINIMAL, &[]).unwrap().secret_in_file);
        let from_env = [("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET", "s3cr3t")];
        let config = load_str(MINIMAL, &from_env).unwrap();
        assert!(config.accounts["me"].client_secret.is_some());
        assert!(!config.secret_in_file);
    }

    /// A provider's many accounts keep its endpoints once; the checks still run for each account.
    #[test]
    fn accounts_share_the_urls_they_name_alike() {
        let two = format!(
            "{MINIMAL}\n[accounts.you]\nclient_id = \"abc\"\ntoken_file = \"you.json\"\n\n\
             [accounts.lab]\nclient_id = \"abc\"\nauth_url = \"http://10.0.0.5:8080\"\napi_url = \"http://10.0.0.5:8080\"\n\
             allow_insecure_http = true\n"
        );
        let c = load_str(&two, &[]).unwrap();
        let (me, you) = (&c.accounts["me"], &c.accounts["you"]);
        assert!(Arc::ptr_eq(&me.token_url, &you.token_url));
        assert!(Arc::ptr_eq(&me.api_url, &you.api_url));
        // One app's client_id, kept once.
        assert!(Arc::ptr_eq(&you.client_id, &c.accounts["lab"].client_id));
        assert_eq!(c.accounts["lab"].token_url.as_str(), "http://10.0.0.5:8080/oauth/token");
        // The same plain-http URL, already parsed for `lab`, is still refused on an account without the
        // opt-in.
        let refused = two + "\n[accounts.other]\nclient_id = \"abc\"\nauth_url = \"http://10.0.0.5:8080\"\n";
        let e = load_str(&refused, &[]).unwrap_err().to_string();
        assert!(
            e.contains("accounts.other.auth_url") && e.contains("allow_insecure_http"),
            "{e}"
        );
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = load_str(MINIMAL, &[]).unwrap();
        assert_eq!(c.daemon, DaemonSettings::default());
        let me = &c.accounts["me"];
        assert!(me.token_file.is_absolute());
        assert_eq!(me.token_file.file_name().unwrap(), "me.json");
        assert_eq!(me.token_url.as_str(), "https://kauth.kakao.com/oauth/token");
        assert_eq!(me.authorize_url.as_str(), "https://kauth.kakao.com/oauth/authorize");
        assert_eq!(me.api_url.as_str(), "https://kapi.kakao.com/");
        assert!(me.client_secret.is_none());
    }

    fn with_auth_url(url: &str, extra: &str) -> Result<Config, ConfigError> {
        load_str(&format!("{MINIMAL}auth_url = \"{url}\"\n{extra}"), &[])
    }

    /// No config error prints a value, whether from a syntax, a type or a validation error: the file,
    /// the line and column, and the key.
    #[test]
    fn config_errors_never_print_a_value() {
        let secret = "s3cret-abc";
        let cases: [(String, &str); 7] = [
            (
                format!("[accounts.me]\nclient_id = \"x\"\nclient_secret = \"{secret}\n"),
                "line 3, column",
            ),
            (
                format!("[accounts.me]\nclient_id = \"x\"\npkce = \"{secret}\"\n"),
                "line 3, column 8, key `accounts.me.pkce`",
            ),
            (
                format!("[accounts.me]\nclient_id = 5\nclient_secret = [\"{secret}\"]\n"),
                "key `accounts.me.client_secret`",
            ),
            (
                format!("[daemon]\nbackups = \"{secret}\"\n"),
                "line 2, column 11, key `daemon.backups`",
            ),
            (format!("[daemon]\nlog_format = \"{secret}\"\n"), "daemon.log_format"),
            (
                format!("[daemon]\nrequest_timeout = \"{secret}\"\n"),
                "daemon.request_timeout",
            ),
            (
                format!("[accounts.me]\nclient_id = \"x\"\nauth_url = \"https://{secret}@\"\n"),
                "accounts.me.auth_url",
            ),
        ];
        for (toml, says) in cases {
            let e = load_str(&toml, &[]).unwrap_err().to_string();
            assert!(!e.contains(secret), "{e}");
            assert!(e.contains(says), "{e} does not say {says}");
            assert!(e.contains("config.toml"), "{e}");
        }
        // From the environment too.
        let e = load_str(MINIMAL, &[("KAKAO_TOKEND__DAEMON__BACKUPS", secret)])
            .unwrap_err()
            .to_string();
        assert!(!e.contains(secret) && e.contains("daemon.backups"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        for url in [
            "http://fake:8080",
            "http://10.0.0.7",
            "http://[fd00::1]:80",
            "http://localhost.example.com",
        ] {
            let e = with_auth_url(url, "").unwrap_err().to_string();
            assert!(e.contains("`accounts.me.auth_url`"), "{url}: {e}");
            assert!(e.contains("allow_insecure_http = true"), "{url}: {e}");
        }
        let e = load_str(&format!("{MINIMAL}token_url = \"http://proxy.lan/token\"\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("`accounts.me.token_url`"), "{e}");
        let e = load_str(&format!("{MINIMAL}api_url = \"http://kapi.lan\"\n"), &[]).unwrap_err();
        assert!(e.to_string().contains("`accounts.me.api_url`"), "{e}");
    }

    #[test]
    fn plain_http_is_allowed_on_loopback_or_by_opt_in() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.5.6.7",
            "http://localhost:1",
            "http://LOCALHOST",
            "http://[::1]:9",
        ] {
            let c = with_auth_url(url, "").unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(c.accounts["me"].token_url.scheme(), "http");
        }
        let c = with_auth_url("http://fake:8080", "allow_insecure_http = true\n").unwrap();
        assert_eq!(c.accounts["me"].token_url.as_str(), "http://fake:8080/oauth/token");
        assert!(c.accounts["me"].allow_insecure_http);
        // The opt-in from the environment, as a container sets it.
        let c = load_str(
            &format!("{MINIMAL}auth_url = \"http://fake:8080\"\n"),
            &[("KAKAO_TOKEND__ACCOUNTS__ME__ALLOW_INSECURE_HTTP", "true")],
        )
        .unwrap();
        assert!(c.accounts["me"].allow_insecure_http);
    }

    #[test]
    fn environment_wins_over_the_file() {
        let toml = format!("[daemon]\nlog_format = \"text\"\nbackups = 3\n{MINIMAL}");
        let c = load_str(
            &toml,
            &[
                ("KAKAO_TOKEND__DAEMON__LOG_FORMAT", "json"),
                ("KAKAO_TOKEND__DAEMON__BACKUPS", "9"),
                ("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(c.daemon.log_format, LogFormat::Json);
        assert_eq!(c.daemon.backups, 9);
        assert_eq!(c.accounts["me"].client_secret.as_ref().unwrap().expose(), "s3cret");
    }

    #[test]
    fn numeric_looking_environment_values_stay_strings() {
        let c = load_str(
            MINIMAL,
            &[
                ("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_ID", "1234567890"),
                ("KAKAO_TOKEND__ACCOUNTS__ME__CLIENT_SECRET", "true"),
            ],
        )
        .unwrap();
        assert_eq!(&*c.accounts["me"].client_id, "1234567890");
        assert_eq!(c.accounts["me"].client_secret.as_ref().unwrap().expose(), "true");
    }

    #[test]
    fn an_account_can_come_from_the_environment_alone() {
        let c = load_str(
            "",
            &[
                ("KAKAO_TOKEND__ACCOUNTS__BOT_1__CLIENT_ID", "abc"),
                ("KAKAO_TOKEND__ACCOUNTS__BOT_1__TOKEN_FILE", "/tmp/bot.json"),
            ],
        )
        .unwrap();
        assert_eq!(c.accounts["bot_1"].token_file, PathBuf::from("/tmp/bot.json"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_str("[daemon]\nrefresh_befor_expiry = \"10%\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("refresh_befor_expiry"), "{err}");
        let err = load_str(&format!("{MINIMAL}\nclient_secrett = \"x\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("client_secrett"), "{err}");
    }

    #[test]
    fn refresh_before_expiry_forms() {
        assert_eq!("33%".parse::<RefreshBefore>().unwrap(), RefreshBefore::Share(0.33));
        assert_eq!(
            "30m".parse::<RefreshBefore>().unwrap(),
            RefreshBefore::Margin(Duration::from_secs(1800))
        );
        assert!("0%".parse::<RefreshBefore>().is_err());
        assert!("100%".parse::<RefreshBefore>().is_err());
        assert!("soon".parse::<RefreshBefore>().is_err());
        let err = load_str("[daemon]\nrefresh_before_expiry = \"soon\"\n", &[]).unwrap_err();
        // The key and the forms it takes, not the value.
        assert!(
            err.to_string().contains("daemon.refresh_before_expiry") && err.to_string().contains("\"33%\""),
            "{err}"
        );
    }

    /// `0s` turns the running daemon's index writes off; anything else under a second is refused.
    #[test]
    fn the_start_index_interval_is_off_or_at_least_a_second() {
        let with = |v: &str| load_str(&format!("[daemon]\nstart_index_interval = \"{v}\"\n{MINIMAL}"), &[]);
        assert_eq!(
            load_str(MINIMAL, &[]).unwrap().daemon.start_index_interval,
            Duration::from_secs(600)
        );
        assert_eq!(with("0s").unwrap().daemon.start_index_interval, Duration::ZERO);
        assert_eq!(with("2s").unwrap().daemon.start_index_interval, Duration::from_secs(2));
        let e = with("500ms").unwrap_err().to_string();
        assert!(e.contains("daemon.start_index_interval") && e.contains("\"0s\""), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = load_str("[daemon]\nrequest_timeout = \"fast\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().contains("request_timeout") || err.to_string().contains("fast"),
            "{err}"
        );
        let err = load_str("[accounts.Me]\nclient_id = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("accounts.Me"), "{err}");
        let err = load_str(
            "[accounts.a]\nclient_id = \"x\"\ntoken_file = \"t.json\"\n[accounts.b]\nclient_id = \"y\"\ntoken_file = \"t.json\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("accounts.b.token_file") && err.to_string().contains("of account a"),
            "{err}"
        );
        let err = load_str("[accounts.a]\nclient_id = \"x\"\nauth_url = \"ftp://x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("accounts.a.auth_url"), "{err}");
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "  s3cret\n").unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[accounts.me]\nclient_id = \"abc\"\nclient_secret_file = \"secret\"\n",
        )
        .unwrap();
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .separator("__")
            .source(Some(HashMap::new()));
        let c = Config::load_with_env(&path, env).unwrap();
        assert_eq!(c.accounts["me"].client_secret.as_ref().unwrap().expose(), "s3cret");
        std::fs::remove_file(dir.path().join("secret")).unwrap();
        let env = config::Environment::with_prefix(ENV_PREFIX)
            .separator("__")
            .source(Some(HashMap::new()));
        let err = Config::load_with_env(&path, env).unwrap_err();
        assert!(err.to_string().contains("client_secret_file"), "{err}");
    }

    #[test]
    fn file_sharing_settings() {
        let c = load_str(
            "[accounts.a]\nclient_id = \"x\"\nfile_mode = \"0640\"\nfile_group = \"0\"\nenv_file = \"a.env\"\non_refresh = [\"/bin/true\", \"x\"]\n",
            &[],
        )
        .unwrap();
        let a = &c.accounts["a"];
        assert_eq!(
            a.access,
            FileAccess {
                mode: 0o640,
                gid: Some(0)
            }
        );
        assert!(a.env_file.as_ref().unwrap().is_absolute());
        assert_eq!(a.on_refresh.as_deref().unwrap(), ["/bin/true", "x"]);
        for (mode, why) in [
            ("0666", "others write"),
            ("0755", "execute"),
            ("0440", "owner read and write"),
            ("rw", "octal"),
        ] {
            let err = load_str(
                &format!("[accounts.a]\nclient_id = \"x\"\nfile_mode = \"{mode}\"\n"),
                &[],
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("file_mode") && err.to_string().contains(why),
                "{err}"
            );
        }
        let err = load_str(
            "[accounts.a]\nclient_id = \"x\"\nfile_group = \"no-such-group-here\"\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("accounts.a.file_group"), "{err}");
        let err = load_str("[accounts.a]\nclient_id = \"x\"\non_refresh = []\n", &[]).unwrap_err();
        assert!(err.to_string().contains("on_refresh"), "{err}");
        let err = load_str("[daemon]\nmetrics_listen = \"localhost\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().contains("metrics_listen") || err.to_string().contains("localhost"),
            "{err}"
        );
    }

    #[test]
    fn custom_endpoints() {
        let c = load_str(
            "[accounts.g]\nclient_id = \"x\"\nauth_url = \"http://127.0.0.1:9/\"\ntoken_url = \"http://127.0.0.1:9/token\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.accounts["g"].token_url.as_str(), "http://127.0.0.1:9/token");
        assert_eq!(
            c.accounts["g"].authorize_url.as_str(),
            "http://127.0.0.1:9/oauth/authorize"
        );
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = Config::load(Path::new("/nonexistent/kakao-tokend.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kakao-tokend.toml"), "{err}");
        assert!(err.to_string().contains("--config"), "{err}");
    }
}
