//! `kakao-tokend run`: the supervisor. It hands every account to the scheduler, turns signals, inotify
//! events and wall-clock jumps into commands for them, applies reloads, and shuts down without losing a
//! refresh that is already on the wire.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

// Keyed by names and paths from the config: foldhash, not SipHash, which was a twentieth of start-up.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures_util::StreamExt;
use jiff::Timestamp;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::account::scheduler::{Id, sleep_until_opt};
use crate::account::{AccountTask, Command, Context, Scheduler, Shared};
use crate::config::{Account, Config};
use crate::events::Event;
use crate::metrics::{self, Observed};
use crate::oauth::OAuthClient;
use crate::schedule;
use crate::store;
use crate::systemd;
use crate::watch::{FolderEvent, FolderWatcher};

const CLOCK_TOLERANCE: Duration = Duration::from_secs(5);
/// Grace on top of request_timeout for in-flight refreshes to be written at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Status-line updates are gathered for this long, so a refresh storm sends one, not thousands.
const STATUS_DELAY: Duration = Duration::from_secs(1);

/// Readiness and systemd's status line, over what every account last reported.
#[derive(Debug)]
struct StatusBoard {
    observed: Arc<Observed>,
    ready: bool,
    flush_at: Option<Instant>,
}

impl StatusBoard {
    fn expect(&self, accounts: &HashSet<Running>) {
        self.observed
            .set_expected(accounts.len(), |name| accounts.contains(name));
    }

    fn summary(&self) -> String {
        self.observed.summary(Timestamp::now())
    }
}

/// The start indexes brought up to date while the daemon runs (`daemon.start_index_interval`): a start
/// after a crash then reads only the files changed since, not every one. Due an interval after the
/// first change since the last write, so an idle daemon is never woken for it.
#[derive(Debug)]
struct IndexWrites {
    every: Duration,
    due: Option<Instant>,
    last_change: Option<Instant>,
    /// The write under way: the next, and the one at stop, wait for it (both write the same files).
    writing: Option<JoinHandle<()>>,
}

impl IndexWrites {
    fn new(every: Duration) -> IndexWrites {
        IndexWrites {
            every,
            due: None,
            last_change: None,
            writing: None,
        }
    }

    /// An account's files or view changed: a write is due within the interval, unless one already is.
    fn changed(&mut self) {
        if self.every.is_zero() {
            return;
        }
        let now = Instant::now();
        self.last_change = Some(now);
        self.due.get_or_insert(now + self.every);
    }

    fn set_interval(&mut self, every: Duration) {
        self.every = every;
        if every.is_zero() {
            self.due = None;
        } else if let Some(due) = &mut self.due {
            *due = (*due).min(Instant::now() + every);
        }
    }

    /// Whether the write that fell due may start now. Not while the last is still writing: it is then
    /// due again an interval later.
    fn start(&mut self) -> bool {
        self.due = None;
        if self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            self.due = Some(Instant::now() + self.every);
            return false;
        }
        // A file changed too shortly before is left out (see `store::SETTLED`): the next write keeps it.
        if self
            .last_change
            .is_some_and(|at| at.elapsed() < store::SETTLED + Duration::from_secs(1))
        {
            self.due = Some(Instant::now() + self.every);
        }
        true
    }

    /// Waits for the write under way, if any.
    async fn finish(&mut self) {
        if let Some(w) = self.writing.take() {
            let _ = w.await;
        }
    }
}

async fn tick_opt(interval: Option<&mut tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: Option<&mut mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The store's next up/down change; pending forever without etcd.
async fn changed_opt(rx: Option<&mut watch::Receiver<bool>>) -> Option<bool> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot build the HTTP client: {0}")]
    Http(reqwest::Error),
    #[error("cannot set up the store: {0}")]
    Store(String),
    #[error("cannot start inotify (needed to notice token files written by others): {0}")]
    Inotify(io::Error),
    #[error("cannot listen on {addr} for /metrics and /healthz (daemon.metrics_listen): {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
}

