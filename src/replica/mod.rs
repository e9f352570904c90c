//! Several replicas on etcd: one refresher per account at a time, every replica's files fresh, nothing
//! lost on failover. The rules without I/O live in `kakao_tokend_core::replica`; this module is the
//! etcd side of the store seam.
//!
//! - [`etcd`]: the connection and its calls, each with a deadline.
//! - [`session`]: this replica's lease and its keep-alive.
//! - [`lock`]: an account's lock queue, whose holder's key revision fences every write.
//! - [`store`]: the record, the fenced write, pending tokens, the shared "needs a login".
//! - [`mirror`]: the watch that publishes records to the local files.
//! - [`pending_file`]: a rotated token kept locally while etcd is out of reach.

pub mod etcd;
pub mod lock;
pub mod mirror;
pub mod pending_file;
pub mod session;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

pub use mirror::{Mirror, Targets};
pub use store::EtcdStore;

use crate::config::{Config, EtcdSettings, StoreSettings};
use crate::store::{FileStore, TokenStore};

/// This host's name: the value of its lock keys, so that an operator sees who holds a lock.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn shared(settings: &EtcdSettings) -> Result<Arc<store::Shared>, etcd::EtcdError> {
    let conn = Arc::new(etcd::Connection::open(settings).await?);
    Ok(Arc::new(store::Shared {
        conn,
        keys: kakao_tokend_core::replica::Keys::new(&settings.prefix),
        settings: settings.clone(),
        session: session::Session::new(),
        host: host_name(),
    }))
}

/// The daemon's store, with what keeps it running: for etcd, the lease's keep-alive and the mirror.
#[derive(Debug)]
pub struct DaemonStore {
    pub store: Arc<dyn TokenStore>,
    /// For etcd: where the mirror says which accounts' records changed.
    pub changed: Option<mpsc::UnboundedReceiver<String>>,
    pub targets: Option<watch::Sender<Arc<Targets>>>,
    /// For etcd: the lease's keep-alive and the mirror, stopped by [`DaemonStore::end`] or on drop.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// For etcd: the connection and the session.
    shared: Option<Arc<store::Shared>>,
}

impl Drop for DaemonStore {
    fn drop(&mut self) {
        // A daemon that returns early leaves no keep-alive or mirror running behind it.
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DaemonStore {
    /// For etcd: the lease, and whether etcd answers.
    pub fn session(&self) -> Option<&Arc<session::Session>> {
        self.shared.as_ref().map(|s| &s.session)
    }

    /// At a stop, once the refreshes are over: stops the lease's keep-alive and the mirror, and gives
    /// the lease back, so that no lock of this replica's holds up another replica.
    pub async fn end(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(shared) = &self.shared {
            shared.session.end(&shared.conn).await;
        }
    }
}

pub fn targets_of(config: &Config) -> Arc<Targets> {
    Arc::new(Targets {
        accounts: config.accounts.clone(),
        backups: config.daemon.backups,
        hook_timeout: config.daemon.hook_timeout,
    })
}

/// Opens the store the config names, for the daemon.
pub async fn open_for_daemon(config: &Config) -> Result<DaemonStore, etcd::EtcdError> {
    let StoreSettings::Etcd(settings) = &config.store else {
        return Ok(DaemonStore {
            store: Arc::new(FileStore),
            changed: None,
            targets: None,
            tasks: Vec::new(),
            shared: None,
        });
    };
    let shared = shared(settings).await?;
    let (targets_tx, targets_rx) = watch::channel(targets_of(config));
    let (changed_tx, changed_rx) = mpsc::unbounded_channel();
    let mirror = Mirror::new(shared.clone(), targets_rx, changed_tx);
    let tasks = vec![
        tokio::spawn(shared.session.clone().run(shared.conn.clone(), settings.lease_ttl)),
        tokio::spawn(mirror.clone().run()),
    ];
    // The accounts start from etcd's records, not from local files that may be hours old; without
    // etcd they start from the local files after this wait, and follow etcd once it answers.
    if !mirror.first_sync(COMMAND_PATIENCE).await {
        tracing::warn!(
            event = crate::events::Event::StoreDown.as_str(),
            "etcd did not answer at start: the accounts start from the local files, and no refresh is sent until it does"
        );
    }
    Ok(DaemonStore {
        store: Arc::new(EtcdStore::new(
            shared.clone(),
            Some(mirror),
            config.daemon.request_timeout,
        )),
        changed: Some(changed_rx),
        targets: Some(targets_tx),
        tasks,
        shared: Some(shared),
    })
}

/// Opens the store the config names, for a command: etcd is read directly, and a lease is granted in
/// the background for a command that takes a lock.
pub async fn open_for_command(
    config: &Config,
) -> Result<(Arc<dyn TokenStore>, Option<tokio::task::JoinHandle<()>>), etcd::EtcdError> {
    let StoreSettings::Etcd(settings) = &config.store else {
        return Ok((Arc::new(FileStore), None));
    };
    let shared = shared(settings).await?;
    let keeper = tokio::spawn(shared.session.clone().run(shared.conn.clone(), settings.lease_ttl));
    let store: Arc<dyn TokenStore> = Arc::new(EtcdStore::new(shared, None, config.daemon.request_timeout));
    Ok((store, Some(keeper)))
}

/// A command's wait for etcd's first answer, so that `status` says "degraded" only when it is.
pub const COMMAND_PATIENCE: Duration = etcd::CALL_TIMEOUT;
