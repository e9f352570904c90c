//! When to refresh, and how long to back off: pure functions of the token's times and `now`.
//!
//! Nothing here reads a clock or sleeps; the account task passes the wall-clock time in. That keeps the
//! rules testable at production scale (6 h tokens) in plain `#[test]`s, and lets the daemon recompute
//! every deadline after the wall clock jumps.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// How much of the access token's lifetime is left when it is refreshed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshBefore {
    /// A share of the lifetime, in (0, 1).
    Share(f64),
    /// A fixed margin before expiry.
    Margin(Duration),
}

impl Default for RefreshBefore {
    fn default() -> Self {
        RefreshBefore::Share(0.33)
    }
}

impl std::str::FromStr for RefreshBefore {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(pct) = s.strip_suffix('%') {
            let value: f64 = pct
                .trim()
                .parse()
                .map_err(|_| "is not a share such as \"33%\"".to_string())?;
            if !(value > 0.0 && value < 100.0) {
                return Err("must be more than 0% and less than 100%".into());
            }
            Ok(RefreshBefore::Share(value / 100.0))
        } else {
            let d = humantime::parse_duration(s)
                .map_err(|_| "is neither a share (\"33%\") nor a duration (\"30m\")".to_string())?;
            if d.is_zero() {
                return Err("a margin of 0 would refresh only after expiry".into());
            }
            Ok(RefreshBefore::Margin(d))
        }
    }
}

impl fmt::Display for RefreshBefore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefreshBefore::Share(s) => write!(f, "{}%", s * 100.0),
            RefreshBefore::Margin(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

use std::fmt;

/// Backoff starts here...
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// ...and never grows past this, whatever the token's lifetime.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5 * 60);
/// The longest `Retry-After` honoured; a larger one is a provider bug, not a reason to sleep for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The jitter never moves a refresh by more than this.
pub const MAX_JITTER: Duration = Duration::from_secs(5 * 60);

fn mul(d: Duration, f: f64) -> Duration {
    Duration::from_secs_f64((d.as_secs_f64() * f).max(0.0))
}

fn sub(ts: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| ts.checked_sub(d).ok())
        .unwrap_or(Timestamp::MIN)
}