/// Stops a background task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An account the scheduler runs, found by its name: the set holds a pointer to the account, not a
/// copy of its name (an ordered map of names was 10 MiB at 100,000 accounts).
#[derive(Debug)]
struct Running {
    cfg: Arc<Account>,
    id: Id,
}

impl PartialEq for Running {
    fn eq(&self, other: &Self) -> bool {
        self.cfg.name == other.cfg.name
    }
}

impl Eq for Running {}

impl std::hash::Hash for Running {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.cfg.name.hash(state);
    }
}

impl std::borrow::Borrow<str> for Running {
    fn borrow(&self) -> &str {
        &self.cfg.name
    }
}

struct Supervisor {
    sched: Scheduler,
    accounts: HashSet<Running>,
    watcher: FolderWatcher,
    /// Token file → account, so an inotify event costs a lookup, not a pass over every account.
    by_file: HashSet<ByFile>,
    /// Some account was removed by a reload: a report may then come from a task that is finishing.
    removed_any: bool,
    /// Folders whose listing at start came from their start index.
    listings_from_index: usize,
}

/// An account found by its token file: the set holds a pointer to the account, not a copy of its path
/// and name (at 100,000 accounts, 10 MiB). Found by the path's bytes: the config keeps token files in
/// normal form (no `//`, no `.` inside, no `/` at the end), which is also how an event's path is made
/// (its folder's path, a `/`, the name), and bytes hash faster than a path's components.
#[derive(Debug)]
struct ByFile(Arc<Account>);

impl ByFile {
    fn key(&self) -> &[u8] {
        self.0.token_file.as_os_str().as_bytes()
    }
}

impl PartialEq for ByFile {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ByFile {}

impl std::hash::Hash for ByFile {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key().hash(h);
    }
}

impl std::borrow::Borrow<[u8]> for ByFile {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

/// The folder of a token file in normal form: what `Path::parent` gives, without parsing it into
/// components (at 100,000 accounts, a twentieth of the start).
fn folder_of(token_file: &Path) -> &Path {
    let bytes = token_file.as_os_str().as_bytes();
    match bytes.iter().rposition(|&b| b == b'/') {
        Some(0) => Path::new("/"),
        Some(i) => Path::new(std::ffi::OsStr::from_bytes(&bytes[..i])),
        None => Path::new(""),
    }
}

impl Supervisor {
    /// Hands the accounts to the scheduler. Each folder is listed once (temp files a crash left behind,
    /// backups), however many token files it holds.
    /// Also indexes them by token file, and returns their folders: at start, in the config's order (the
    /// order the accounts were made in memory), not in a pass over the set of all accounts later.
    fn spawn_all(&mut self, cfgs: Vec<Arc<Account>>) -> BTreeSet<PathBuf> {
        self.sched.reserve(cfgs.len());
        self.accounts.reserve(cfgs.len());
        self.by_file.reserve(cfgs.len());
        let mut folders = BTreeSet::new();
        let mut scans: HashMap<PathBuf, store::FolderScan> = HashMap::new();
        // The listing of the last account's folder, at hand: the next account is most often in it too.
        let mut here: Option<(PathBuf, store::FolderScan)> = None;
        for cfg in cfgs {
            let dir = folder_of(&cfg.token_file);
            if here.as_ref().is_none_or(|(d, _)| d.as_os_str() != dir.as_os_str()) {
                if let Some((d, scan)) = here.take() {
                    scans.insert(d, scan);
                }
                let scan = scans.remove(dir).unwrap_or_else(|| self.scan(dir));
                here = Some((dir.to_path_buf(), scan));
                if !dir.as_os_str().is_empty() && !folders.contains(dir) {
                    folders.insert(dir.to_path_buf());
                }
            }
            let (_, scan) = here.as_mut().expect("set above");
            // The bytes after the folder's: the file's name, as `Path::file_name` gives it for the config's paths.
            let name = &cfg.token_file.as_os_str().as_bytes()[dir.as_os_str().len()..];
            let name = String::from_utf8_lossy(name.strip_prefix(b"/").unwrap_or(name));
            let found = scan.take(&name);
            let ctx = self.sched.context().clone();
            let id = self.sched.add(AccountTask::new(cfg.clone(), ctx, found));
            self.by_file.replace(ByFile(cfg.clone()));
            self.accounts.replace(Running { cfg, id });
        }
        self.listings_from_index += scans
            .values()
            .chain(here.as_ref().map(|(_, scan)| scan))
            .filter(|scan| scan.from_index())
            .count();
        folders
    }

