//! Health and metrics for monitoring, off by default: `[daemon] metrics_listen = "127.0.0.1:PORT"`
//! serves `/metrics` (Prometheus text format, through the prometheus-client crate) and `/healthz`
//! (200 when every account holds a valid access token, 503 otherwise). Neither ever shows a token.

// Keyed by account names from the config: foldhash, not SipHash (a tenth of the time of a report at
// 100,000 accounts' start went to hashing names).
use foldhash::HashMap;
use std::sync::atomic::{AtomicI8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::account::Report;
use kakao_tokend_core::compact::Stamp;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: Arc<str>,
}

/// Every outcome an account task reports.
const OUTCOMES: &[&str] = &["success", "failed", "refused", "write_failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    account: Arc<str>,
    outcome: &'static str,
}

/// What every account last reported, shared by the supervisor (readiness, systemd status) and the
/// metrics server.
type Reports = Arc<Mutex<HashMap<Arc<str>, Kept>>>;

fn lock(reports: &Mutex<HashMap<Arc<str>, Kept>>) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Kept>> {
    reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Of an account's last report, what the gauges, the health check and the status line read: 72 bytes
/// instead of a whole report and a second copy of the name (at 100,000 accounts, 21 MiB became 8).
#[derive(Clone, Copy, Debug)]
struct Kept {
    expires_at: Stamp,
    next_attempt: Stamp,
    refresh_token_expires_at: Stamp,
    last_success_at: Stamp,
    consecutive_failures: u32,
    parked: bool,
}

impl From<&Report> for Kept {
    fn from(r: &Report) -> Self {
        Kept {
            expires_at: Stamp::new(r.expires_at),
            next_attempt: Stamp::new(r.next_attempt),
            refresh_token_expires_at: Stamp::new(r.refresh_token_expires_at),
            last_success_at: Stamp::new(r.last_success_at),
            consecutive_failures: r.consecutive_failures,
            parked: r.parked,
        }
    }
}

#[derive(Debug)]
pub struct Observed {
    reports: Reports,
    /// How many accounts the running config has: an account that has not reported yet is not healthy.
    expected: AtomicUsize,
    registry: Registry,
    refreshes: Family<OutcomeLabel, Counter>,
    /// With etcd: 1 when etcd answered the last keep-alive, 0 when not; -1 without etcd.
    store_up: Arc<AtomicI8>,
}

/// The per-account gauges, read from the latest reports at each scrape: nothing is cleared and refilled,
/// so two scrapes at once cannot see each other's half-built registry.
#[derive(Debug)]
struct Gauges(Reports, Arc<AtomicI8>);

impl prometheus_client::collector::Collector for Gauges {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let now = Timestamp::now();
        let mut reports: Vec<(Arc<str>, Kept)> = lock(&self.0).iter().map(|(n, k)| (n.clone(), *k)).collect();
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        type Value = fn(&Kept, Timestamp) -> Option<i64>;
        let gauges: [(&str, &str, Value); 5] = [
            (
                "access_token_expiry_timestamp_seconds",
                "When the account's access token expires (Unix time)",
                |r, _| secs(r.expires_at.get()),
            ),
            (
                "refresh_token_expiry_timestamp_seconds",
                "When the account's refresh token expires (Unix time); absent when the provider never said",
                |r, _| secs(r.refresh_token_expires_at.get()),
            ),
            (
                "last_success_timestamp_seconds",
                "When the account was last refreshed successfully (Unix time)",
                |r, _| secs(r.last_success_at.get()),
            ),
            (
                "consecutive_failures",
                "Failed refresh attempts since the last success",
                |r, _| Some(i64::from(r.consecutive_failures)),
            ),
            (
                "access_token_valid",
                "1 when the account holds an access token that has not expired",
                |r, now| Some(i64::from(r.expires_at.get().is_some_and(|e| e > now))),
            ),
        ];
        let store_up = self.1.load(Ordering::Relaxed);
        if store_up >= 0 {
            let gauge = ConstGauge::new(i64::from(store_up));
            let metric = encoder.encode_descriptor(
                "store_up",
                "1 when etcd answers this replica, 0 when the store is degraded (local files keep the last token)",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(0i64);
            let mut metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            for (account, r) in &reports {
                if let Some(v) = value(r, now) {
                    let label = AccountLabel {
                        account: account.clone(),
                    };
                    ConstGauge::new(v).encode(metric.encode_family(&label)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Default for Observed {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kakao_tokend");
        let reports = Reports::default();
        let store_up = Arc::new(AtomicI8::new(-1));
        registry.register_collector(Box::new(Gauges(reports.clone(), store_up.clone())));
        let refreshes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "refreshes",
            "Refresh attempts by outcome: success, failed (retried), refused (needs a person), write_failed",
            refreshes.clone(),
        );
        Observed {
            reports,
            expected: AtomicUsize::new(0),
            registry,
            refreshes,
            store_up,
        }
    }
}

fn secs(t: Option<Timestamp>) -> Option<i64> {
    t.map(|t| t.as_second())
}

impl Observed {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Kept>> {
        lock(&self.reports)
    }

    /// Returns how many accounts have reported so far.
    pub fn update(&self, r: Report) -> usize {
        if let Some(outcome) = r.outcome {
            self.refreshes
                .get_or_create(&OutcomeLabel {
                    account: r.account.clone(),
                    outcome,
                })
                .inc();
        }
        // The key is the account's own name: an insert allocates no copy of it.
        let kept = Kept::from(&r);
        let mut reports = self.lock();
        reports.insert(r.account, kept);
        reports.len()
    }

    /// The accounts configured now: `count` of them, each name for which `configured` holds (a lookup
    /// each, not a pass over every account for each report kept).
    pub fn set_expected(&self, count: usize, configured: impl Fn(&str) -> bool) {
        self.expected.store(count, Ordering::Relaxed);
        let mut reports = self.lock();
        // Room for every account's first report at once, rather than rehashing as they come.
        let have = reports.len();
        reports.reserve(count.saturating_sub(have));
        let removed: Vec<Arc<str>> = reports.keys().filter(|n| !configured(n)).cloned().collect();
        reports.retain(|name, _| configured(name));
        // Room for every account's first report at once, rather than a table grown by doubling.
        let room = count.saturating_sub(reports.len());
        reports.reserve(room);
        // Counters of removed accounts go too, so /metrics lists only configured accounts.
        for account in removed {
            for outcome in OUTCOMES {
                self.refreshes.remove(&OutcomeLabel {
                    account: account.clone(),
                    outcome,
                });
            }
        }
    }

    /// "3 accounts: 2 valid, 1 need attention; next refresh 2026-11-25T18:00:00Z"
    pub fn summary(&self, now: Timestamp) -> String {
        let reports = self.lock();
        let accounts = self.expected.load(Ordering::Relaxed);
        let valid = reports
            .values()
            .filter(|r| r.expires_at.get().is_some_and(|e| e > now))
            .count();
        let parked = reports.values().filter(|r| r.parked).count();
        let next = reports.values().filter_map(|r| r.next_attempt.get()).min();
        let mut s = format!("{accounts} accounts: {valid} valid");
        if parked > 0 {
            s.push_str(&format!(", {parked} need attention"));
        }
        if let Some(next) = next {
            s.push_str(&format!(
                "; next refresh {}",
                crate::token::floor_to_second(next.max(now))
            ));
        }
        s
    }

    /// Whether every configured account holds a valid access token, and the per-account view.
    pub fn health(&self, now: Timestamp) -> (bool, serde_json::Value) {
        let reports = self.lock();
        let mut healthy = reports.len() >= self.expected.load(Ordering::Relaxed);
        let mut accounts: Vec<serde_json::Value> = reports
            .iter()
            .map(|(account, r)| {
                let expires_at = r.expires_at.get();
                let valid = expires_at.is_some_and(|e| e > now);
                healthy &= valid;
                json!({
                    "account": &**account,
                    "access_token_valid": valid,
                    "access_token_expires_at": expires_at,
                    "needs_attention": r.parked,
                    "consecutive_failures": r.consecutive_failures,
                })
            })
            .collect();
        accounts.sort_by(|a, b| a["account"].as_str().cmp(&b["account"].as_str()));
        let mut body = json!({"status": if healthy { "ok" } else { "unhealthy" }, "accounts": accounts});
        // Degraded alone does not fail the check while tokens are valid: an etcd outage must not get
        // every replica restarted.
        match self.store_up.load(Ordering::Relaxed) {
            1 => body["store"] = json!("up"),
            0 => body["store"] = json!("degraded"),
            _ => {}
        }
        (healthy, body)
    }

    /// The store's state: `None` without etcd.
    pub fn set_store_up(&self, up: Option<bool>) {
        let v = match up {
            None => -1,
            Some(true) => 1,
            Some(false) => 0,
        };
        self.store_up.store(v, Ordering::Relaxed);
    }

    /// The Prometheus text exposition, gauges taken from the latest reports.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

async fn metrics(State(o): State<Arc<Observed>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        o.encode(),
    )
        .into_response()
}

async fn healthz(State(o): State<Arc<Observed>>) -> Response {
    let (healthy, body) = o.health(Timestamp::now());
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// At most this many scrapes at once: a flood of connections cannot take the descriptors the refresher
/// needs. Connections beyond it wait in the kernel's backlog, unaccepted.
pub const MAX_CONNECTIONS: usize = 64;

/// A client must send its request's headers within this time, or its connection is closed.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest a connection lives, whatever the client does (a scrape takes milliseconds).
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `/metrics` and `/healthz` until the task is dropped: HTTP/1.1 with a header-read timeout,
/// a cap on connections and on each connection's life, so a slow or hostile client costs at most
/// [`MAX_CONNECTIONS`] descriptors for at most [`HEADER_READ_TIMEOUT`].
pub async fn serve(listener: tokio::net::TcpListener, observed: Arc<Observed>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(observed);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, then the connection: the 65th waits in the backlog, not in this process.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin, and let the refresher have them.
                tracing::debug!("metrics server: cannot accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(account: &str, outcome: Option<&'static str>) -> Report {
        Report {
            account: account.into(),
            expires_at: Some(Timestamp::now() + jiff::SignedDuration::from_secs(3600)),
            next_attempt: None,
            parked: false,
            refresh_token_expires_at: None,
            last_success_at: Some(Timestamp::now()),
            consecutive_failures: 0,
            outcome,
        }
    }

    #[test]
    fn a_kept_instant_is_the_one_reported() {
        let mut r = report("a", None);
        for t in [
            None,
            Some(Timestamp::UNIX_EPOCH),
            Some(Timestamp::new(1_800_000_000, 123_456_789).unwrap()),
            Some(Timestamp::new(-1, -1).unwrap()),
            Some(Timestamp::MIN),
            Some(Timestamp::MAX),
        ] {
            (
                r.expires_at,
                r.next_attempt,
                r.refresh_token_expires_at,
                r.last_success_at,
            ) = (t, t, t, t);
            let k = Kept::from(&r);
            let kept = [
                k.expires_at,
                k.next_attempt,
                k.refresh_token_expires_at,
                k.last_success_at,
            ];
            assert_eq!(kept.map(Stamp::get), [t; 4]);
        }
        assert_eq!(size_of::<Kept>(), 72);
    }

    /// Scrapes at the same time as each other and as reports: every scrape sees every account's series
    /// (a registry cleared and refilled per scrape let one scrape see another's half-built state).
    #[test]
    fn concurrent_scrapes_each_see_every_account() {
        let observed = Arc::new(Observed::default());
        let names: Vec<String> = (0..50).map(|i| format!("a{i}")).collect();
        observed.set_expected(names.len(), |n| names.iter().any(|m| m == n));
        for n in &names {
            observed.update(report(n, Some("success")));
        }
        let scrapers: Vec<_> = (0..3)
            .map(|_| {
                let o = observed.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let text = o.encode();
                        let valid = text
                            .lines()
                            .filter(|l| l.starts_with("kakao_tokend_access_token_valid{"))
                            .count();
                        assert_eq!(valid, 50, "{text}");
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            for n in &names {
                observed.update(report(n, None));
            }
        }
        for s in scrapers {
            s.join().unwrap();
        }
        let text = observed.encode();
        assert!(
            text.contains("kakao_tokend_refreshes_total{account=\"a7\",outcome=\"success\"} 1"),
            "{text}"
        );
        assert!(!text.contains("fake-at-"));
    }
}
