//! The rules of running as one of several replicas on etcd, without etcd: the key names, when a lock
//! counts as lost and how long a request may take under it, which pending token a lock holder merges,
//! and which record a replica publishes to its local files.
//!
//! The record of truth for account `NAME` is `{prefix}/accounts/NAME` (the token file's JSON). Its
//! refresh lock is the lowest-created key under `{prefix}/locks/NAME/`, each on its replica's lease. A
//! rotated token that could not be written under the lock waits under `{prefix}/pending/NAME/`, with no
//! lease, until a lock holder merges it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The keys of one store prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` without a trailing slash (`/kakao-tokend`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every account's record lives under this.
    pub fn records(&self) -> String {
        format!("{}/accounts/", self.prefix)
    }

    pub fn record(&self, account: &str) -> String {
        format!("{}/accounts/{account}", self.prefix)
    }

    /// The account a record key names, if it is one (a key further down is not).
    pub fn account_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let name = key.strip_prefix(&self.prefix)?.strip_prefix("/accounts/")?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }

    pub fn locks(&self, account: &str) -> String {
        format!("{}/locks/{account}/", self.prefix)
    }

    /// This replica's key in the account's lock queue: one per lease, so a replica queues once.
    pub fn lock(&self, account: &str, lease: i64) -> String {
        format!("{}/locks/{account}/{lease:016x}", self.prefix)
    }

    pub fn pendings(&self, account: &str) -> String {
        format!("{}/pending/{account}/", self.prefix)
    }

    /// A pending token's key: who put it and when, so two never collide.
    pub fn pending(&self, account: &str, replica: &str, unique: u128) -> String {
        format!("{}/pending/{account}/{replica}-{unique:x}", self.prefix)
    }

    /// The account's shared state: that its chain is dead and it needs a new login.
    pub fn state(&self, account: &str) -> String {
        format!("{}/state/{account}", self.prefix)
    }
}

/// The end of the range of every key that starts with `prefix` (etcd's `WithPrefix`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: to the end of the key space.
    vec![0]
}

/// How a replica reckons its lease: lost at the send time of the last acknowledged keep-alive plus the
/// TTL, whatever etcd may still think. A paused process that wakes after that moment knows, on its own
/// clock, that it no longer holds anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    pub ttl: Duration,
    /// When the last acknowledged keep-alive (or the grant) was sent, on the monotonic clock.
    pub acked_sent_at: Duration,
}

/// No request is sent with less lease than this left.
pub const MIN_LEASE_FOR_REQUEST: Duration = Duration::from_secs(3);
/// A request is abandoned this long before the lease is reckoned lost, leaving time for the write.
pub const WRITE_MARGIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseShort {
    #[error("the lock's lease has {left_ms} ms left, under the 3 s a request needs; it will be taken again")]
    TooLittleLeft { left_ms: u128 },
}

impl LeaseClock {
    /// When the lease is reckoned lost.
    pub fn lost_at(&self) -> Duration {
        self.acked_sent_at + self.ttl
    }

    pub fn left(&self, now: Duration) -> Duration {
        self.lost_at().saturating_sub(now)
    }

    pub fn held(&self, now: Duration) -> bool {
        now < self.lost_at()
    }

    /// The timeout of a token request sent now: the smaller of `request_timeout` and the lease left
    /// minus [`WRITE_MARGIN`]; none when less than [`MIN_LEASE_FOR_REQUEST`] is left.
    pub fn request_budget(&self, now: Duration, request_timeout: Duration) -> Result<Duration, LeaseShort> {
        let left = self.left(now);
        if left < MIN_LEASE_FOR_REQUEST {
            return Err(LeaseShort::TooLittleLeft {
                left_ms: left.as_millis(),
            });
        }
        Ok(request_timeout.min(left - WRITE_MARGIN))
    }
}

/// The hash a pending token names the refresh token it replaces by: the pending key may outlive both,
/// and etcd's readers need not see a live refresh token to match them.
pub fn refresh_token_hash(refresh_token: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(refresh_token.unwrap_or("").as_bytes());
    let out = h.finalize();
    out.iter().map(|b| format!("{b:02x}")).collect()
}

/// A rotated token that could not be written under the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingToken {
    /// [`refresh_token_hash`] of the refresh token the provider rotated away from.
    pub replaces: String,
    /// The host name of the replica that received it.
    pub replica: String,
    /// The token file it makes, as its JSON text.
    pub token: String,
}

/// What a lock holder does with the pending tokens it found beside the record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingPlan {
    /// The one to write as the record (its index), with every pending key deleted in the same
    /// transaction.
    pub merge: Option<usize>,
    /// Pending tokens that replace a refresh token the record no longer holds: a newer login or refresh
    /// won, and these are deleted.
    pub stale: Vec<usize>,
}