    /// One listing of a folder, with its start index when the token files are the record (the listing
    /// itself may then come from the index).
    fn scan(&self, dir: &Path) -> store::FolderScan {
        if self.sched.context().store.files_are_outputs() {
            return store::FolderScan::of(dir).unwrap_or_default();
        }
        let index = store::StartIndex::load(dir).unwrap_or_else(|e| {
            warn!(
                event = Event::StartIndexUnusable.as_str(),
                folder = %dir.display(),
                "the start index {e}"
            );
            store::StartIndex::default()
        });
        store::FolderScan::at_start(dir, index)
    }

    fn send(&mut self, name: &str, cmd: Command) {
        if let Some(r) = self.accounts.get(name) {
            self.sched.send(r.id, cmd);
        }
    }

    fn send_all(&mut self, cmd: impl Fn(&Running) -> Command) {
        for r in &self.accounts {
            self.sched.send(r.id, cmd(r));
        }
    }

    /// After accounts were removed or changed: the index by token file and the folders watched, anew.
    fn update_watches(&mut self) {
        self.by_file = self.accounts.iter().map(|r| ByFile(r.cfg.clone())).collect();
        // Hashed first: the accounts share a few folders, and ordering 100,000 paths by component is slow.
        // A folder the same as the last one's (byte for byte) is not hashed again.
        let mut folders: HashSet<&Path> = HashSet::new();
        let mut last: Option<&Path> = None;
        for dir in self.accounts.iter().map(|r| folder_of(&r.cfg.token_file)) {
            if !dir.as_os_str().is_empty() && last.is_none_or(|l| l.as_os_str() != dir.as_os_str()) {
                folders.insert(dir);
                last = Some(dir);
            }
        }
        let folders: BTreeSet<PathBuf> = folders.into_iter().map(PathBuf::from).collect();
        self.watch(folders);
    }

    /// Watches exactly these folders.
    fn watch(&mut self, folders: BTreeSet<PathBuf>) {
        // The account tasks create missing folders; make sure they exist before watching them.
        for dir in &folders {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
            }
        }
        // With etcd the local files are outputs: an edit to them is not adopted, so not watched.
        let folders = if self.sched.context().store.files_are_outputs() {
            BTreeSet::new()
        } else {
            folders
        };
        for (dir, e) in self.watcher.set_folders(&folders) {
            warn!(folder = %dir.display(), "cannot watch the folder; files written there by others are noticed only at reload: {e}");
        }
    }

    fn dispatch(&mut self, event: FolderEvent) {
        match event {
            FolderEvent::Changed(path) => {
                if let Some(r) = self
                    .by_file
                    .get(path.as_os_str().as_bytes())
                    .and_then(|f| self.accounts.get(&*f.0.name))
                {
                    self.sched.send(r.id, Command::FileChanged);
                }
            }
            FolderEvent::Overflow => self.send_all(|_| Command::FileChanged),
        }
    }

