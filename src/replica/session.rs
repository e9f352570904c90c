//! This replica's lease: granted, kept alive on a timer, and reckoned lost on this process's own
//! monotonic clock at the send time of the last acknowledged keep-alive plus the TTL. Every account's
//! lock key hangs on it, so a replica that dies or is cut off lets go of all its locks at once.

use std::sync::Arc;
use std::time::Duration;

use etcdv3client::pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::etcd::{CALL_TIMEOUT, Client, Connection, EtcdError, timed};
use crate::events::Event;
use kakao_tokend_core::replica::LeaseClock;

/// The lease as this replica last knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// 0 while there is none.
    pub id: i64,
    pub clock: LeaseClock,
}

impl Lease {
    const NONE: Lease = Lease {
        id: 0,
        clock: LeaseClock {
            ttl: Duration::ZERO,
            acked_sent_at: Duration::ZERO,
        },
    };
}

/// The lease, and whether etcd answered the last keep-alive: shared by every account task.
#[derive(Debug)]
pub struct Session {
    epoch: Instant,
    lease: watch::Sender<Lease>,
    up: watch::Sender<bool>,
    /// Leases this replica gave up but etcd may still hold, with lock keys on them that block every
    /// queue they are in: revoked until etcd confirms. Only the session task touches it.
    stale: std::sync::Mutex<Vec<i64>>,
}

impl Session {
    pub fn new() -> Arc<Session> {
        Arc::new(Session {
            epoch: Instant::now(),
            lease: watch::channel(Lease::NONE).0,
            up: watch::channel(false).0,
            stale: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Now on the clock that leases are reckoned by.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn lease(&self) -> Lease {
        *self.lease.borrow()
    }

    /// The lease, if it is still held by this replica's reckoning.
    pub fn held(&self) -> Option<Lease> {
        let l = self.lease();
        (l.id != 0 && l.clock.held(self.now())).then_some(l)
    }

    /// Whether etcd answered this replica's last call to it.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    pub fn subscribe_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    pub fn subscribe_lease(&self) -> watch::Receiver<Lease> {
        self.lease.subscribe()
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_if_modified(|u| std::mem::replace(u, up) != up);
    }

    /// Grants and keeps the lease alive until the task is dropped; grants a new one when it lapses.
    pub async fn run(self: Arc<Self>, conn: Arc<Connection>, ttl: Duration) {
        let mut backoff = Backoff::default();
        loop {
            let tried = Instant::now();
            match self.grant_and_keep(&conn, ttl).await {
                Ok(()) => backoff = Backoff::default(),
                Err(e) => {
                    if self.is_up() {
                        warn!(
                            event = Event::StoreDown.as_str(),
                            "etcd is unreachable: {e}; local files keep the last token"
                        );
                    }
                    self.set_up(false);
                    conn.distrust();
                }
            }
            // A try that already waited (a probe of members that do not answer) counts toward the pause:
            // a replica cut off from etcd tries about once a second, and catches up within one try.
            tokio::time::sleep(backoff.step().saturating_sub(tried.elapsed())).await;
        }
    }

    async fn grant_and_keep(&self, conn: &Connection, ttl: Duration) -> Result<(), EtcdError> {
        // The lease is granted only over a channel to a member that just answered: over every endpoint,
        // the other calls could go to a member that accepts connections but does not serve yet.
        if !conn.probed() {
            conn.reset().await;
            if !conn.probed() {
                return Err(EtcdError::Call("no etcd member answered with a leader".into()));
            }
        }
        let mut c = conn.client();
        // A lapsed lease may live on in etcd (a new leader renews every lease's TTL): revoked, its
        // lock keys go at once instead of blocking the queues for another TTL. A revoke that fails
        // (a member just back, still without a leader) is tried again after the grant.
        let old = self.lease().id;
        if old != 0 {
            let mut stale = self.stale.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !stale.contains(&old) {
                stale.push(old);
            }
        }
        let _ = tokio::time::timeout(CALL_TIMEOUT, self.revoke_stale(&mut c)).await;
        let sent = self.now();
        let granted = timed(c.lease.lease_grant(pb::LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        }))
        .await?;
        let ttl = Duration::from_secs(u64::try_from(granted.ttl).unwrap_or(0));
        if granted.id == 0 || ttl.is_zero() {
            return Err(EtcdError::Call("the lease was granted without an id or a TTL".into()));
        }
        self.lease.send_replace(Lease {
            id: granted.id,
            clock: LeaseClock {
                ttl,
                acked_sent_at: sent,
            },
        });
        if !self.is_up() {
            info!(
                event = Event::StoreUp.as_str(),
                lease = format!("{:x}", granted.id),
                "etcd is reachable; lease granted"
            );
        }
        self.set_up(true);
        // A third of the TTL between keep-alives leaves two more tries before the lease lapses.
        let every = (ttl / 3).max(Duration::from_millis(500));
        let mut keeper: Option<KeepAlive> = None;
        loop {
            let l = self.lease();
            if l.id != granted.id || !l.clock.held(self.now()) {
                return Err(EtcdError::Call(
                    "the lease lapsed before a keep-alive was answered".into(),
                ));
            }
            let sent = self.now();
            let answer = match keeper.as_mut() {
                Some(k) => k.ping(granted.id).await,
                None => match KeepAlive::open(&mut c, granted.id).await {
                    Ok((k, first)) => {
                        keeper = Some(k);
                        Ok(first)
                    }
                    Err(e) => Err(e),
                },
            };
            match answer {
                Ok(Some(resp)) if resp.ttl > 0 => {
                    self.lease.send_modify(|l| {
                        if l.id == granted.id {
                            l.clock.acked_sent_at = sent;
                        }
                    });
                    if !self.is_up() {
                        info!(event = Event::StoreUp.as_str(), "etcd is reachable again");
                    }
                    self.set_up(true);
                    // Revoking lapsed leases never delays the next keep-alive.
                    let _ = tokio::join!(
                        tokio::time::timeout(every, self.revoke_stale(&mut c)),
                        tokio::time::sleep(every)
                    );
                }
                Ok(Some(_)) => {
                    // etcd says the lease is gone: every lock on it is gone too.
                    warn!(
                        event = Event::LeaseLost.as_str(),
                        "the lease expired in etcd; granting a new one"
                    );
                    self.lease.send_replace(Lease::NONE);
                    return Ok(());
                }
                Ok(None) | Err(_) => {
                    if self.is_up() {
                        warn!(
                            event = Event::StoreDown.as_str(),
                            "etcd did not answer a keep-alive; local files keep the last token"
                        );
                    }
                    self.set_up(false);
                    keeper = None;
                    // The connection may be dead rather than slow: the next try goes on a new one.
                    conn.reset().await;
                    c = conn.client();
                    // Try again soon: the lease is still ours until its reckoned end.
                    tokio::time::sleep(Duration::from_millis(300).min(CALL_TIMEOUT)).await;
                }
            }
        }
    }

    /// Gives the lease back, at a stop: every lock key on it goes at once. A refresh cut short by the
    /// stop may leave its key in a queue, where it would hold up the other replicas until the lease
    /// ran out. Call it once the keep-alive task is stopped; at most one call's deadline.
    pub async fn end(&self, conn: &Connection) {
        let current = self.lease.send_replace(Lease::NONE).id;
        if current != 0 {
            self.stale
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(current);
        }
        let mut c = conn.client();
        if tokio::time::timeout(CALL_TIMEOUT, self.revoke_stale(&mut c))
            .await
            .is_ok()
        {
            debug!("gave the lease back: this replica's locks are free");
        }
    }

    /// Revokes the leases given up, forgetting each once etcd has revoked it or no longer knows it.
    async fn revoke_stale(&self, c: &mut Client) {
        let ids = self
            .stale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for id in ids {
            let gone =
                match tokio::time::timeout(CALL_TIMEOUT, c.lease.lease_revoke(pb::LeaseRevokeRequest { id })).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(e)) => e.kind() == etcdv3client::ErrKind::LeaseNotFound,
                    Err(_) => false,
                };
            if gone {
                self.stale
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|s| *s != id);
            } else {
                debug!(
                    lease = format!("{id:x}"),
                    "cannot revoke a lapsed lease yet; trying again later"
                );
            }
        }
    }
}