/// Only a pending token that replaces the record's own refresh token is merged: one made from an older
/// record would override a newer `login`. Unreadable ones count as stale.
pub fn plan_pending(record_hash: &str, pending: &[Option<PendingToken>]) -> PendingPlan {
    let mut plan = PendingPlan::default();
    for (i, p) in pending.iter().enumerate() {
        match p {
            Some(p) if p.replaces == record_hash && plan.merge.is_none() => plan.merge = Some(i),
            _ => plan.stale.push(i),
        }
    }
    plan
}

/// A replica publishes a record to its local files only when it is newer than what it published last.
pub fn should_publish(published: Option<i64>, mod_revision: i64) -> bool {
    published.is_none_or(|p| mod_revision > p)
}

/// The shared record that an account's chain is dead: set by the lock holder after a KOE322 that no late
/// write explains, for the refresh token it probed. Cleared by any new record (a login).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedState {
    pub needs_login: bool,
    /// [`refresh_token_hash`] of the refresh token that was refused.
    pub refused: String,
    pub code: String,
}

impl SharedState {
    /// Whether this state speaks of the record that holds `record_hash`.
    pub fn parks(&self, record_hash: &str) -> bool {
        self.needs_login && self.refused == record_hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_pinned_names() {
        let k = Keys::new("/kakao-tokend/");
        assert_eq!(k.record("me"), "/kakao-tokend/accounts/me");
        assert_eq!(k.lock("me", 0x1f), "/kakao-tokend/locks/me/000000000000001f");
        assert!(k.lock("me", 7).starts_with(&k.locks("me")));
        assert!(
            k.pending("me", "host-a", 9)
                .starts_with("/kakao-tokend/pending/me/host-a-")
        );
        assert_eq!(k.account_of("/kakao-tokend/accounts/me"), Some("me"));
        assert_eq!(k.account_of("/kakao-tokend/accounts/me/x"), None);
        assert_eq!(k.account_of("/kakao-tokend/locks/me/1"), None);
        assert_eq!(k.account_of("/other/accounts/me"), None);
    }

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    }

    #[test]
    fn lease_is_lost_at_the_acked_send_time_plus_ttl() {
        let c = LeaseClock {
            ttl: Duration::from_secs(5),
            acked_sent_at: Duration::from_secs(100),
        };
        assert!(c.held(Duration::from_millis(104_999)));
        assert!(!c.held(Duration::from_secs(105)));
        // Plenty left: the configured timeout.
        assert_eq!(
            c.request_budget(Duration::from_secs(100), Duration::from_secs(2)),
            Ok(Duration::from_secs(2))
        );
        // 3.5 s left: 1.5 s, so that the write still fits.
        assert_eq!(
            c.request_budget(Duration::from_millis(101_500), Duration::from_secs(30)),
            Ok(Duration::from_millis(1_500))
        );
        // Under 3 s left: no request at all.
        assert!(
            c.request_budget(Duration::from_millis(102_001), Duration::from_secs(2))
                .is_err()
        );
        assert!(
            c.request_budget(Duration::from_secs(200), Duration::from_secs(2))
                .is_err()
        );
    }

    fn pending(replaces: &str) -> Option<PendingToken> {
        Some(PendingToken {
            replaces: replaces.into(),
            replica: "r".into(),
            token: "{}".into(),
        })
    }

    #[test]
    fn only_a_pending_token_made_from_the_record_is_merged() {
        let h = refresh_token_hash(Some("rt-1"));
        let plan = plan_pending(&h, &[pending("other"), None, pending(&h), pending(&h)]);
        assert_eq!(plan.merge, Some(2));
        assert_eq!(plan.stale, vec![0, 1, 3]);
        // After a newer login nothing matches: nothing overrides it.
        let plan = plan_pending(&refresh_token_hash(Some("login")), &[pending(&h)]);
        assert_eq!(plan.merge, None);
        assert_eq!(plan.stale, vec![0]);
    }

    #[test]
    fn hashes_differ_by_token_and_hide_it() {
        let a = refresh_token_hash(Some("rt-1"));
        assert_ne!(a, refresh_token_hash(Some("rt-2")));
        assert_ne!(a, refresh_token_hash(None));
        assert!(!a.contains("rt-1"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn publish_only_newer_revisions() {
        assert!(should_publish(None, 1));
        assert!(should_publish(Some(4), 5));
        assert!(!should_publish(Some(5), 5));
        assert!(!should_publish(Some(6), 5));
    }

    #[test]
    fn shared_state_parks_only_its_own_record() {
        let s = SharedState {
            needs_login: true,
            refused: refresh_token_hash(Some("dead")),
            code: "KOE322".into(),
        };
        assert!(s.parks(&refresh_token_hash(Some("dead"))));
        assert!(!s.parks(&refresh_token_hash(Some("new login"))));
    }
}
