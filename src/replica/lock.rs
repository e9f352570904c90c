//! An account's refresh lock in etcd: the queue of keys under `{prefix}/locks/NAME/`, one per replica
//! lease, where the lowest create revision holds the lock (etcd's own mutex recipe). The holder's key
//! and its create revision are the fencing token every write compares.

use std::time::Duration;

use etcdv3client::pb;
use tracing::debug;

use super::etcd::{self, Client, EtcdError, Watch, timed};
use super::session::Lease;
use kakao_tokend_core::replica::{Keys, prefix_end};

/// A held lock: the key, and its create revision (the fencing token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub key: String,
    pub revision: i64,
    pub lease: Lease,
}

/// Queues for the account's lock on `lease` and waits until this replica holds it, at most `patience`.
pub async fn acquire(
    client: &Client,
    keys: &Keys,
    account: &str,
    lease: Lease,
    host: &str,
    patience: Duration,
) -> Result<Held, EtcdError> {
    let key = keys.lock(account, lease.id);
    let queue = keys.locks(account);
    let mut c = client.clone();
    // Join the queue, or find this lease's key already in it (a retry after a lost answer).
    let joined = timed(c.kv.txn(etcd::txn(
        vec![etcd::create_revision_is(&key, 0)],
        vec![etcd::put(&key, host.as_bytes().to_vec(), lease.id)],
        vec![etcd::get(etcd::range(&key))],
    )))
    .await?;
    let revision = if joined.succeeded {
        etcd::revision_of(&joined)
    } else {
        etcd::ranged(&joined, 0).first().map_or(0, |kv| kv.create_revision)
    };
    if revision == 0 {
        return Err(EtcdError::Call("the lock key vanished as it was made".into()));
    }
    let held = Held { key, revision, lease };
    let waited = tokio::time::timeout(patience, wait_for_turn(client, &queue, &held)).await;
    match waited {
        Ok(Ok(())) => Ok(held),
        Ok(Err(e)) => {
            release(client, &held).await;
            Err(e)
        }
        Err(_) => {
            release(client, &held).await;
            Err(EtcdError::Call(format!(
                "another replica held the lock for over {}s",
                patience.as_secs()
            )))
        }
    }
}

/// Waits until no key created before ours is left in the queue, and ours is still there.
async fn wait_for_turn(client: &Client, queue: &str, held: &Held) -> Result<(), EtcdError> {
    let mut c = client.clone();
    loop {
        let ahead = timed(c.kv.range(pb::RangeRequest {
            key: queue.as_bytes().to_vec(),
            range_end: prefix_end(queue.as_bytes()),
            max_create_revision: held.revision - 1,
            sort_order: pb::range_request::SortOrder::Descend as i32,
            sort_target: pb::range_request::SortTarget::Create as i32,
            limit: 1,
            ..Default::default()
        }))
        .await?;
        let Some(last) = ahead.kvs.first() else {
            // Nobody ahead: ours, if our key survived the wait (its lease may have lapsed).
            let mine = timed(c.kv.range(etcd::range(&held.key))).await?;
            return match mine.kvs.first() {
                Some(kv) if kv.create_revision == held.revision => Ok(()),
                _ => Err(EtcdError::Call(
                    "this replica's lock key expired while it waited".into(),
                )),
            };
        };
        debug!(ahead = %String::from_utf8_lossy(&last.value), "waiting for the lock");
        let from = ahead.header.as_ref().map_or(0, |h| h.revision) + 1;
        let mut watch = Watch::start(client.clone(), &last.key, Vec::new(), from).await?;
        loop {
            let changes = watch.next().await?;
            if changes
                .events
                .iter()
                .any(|e| e.r#type == pb::event::EventType::Delete as i32)
            {
                break;
            }
        }
    }
}

/// Lets go of the lock (deleting the key), once; a failure leaves it to the lease.
pub async fn release(client: &Client, held: &Held) {
    let mut c = client.clone();
    if let Err(e) = timed(c.kv.txn(etcd::txn(
        vec![etcd::create_revision_is(&held.key, held.revision)],
        vec![etcd::delete(held.key.as_bytes())],
        vec![],
    )))
    .await
    {
        debug!("cannot release the lock now ({e}); it goes with the lease");
    }
}