    fn apply(&mut self, old: &Config, new: &Config) -> (usize, usize) {
        let mut removed = 0;
        let mut gone: Vec<Arc<str>> = self
            .accounts
            .iter()
            .map(|r| &r.cfg.name)
            .filter(|n| !new.accounts.contains_key(&***n))
            .cloned()
            .collect();
        // In the config's order, as "account added" is.
        gone.sort_unstable();
        for name in gone {
            if let Some(r) = self.accounts.take(&*name) {
                // It ends once a refresh in flight is written.
                self.sched.send(r.id, Command::Stop);
                removed += 1;
                self.removed_any = true;
                info!(account = %name, "account removed");
            }
        }
        let mut fresh = Vec::new();
        for (name, cfg) in &new.accounts {
            if let Some(r) = self.accounts.get(name.as_str()) {
                let id = r.id;
                self.accounts.replace(Running { cfg: cfg.clone(), id });
                self.sched.send(id, Command::Reload(cfg.clone()));
            } else {
                fresh.push(cfg.clone());
                info!(account = %name, "account added");
            }
        }
        let added = fresh.len();
        // Removed accounts and changed token files: the index and the watches are made anew below.
        self.spawn_all(fresh);
        if old.daemon.log_format != new.daemon.log_format {
            warn!("log_format changes take effect at the next start");
        }
        if old.daemon.metrics_listen != new.daemon.metrics_listen {
            warn!("metrics_listen changes take effect at the next start");
        }
        self.update_watches();
        (added, removed)
    }
}