pub fn add(ts: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| ts.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Time from `now` until `at`; zero when `at` has passed.
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// Two refreshes of one account are at least this far apart: a tenth of the lifetime, and never
/// less than a second, so that a provider handing out very short tokens cannot make us spin.
pub fn min_spacing(lifetime: Duration) -> Duration {
    (lifetime / 10).max(MIN_BACKOFF)
}

/// How much of the lifetime is left when the token is refreshed: the setting, kept below 90 % of the
/// lifetime so that a margin longer than the token (say "30m" on 10-minute tokens) cannot ask for a
/// refresh straight after each refresh.
pub fn margin(policy: RefreshBefore, lifetime: Duration) -> Duration {
    let wanted = match policy {
        RefreshBefore::Share(share) => mul(lifetime, share),
        RefreshBefore::Margin(d) => d,
    };
    wanted.min(mul(lifetime, 0.9))
}

/// Inputs of [`next_refresh`], all from the token file and the account's own history.
#[derive(Debug, Clone, Copy)]
pub struct TokenTimes {
    /// The access token's expiry; `None` when unknown (a file in the seed's format): refresh at once.
    pub expires_at: Option<Timestamp>,
    /// The access token's lifetime as issued (`expires_in`).
    pub lifetime: Duration,
    /// When this daemon last refreshed the account successfully.
    pub last_refresh: Option<Timestamp>,
}

/// When to refresh next. A result at or before `now` means "now". `jitter` is uniform in [0, 1) and
/// only ever moves the refresh earlier, by at most a tenth of the margin.
pub fn next_refresh(t: TokenTimes, policy: RefreshBefore, jitter: f64, now: Timestamp) -> Timestamp {
    let Some(expires_at) = t.expires_at else {
        return now;
    };
    let margin = margin(policy, t.lifetime);
    let jitter = mul((margin / 10).min(MAX_JITTER), jitter.clamp(0.0, 1.0));
    let due = sub(expires_at, margin + jitter);
    // The token's own issue time counts as a refresh: one that someone else just fetched (a login,
    // another process) is not refreshed again straight away, which with expiries kept to the second
    // could not even move its expiry forward.
    let issued = sub(expires_at, t.lifetime);
    let last = t.last_refresh.map_or(issued, |l| l.max(issued));
    due.max(add(last, min_spacing(t.lifetime)))
}

/// The backoff ceiling for an account: a tenth of its access token's lifetime, kept within
/// [`MIN_BACKOFF`]..=[`MAX_BACKOFF`], so a test with 6 s tokens behaves like production with 6 h
/// tokens, sped up.
pub fn backoff_cap(lifetime: Option<Duration>) -> Duration {
    lifetime.map_or(MAX_BACKOFF, |l| (l / 10).clamp(MIN_BACKOFF, MAX_BACKOFF))
}

/// Exponential backoff after `failures` consecutive failures (1 = the first), doubling from
/// [`MIN_BACKOFF`] up to `cap`, with up to 25 % taken off at random so that many accounts that failed
/// together do not retry together.
pub fn backoff(failures: u32, cap: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    let exp = MIN_BACKOFF.saturating_mul(1u32 << doublings).min(cap);
    mul(exp, 1.0 - 0.25 * jitter.clamp(0.0, 1.0)).max(MIN_BACKOFF)
}

/// Why a request is being retried; decides the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// A transport error, a 5xx, a malformed body.
    Failure,
    /// Kakao's KOE237 or an HTTP 429: without a `Retry-After`, wait the full cap.
    RateLimited,
    /// The refresh worked but did not move the expiry forward: the provider is misbehaving, so back off
    /// up to [`MAX_BACKOFF`] whatever the lifetime says.
    NoProgress,
}

/// How long to wait before the next attempt.
pub fn retry_delay(
    reason: RetryReason,
    failures: u32,
    lifetime: Option<Duration>,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let cap = match reason {
        RetryReason::NoProgress => MAX_BACKOFF,
        _ => backoff_cap(lifetime),
    };
    let mut delay = backoff(failures, cap, jitter);
    if reason == RetryReason::RateLimited && retry_after.is_none() {
        delay = cap;
    }
    if let Some(ra) = retry_after {
        delay = delay.max(ra.min(MAX_RETRY_AFTER));
    }
    delay
}

/// How little may be left of a refresh token, with no successor sent, before its owner is warned:
/// 7 days of Kakao's 60, scaled to the token's lifetime, so that a provider with short refresh tokens
/// (or the demo's) is not warned about at every refresh. Kakao sends a successor with a month left.
pub fn refresh_token_warning(lifetime: Option<Duration>) -> Duration {
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    lifetime.map_or(WEEK, |l| WEEK.min(mul(l, 7.0 / 60.0)))
}

/// Compares how far the wall clock and the monotonic clock moved over the same stretch. A difference
/// beyond `tolerance` means a suspend (the monotonic clock stops) or a clock step.
pub fn clock_jump(wall_elapsed: SignedDuration, mono_elapsed: Duration, tolerance: Duration) -> Option<SignedDuration> {
    let mono = SignedDuration::try_from(mono_elapsed).unwrap_or(SignedDuration::MAX);
    let drift = wall_elapsed.checked_sub(mono).unwrap_or(SignedDuration::MAX);
    (drift.unsigned_abs() > tolerance).then_some(drift)
}