/// The keep-alive stream: one request, one answer, in turn.
struct KeepAlive {
    requests: tokio::sync::mpsc::Sender<pb::LeaseKeepAliveRequest>,
    answers: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl KeepAlive {
    /// Opens the stream with a first keep-alive (etcd answers the stream's headers with its first
    /// answer), and returns that answer too.
    async fn open(c: &mut Client, id: i64) -> Result<(KeepAlive, Option<pb::LeaseKeepAliveResponse>), EtcdError> {
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        requests
            .send(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| EtcdError::Call("the keep-alive stream closed".into()))?;
        let answers = timed(
            c.lease
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await?;
        let mut k = KeepAlive { requests, answers };
        let first = k.answer().await?;
        Ok((k, first))
    }

    async fn answer(&mut self) -> Result<Option<pb::LeaseKeepAliveResponse>, EtcdError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.answers.message()).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(status)) => Err(EtcdError::Call(kakao_tokend_core::answer::scrub(status.message()))),
            Err(_) => Err(EtcdError::Timeout(CALL_TIMEOUT)),
        }
    }

    async fn ping(&mut self, id: i64) -> Result<Option<pb::LeaseKeepAliveResponse>, EtcdError> {
        self.requests
            .send(pb::LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| EtcdError::Call("the keep-alive stream closed".into()))?;
        self.answer().await
    }
}

/// 100 ms doubling to 1 s: a replica cut off from etcd catches up within about a second of its return.
#[derive(Debug)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    pub fn step(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        d.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}