/// Runs the daemon until SIGTERM/SIGINT or until `stop` completes. SIGHUP reloads `config.path`.
pub async fn run(mut config: Config, client: OAuthClient, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
    // Signals first, so that a SIGTERM during start-up is handled rather than fatal.
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    // Before anything opens descriptors.
    ensure_descriptors(&config.daemon);
    let watcher = FolderWatcher::new().map_err(DaemonError::Inotify)?;
    let mut backing = crate::replica::open_for_daemon(&config)
        .await
        .map_err(|e| DaemonError::Store(e.to_string()))?;
    let store = backing.store.clone();
    let (shared_tx, shared_rx) = watch::channel(Shared::new(config.daemon.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client,
        store: store.clone(),
        shared: shared_rx,
        shutdown: shutdown_rx,
        reports: reports_tx,
        epoch: Instant::now(),
        from_index: Default::default(),
    });
    let mut sup = Supervisor {
        sched: Scheduler::new(ctx),
        accounts: HashSet::new(),
        watcher,
        by_file: HashSet::new(),
        removed_any: false,
        listings_from_index: 0,
    };
    // Bound before any account starts: a taken port fails the start before anything is done.
    let observed = Arc::new(Observed::default());
    let _metrics_server = match config.daemon.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?;
            // The bound address: with port 0 the OS chose the port, and this line is how one learns it.
            let bound = listener.local_addr().unwrap_or(addr);
            info!(event = Event::MetricsServing.as_str(), listen = %bound, "serving /metrics and /healthz");
            if !addr.ip().is_loopback() {
                warn!(
                    event = Event::MetricsPublic.as_str(),
                    listen = %bound,
                    "metrics_listen is not a loopback address: /metrics and /healthz (account names and expiry \
                     times, never tokens) are open to the network; bind 127.0.0.1 unless a scraper elsewhere needs it"
                );
            }
            Some(AbortOnDrop(tokio::spawn(metrics::serve(listener, observed.clone()))))
        }
        None => None,
    };
    let mut store_up = backing.session().map(|s| s.subscribe_up());
    observed.set_store_up(store_up.as_ref().map(|u| *u.borrow()));
    let mut store_changed = backing.changed.take();
    // From here the supervisor holds the accounts; the config keeps its other settings (at 100,000
    // accounts a second map of them is 9 MiB).
    let accounts = std::mem::take(&mut config.accounts);
    let hooks = accounts.values().any(|a| a.on_refresh.is_some());
    let folders = sup.spawn_all(accounts.into_values().collect());
    sup.watch(folders);
    // The clocks' baseline before the line that says the daemon started: a jump after it is noticed.
    let mut clock_tick = clock_interval(config.daemon.clock_check_interval);
    let mut last_wall = Timestamp::now();
    let mut last_mono = Instant::now();
    info!(
        event = Event::Started.as_str(),
        version = env!("CARGO_PKG_VERSION"),
        config = %config.path.display(),
        accounts = sup.accounts.len(),
        store = store.kind(),
        refresh_before_expiry = %config.daemon.refresh_before_expiry,
        "kakao-tokend started"
    );
    // As PID 1 (a container without an init), orphans a hook leaves behind are this process's to reap,
    // and only tokio's own children are: say how to avoid the zombies.
    if std::process::id() == 1 && hooks {
        warn!(
            event = Event::Pid1.as_str(),
            "running as PID 1 with on_refresh hooks: processes a hook leaves behind would never be reaped; \
             run the container with an init (docker run --init, compose: init: true)"
        );
    }
    if sup.accounts.is_empty() {
        warn!("the config has no [accounts.NAME] table: nothing to do until one is added and SIGHUP is sent");
    }

    tokio::pin!(stop);
    let mut index_writes = IndexWrites::new(if store.files_are_outputs() {
        Duration::ZERO
    } else {
        config.daemon.start_index_interval
    });
    let mut status = StatusBoard {
        observed: observed.clone(),
        ready: false,
        flush_at: None,
    };
    status.expect(&sup.accounts);
    // Pinged from this loop, so a wedged loop stops the pings and systemd restarts the daemon.
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    if sup.accounts.is_empty() {
        status.ready = true;
        systemd::ready(&status.summary());
    }

    // Set when the loop ends because something broke; returned after the shutdown.
    let mut failure = None;
    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => {
                    info!(event = Event::Reloading.as_str(), config = %config.path.display(), "SIGHUP: reloading the config");
                    systemd::reloading();
                    match Config::load(&config.path) {
                        Ok(mut new) => {
                            if new.store != config.store {
                                error!(
                                    event = Event::ReloadFailed.as_str(),
                                    "[store] changed: a running daemon keeps its store; the rest of the reload applies, \
                                     and the new [store] takes effect at the next start"
                                );
                                new.store = config.store.clone();
                            }
                            if let Some(t) = &backing.targets {
                                t.send_replace(crate::replica::targets_of(&new));
                            }
                            if new.daemon != config.daemon {
                                let _ = shared_tx.send(Shared::new(new.daemon.clone()));
                            }
                            if new.daemon.clock_check_interval != config.daemon.clock_check_interval {
                                clock_tick = clock_interval(new.daemon.clock_check_interval);
                            }
                            if !store.files_are_outputs() {
                                index_writes.set_interval(new.daemon.start_index_interval);
                            }
                            let (added, removed) = sup.apply(&config, &new);
                            // Metrics and health forget removed accounts before the line says so.
                            status.expect(&sup.accounts);
                            info!(event = Event::Reloaded.as_str(), accounts = new.accounts.len(), added, removed, "reloaded");
                            config = new;
                            config.accounts.clear();
                            crate::heap::release_free_memory();
                        }
                        Err(e) => error!(event = Event::ReloadFailed.as_str(), "reload failed, the running config stays in force: {e}"),
                    }
                    systemd::ready(&status.summary());
                }
                Some(sig) => {
                    info!(
                        event = Event::ShuttingDown.as_str(),
                        signal = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" },
                        "shutting down"
                    );
                    break;
                }
                None => break,
            },
            event = sup.watcher.next() => match event {
                Some(ev) => sup.dispatch(ev),
                None => {
                    error!(event = Event::InotifyFailed.as_str(), "inotify stopped working; starting it again");
                    match restart_watcher() {
                        Ok(w) => {
                            sup.watcher = w;
                            sup.update_watches();
                        }
                        // Out through the shutdown below, like every other way out: a refresh in
                        // flight may carry the only copy of a rotated refresh token.
                        Err(e) => {
                            error!(
                                event = Event::InotifyFailed.as_str(),
                                "cannot start inotify again ({e}): stopping once the refreshes in flight are written"
                            );
                            failure = Some(DaemonError::Inotify(e));
                            break;
                        }
                    }
                }
            },
            _ = clock_tick.tick() => {
                let (wall, mono) = (Timestamp::now(), Instant::now());
                if let Some(drift) = schedule::clock_jump(wall.duration_since(last_wall), mono - last_mono, CLOCK_TOLERANCE) {
                    // Signed whole seconds: negative when the clock went back.
                    info!(
                        event = Event::ClockJumped.as_str(),
                        drift_secs = drift.as_secs(),
                        "the wall clock jumped (suspend or clock change): rescheduling"
                    );
                    sup.send_all(|_| Command::ClockJumped(drift));
                }
                (last_wall, last_mono) = (wall, mono);
            }
            Some(report) = reports_rx.recv() => {
                // A removed account's task may still be finishing a refresh: its news is not counted.
                // Looked up only once an account was removed: at start, every account reports.
                if sup.removed_any && !sup.accounts.contains(&*report.account) {
                    continue;
                }
                let known = observed.update(report);
                if !status.ready && known >= sup.accounts.len() {
                    // Every account has loaded its token file and is scheduled (or parked).
                    info!(
                        event = Event::Loaded.as_str(),
                        accounts = sup.accounts.len(),
                        from_index = sup.sched.context().from_index.load(std::sync::atomic::Ordering::Relaxed),
                        listings_from_index = sup.listings_from_index,
                        "every account is loaded"
                    );
                    status.ready = true;
                    systemd::ready(&status.summary());
                    crate::heap::release_free_memory();
                    // What was read from the files is kept for a start after a crash.
                    if sup.sched.context().from_index.load(std::sync::atomic::Ordering::Relaxed) < sup.accounts.len() {
                        index_writes.changed();
                    }
                } else if status.ready {
                    status.flush_at.get_or_insert_with(|| Instant::now() + STATUS_DELAY);
                    index_writes.changed();
                }
            }
            () = sleep_until_opt(index_writes.due) => {
                if index_writes.start() {
                    let index = sup.sched.index_now(std::time::SystemTime::now());
                    let total = sup.accounts.len();
                    index_writes.writing = Some(tokio::spawn(write_start_indexes(total, IndexWrite::Interval, move || index.write())));
                }
            }
            () = sleep_until_opt(status.flush_at) => {
                status.flush_at = None;
                systemd::status(&status.summary());
            }
            _ = tick_opt(watchdog.as_mut()) => systemd::watchdog(),
            Some(name) = recv_opt(store_changed.as_mut()) => sup.send(&name, Command::FileChanged),
            up = changed_opt(store_up.as_mut()) => {
                observed.set_store_up(up);
                if up == Some(true) {
                    // Back from an outage: every account tries again now, not after its backoff.
                    sup.send_all(|r| Command::Reload(r.cfg.clone()));
                }
            }
            () = sup.sched.turn() => {}
            () = &mut stop => break,
        }
    }

    // No new refreshes from here on; one already sent is finished and written.
    systemd::stopping();
    let _ = shutdown_tx.send(true);
    sup.sched.shut_down();
    let deadline = config.daemon.request_timeout + SHUTDOWN_GRACE;
    if tokio::time::timeout(deadline, sup.sched.finished()).await.is_err() {
        warn!("some refreshes did not finish within {}s", deadline.as_secs());
    }
    index_writes.finish().await;
    if !store.files_are_outputs() {
        let leaving = sup.sched.take_leaving();
        write_start_indexes(leaving.len(), IndexWrite::Stop, move || store::write_indexes(leaving)).await;
    }
    backing.end().await;
    signals.handle().close();
    info!(event = Event::Stopped.as_str(), "stopped");
    failure.map_or(Ok(()), Err)
}