/// Where a scheduled refresh stands after the wall clock moved `drift` more than the monotonic clock.
/// `due` is its wall-clock time and `remaining` what its monotonic timer has left; returns both anew.
///
/// Forward (a suspend, in which the monotonic clock stops, or a step forward): the wall clock may be
/// right that it is due already, so the sooner of the two wins; at worst a refresh comes early. Backward:
/// the monotonic timer is right, and following the wall clock would leave the token to expire by as
/// much as the clock went back; the wall-clock time moves with the clock instead.
pub fn after_clock_jump(
    due: Timestamp,
    remaining: Duration,
    drift: SignedDuration,
    now: Timestamp,
) -> (Timestamp, Duration) {
    if drift.is_negative() {
        return (due.checked_add(drift).unwrap_or(due), remaining);
    }
    let by_wall = until(due, now);
    if by_wall < remaining {
        (due, by_wall)
    } else {
        (add(now, remaining), remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn six_hour_kakao_token_refreshes_with_a_third_left() {
        let now = ts("2026-01-01T00:00:00Z");
        let t = TokenTimes {
            expires_at: Some(ts("2026-01-01T06:00:00Z")),
            lifetime: secs(6 * H),
            last_refresh: Some(now),
        };
        let policy = RefreshBefore::Share(0.33);
        let earliest = next_refresh(t, policy, 0.999_999, now);
        let latest = next_refresh(t, policy, 0.0, now);
        // 33 % of 6 h is 1 h 58 m 48 s; jitter adds at most 5 minutes, and only earlier.
        assert_eq!(latest, ts("2026-01-01T04:01:12Z"));
        assert!(earliest < latest && latest.duration_since(earliest) <= SignedDuration::from_mins(5));
        assert!(earliest > ts("2026-01-01T03:56:00Z"));
    }

    #[test]
    fn a_token_someone_else_just_fetched_is_not_refreshed_within_the_spacing() {
        // A 4 s token from a login at 10:00:00 (expiries are kept to the second), refreshed with 75 %
        // left: due at 10:00:01 - jitter by the margin, but the issue time counts as the last refresh.
        let t = TokenTimes {
            expires_at: Some(ts("2026-01-01T10:00:04Z")),
            lifetime: secs(4),
            last_refresh: None,
        };
        let due = next_refresh(t, RefreshBefore::Share(0.75), 0.999, ts("2026-01-01T10:00:00.900Z"));
        assert_eq!(due, ts("2026-01-01T10:00:01Z"));
        // An older refresh of our own does not pull it earlier either.
        let t = TokenTimes {
            last_refresh: Some(ts("2026-01-01T09:59:00Z")),
            ..t
        };
        assert_eq!(
            next_refresh(t, RefreshBefore::Share(0.75), 0.999, ts("2026-01-01T10:00:00Z")),
            ts("2026-01-01T10:00:01Z")
        );
    }

    #[test]
    fn a_suspend_longer_than_the_token_makes_it_due_at_once() {
        // Refresh due at 04:00 with 2 h left on its timer at 02:00; the machine sleeps 8 h. On waking at
        // 10:00 the timer still says 2 h (the monotonic clock stopped), the wall clock says overdue.
        let (due, remaining) = after_clock_jump(
            ts("2026-01-01T04:00:00Z"),
            secs(2 * H),
            SignedDuration::from_hours(8),
            ts("2026-01-01T10:00:00Z"),
        );
        assert_eq!((due, remaining), (ts("2026-01-01T04:00:00Z"), Duration::ZERO));
        // A small step forward only brings it a little closer.
        let (_, remaining) = after_clock_jump(
            ts("2026-01-01T04:00:00Z"),
            secs(2 * H),
            SignedDuration::from_mins(10),
            ts("2026-01-01T02:10:00Z"),
        );
        assert_eq!(remaining, secs(2 * H - 600));
    }

    #[test]
    fn a_clock_set_back_keeps_the_timer_and_moves_the_wall_clock_time() {
        // Due at 04:00, 1 h left at 03:00, and the clock is set back 2 h: still due in 1 h, at 02:00.
        let (due, remaining) = after_clock_jump(
            ts("2026-01-01T04:00:00Z"),
            secs(H),
            SignedDuration::from_hours(-2),
            ts("2026-01-01T01:00:00Z"),
        );
        assert_eq!((due, remaining), (ts("2026-01-01T02:00:00Z"), secs(H)));
    }

    #[test]
    fn a_fixed_margin_works_and_is_kept_below_the_lifetime() {
        let now = ts("2026-01-01T00:00:00Z");
        let t = TokenTimes {
            expires_at: Some(ts("2026-01-01T06:00:00Z")),
            lifetime: secs(6 * H),
            last_refresh: None,
        };
        assert_eq!(
            next_refresh(t, RefreshBefore::Margin(secs(1800)), 0.0, now),
            ts("2026-01-01T05:30:00Z")
        );
        // A 30 minute margin on 10 minute tokens must not refresh straight after each refresh.
        let t = TokenTimes {
            expires_at: Some(ts("2026-01-01T00:10:00Z")),
            lifetime: secs(600),
            last_refresh: Some(now),
        };
        let due = next_refresh(t, RefreshBefore::Margin(secs(1800)), 0.0, now);
        assert!(due >= ts("2026-01-01T00:01:00Z"), "{due}");
    }

    #[test]
    fn unknown_or_past_expiry_means_now() {
        let now = ts("2026-01-01T00:00:00Z");
        let t = TokenTimes {
            expires_at: None,
            lifetime: secs(6 * H),
            last_refresh: None,
        };
        assert_eq!(next_refresh(t, RefreshBefore::default(), 0.5, now), now);
        let t = TokenTimes {
            expires_at: Some(ts("2025-12-31T00:00:00Z")),
            lifetime: secs(6 * H),
            last_refresh: None,
        };
        assert!(next_refresh(t, RefreshBefore::default(), 0.5, now) <= now);
    }

    #[test]
    fn very_short_or_expired_tokens_cannot_cause_a_busy_loop() {
        let now = ts("2026-01-01T00:00:00Z");
        for lifetime in [0, 1, 2, 6] {
            let t = TokenTimes {
                expires_at: Some(add(now, secs(lifetime))),
                lifetime: secs(lifetime),
                last_refresh: Some(now),
            };
            let due = next_refresh(t, RefreshBefore::Share(0.99), 0.9, now);
            let gap = until(due, now);
            assert!(gap >= MIN_BACKOFF, "lifetime {lifetime}: next refresh after {gap:?}");
            assert!(gap >= secs(lifetime) / 10);
        }
    }

    #[test]
    fn refreshes_stay_within_kakaos_per_user_quota() {
        // Kakao allows 20 access tokens per 10 minutes per user; a 6 h token must never get near it.
        let mut now = ts("2026-01-01T00:00:00Z");
        let mut count_in_first_10_min = 0;
        let start = now;
        for i in 0..100 {
            let t = TokenTimes {
                expires_at: Some(add(now, secs(6 * H))),
                lifetime: secs(6 * H),
                last_refresh: Some(now),
            };
            now = next_refresh(t, RefreshBefore::Share(0.33), (i as f64) / 100.0, now);
            if now.duration_since(start) < SignedDuration::from_mins(10) {
                count_in_first_10_min += 1;
            }
        }
        assert_eq!(count_in_first_10_min, 0);
    }

    #[test]
    fn backoff_at_production_scale_grows_from_one_second_to_five_minutes() {
        let cap = backoff_cap(Some(secs(6 * H)));
        assert_eq!(cap, MAX_BACKOFF);
        let waits: Vec<u64> = (1..=12).map(|n| backoff(n, cap, 0.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        for n in 1..=40 {
            for j in [0.0, 0.5, 0.999] {
                let d = backoff(n, cap, j);
                assert!((MIN_BACKOFF..=MAX_BACKOFF).contains(&d), "{n} {j} {d:?}");
            }
        }
    }

    #[test]
    fn an_outage_as_long_as_a_kakao_token_costs_about_a_hundred_requests() {
        // Six hours of failures at production scale, with the jitter at both ends: the ramp from 1 s,
        // then one request every 225 to 300 s.
        for (jitter, expected) in [(0.0, 80), (0.999, 104)] {
            let (mut elapsed, mut requests) = (Duration::ZERO, 0u32);
            while elapsed < secs(6 * H) {
                requests += 1;
                elapsed += retry_delay(RetryReason::Failure, requests, Some(secs(6 * H)), None, jitter);
            }
            assert_eq!(requests, expected, "jitter {jitter}");
        }
    }

    #[test]
    fn backoff_for_test_sized_tokens_is_production_sped_up() {
        // 6 s tokens: a tenth is 0.6 s, kept at the 1 s floor.
        assert_eq!(backoff_cap(Some(secs(6))), MIN_BACKOFF);
        assert_eq!(backoff_cap(Some(secs(60))), secs(6));
        assert_eq!(backoff(10, backoff_cap(Some(secs(60))), 0.0), secs(6));
        assert_eq!(backoff_cap(None), MAX_BACKOFF);
    }

    #[test]
    fn retry_after_and_rate_limits() {
        let six_h = Some(secs(6 * H));
        assert_eq!(
            retry_delay(RetryReason::Failure, 1, six_h, Some(secs(30)), 0.0),
            secs(30)
        );
        assert_eq!(retry_delay(RetryReason::RateLimited, 1, six_h, None, 0.0), MAX_BACKOFF);
        assert_eq!(
            retry_delay(RetryReason::RateLimited, 1, six_h, Some(secs(7)), 0.0),
            secs(7)
        );
        assert_eq!(
            retry_delay(RetryReason::Failure, 1, six_h, Some(secs(99 * H)), 0.0),
            MAX_RETRY_AFTER
        );
        // A provider that hands out tokens that do not move the expiry forward gets the full backoff.
        assert_eq!(
            retry_delay(RetryReason::NoProgress, 20, Some(secs(1)), None, 0.0),
            MAX_BACKOFF
        );
    }

    #[test]
    fn refresh_token_warnings_scale_with_the_lifetime() {
        // Kakao's 60-day refresh tokens: a week, well after the month-left rotation should have come.
        assert_eq!(refresh_token_warning(Some(secs(60 * 24 * H))), secs(7 * 24 * H));
        assert_eq!(refresh_token_warning(Some(secs(5183999))).as_secs(), 7 * 24 * H - 1);
        // The demo's 20 s refresh tokens rotate with 10 s left: no warning before that.
        assert!(refresh_token_warning(Some(secs(20))) < secs(10));
        assert_eq!(refresh_token_warning(None), secs(7 * 24 * H));
    }

    #[test]
    fn clock_jumps_are_noticed_both_ways() {
        let tol = secs(5);
        assert_eq!(clock_jump(SignedDuration::from_secs(60), secs(60), tol), None);
        assert_eq!(clock_jump(SignedDuration::from_secs(62), secs(60), tol), None);
        // A suspend: the wall clock moved 8 hours, the monotonic clock one minute.
        assert_eq!(
            clock_jump(SignedDuration::from_hours(8), secs(60), tol),
            Some(SignedDuration::from_hours(8) - SignedDuration::from_secs(60))
        );
        // A step back.
        assert!(
            clock_jump(SignedDuration::from_secs(-3600), secs(60), tol)
                .unwrap()
                .is_negative()
        );
    }

    #[test]
    fn by_the_wall_clock_alone_a_jump_back_would_delay_the_refresh_and_the_timer_does_not() {
        let t = TokenTimes {
            expires_at: Some(ts("2026-01-01T06:00:00Z")),
            lifetime: secs(6 * H),
            last_refresh: None,
        };
        let due = next_refresh(t, RefreshBefore::Share(0.33), 0.0, ts("2026-01-01T00:00:00Z"));
        // After a 5 hour suspend the refresh is overdue by either reckoning.
        assert_eq!(until(due, ts("2026-01-01T05:00:00Z")), Duration::ZERO);
        // Stepped back an hour, the wall clock alone would put it an hour further off...
        let left = until(due, ts("2026-01-01T00:00:00Z"));
        assert_eq!(until(due, ts("2025-12-31T23:00:00Z")), left + secs(H));
        // ...but the timer keeps what it had left.
        let (_, remaining) = after_clock_jump(due, left, SignedDuration::from_hours(-1), ts("2025-12-31T23:00:00Z"));
        assert_eq!(remaining, left);
    }
}