/// Why the start indexes are written.
#[derive(Debug, Clone, Copy)]
enum IndexWrite {
    Stop,
    Interval,
}

/// What the next start may take from the start indexes instead of reading the files: `write` writes
/// them, for `total` accounts.
async fn write_start_indexes(total: usize, why: IndexWrite, write: impl FnOnce() -> store::Written + Send + 'static) {
    if total == 0 {
        return;
    }
    let Ok(written) = tokio::task::spawn_blocking(write).await else {
        return;
    };
    for (dir, e) in &written.failed {
        warn!(
            event = Event::StartIndexUnusable.as_str(),
            folder = %dir.display(),
            "cannot write the start index; the next start reads the token files: {e}"
        );
    }
    info!(
        event = Event::StartIndexWritten.as_str(),
        accounts = written.accounts,
        of = total,
        folders = written.folders,
        listings = written.listings,
        reason = match why {
            IndexWrite::Stop => "stop",
            IndexWrite::Interval => "interval",
        },
        "start index written"
    );
    if matches!(why, IndexWrite::Interval) {
        // The encoded indexes were the largest allocations since the start: their pages go back.
        crate::heap::release_free_memory();
    }
}

fn restart_watcher() -> io::Result<FolderWatcher> {
    if crate::failpoint::armed("inotify_restart_fails") {
        return Err(io::Error::other("failpoint inotify_restart_fails"));
    }
    FolderWatcher::new()
}

/// Descriptors the daemon may hold at once: the metrics server's connections, and per refresh in flight
/// a connection, the lock, the token file, a temp file, a backup and the state file, plus a margin for
/// the runtime, inotify and the logs.
fn descriptors_needed(d: &crate::config::DaemonSettings) -> u64 {
    let scrapes = if d.metrics_listen.is_some() {
        metrics::MAX_CONNECTIONS
    } else {
        0
    };
    (scrapes + 6 * d.max_concurrent_refreshes + 64) as u64
}

/// Raises the soft open-file limit to the hard one (the soft default, 1024, exists for select(), which
/// this process never uses), and warns when even that leaves too little for the refresher.
fn ensure_descriptors(d: &crate::config::DaemonSettings) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    let need = descriptors_needed(d);
    if limit < need {
        warn!(
            event = Event::DescriptorsLow.as_str(),
            limit,
            need,
            "the open-file limit is below what the refreshes in flight and the metrics server may need: raise it \
             (LimitNOFILE= in the unit, ulimit -n, docker --ulimit nofile=) or lower max_concurrent_refreshes"
        );
    }
}

/// The clock check's timer: a late tick is not made up for, since one comparison covers any gap.
fn clock_interval(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folder as `Path::parent` gives it, for the paths the config keeps.
    #[test]
    fn the_folder_of_a_token_file() {
        for p in ["/t/a/b.json", "/b.json", "/t/../b.json", "b.json", "t/b.json"] {
            let p = Path::new(p);
            assert_eq!(
                folder_of(p).as_os_str(),
                p.parent().unwrap().as_os_str(),
                "{}",
                p.display()
            );
        }
    }

    /// A write falls due an interval after the first change since the last, and no later change moves
    /// it; off, nothing ever falls due; a change too recent to be kept has another fall due.
    #[test]
    fn index_writes_fall_due_an_interval_after_the_first_change() {
        let every = Duration::from_secs(600);
        let mut w = IndexWrites::new(every);
        assert_eq!(w.due, None);
        let before = Instant::now();
        w.changed();
        let due = w.due.unwrap();
        assert!(due >= before + every && due <= Instant::now() + every);
        w.changed();
        assert_eq!(w.due, Some(due));
        // The change was just now: this write leaves it out, and the next is due.
        assert!(w.start());
        assert!(w.due.is_some_and(|d| d > due));
        // A shorter interval brings the write forward; "0s" cancels it and ignores changes.
        w.set_interval(Duration::from_secs(5));
        assert!(w.due.is_some_and(|d| d <= Instant::now() + Duration::from_secs(5)));
        w.set_interval(Duration::ZERO);
        assert_eq!(w.due, None);
        w.changed();
        assert_eq!(w.due, None);
    }
}
