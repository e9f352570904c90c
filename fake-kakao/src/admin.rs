//! The admin interface, for tests that run the fake in its own process or container and drive it from
//! outside: revoke tokens, complete a login, slow the token endpoint, read the counters, and wait for a
//! token request to arrive (an event to await, instead of a sleep).
//!
//! It lives under `/admin/` beside the provider's own endpoints. The fake is a test double: anyone who
//! reaches it may drive it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::{Fault, Inner, authorize};

pub(crate) fn routes() -> Router<Arc<Inner>> {
    Router::new()
        .route("/admin/login", post(login))
        .route("/admin/authorize", get(complete_authorize))
        .route("/admin/revoke", post(revoke))
        .route("/admin/delay", post(delay))
        .route("/admin/stats", get(stats))
        .route("/admin/wait", get(wait))
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

/// A whole-number parameter; the error is the message for a 400.
fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, String> {
    q.get(key)
        .map(|v| v.parse::<u64>().map_err(|_| format!("{key} must be a whole number")))
        .transpose()
}

/// `POST /admin/login?client_id=ID`: a user logs in; the answer is the token response of that login,
/// to be written as a token file.
async fn login(State(inner): State<Arc<Inner>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(client_id) = q.get("client_id") else {
        return bad_request("client_id is required");
    };
    if inner.client(client_id).is_none() {
        return bad_request("no such client_id");
    }
    axum::Json(crate::login(&inner, client_id)).into_response()
}

/// `GET /admin/authorize?<the authorize address's query>`: the user logs in and agrees; the answer is
/// the address the browser would be sent to (`redirect_uri?code=…&state=…`), as text, for pasting.
async fn complete_authorize(state: State<Arc<Inner>>, query: Query<HashMap<String, String>>) -> Response {
    let answer = authorize(state, query).await;
    match answer.headers().get(header::LOCATION).and_then(|l| l.to_str().ok()) {
        Some(location) => format!("{location}\n").into_response(),
        None => answer,
    }
}

/// `POST /admin/revoke`: every user unlinks the app; every token dies.
async fn revoke(State(inner): State<Arc<Inner>>) -> Response {
    let revoked = crate::revoke_all(&inner);
    axum::Json(json!({ "revoked_refresh_tokens": revoked })).into_response()
}

/// `POST /admin/delay?ms=N[&commit=first]`: every token request waits N ms before it is answered (0
/// clears it). With `commit=first` the request is carried out at once (a rotation is committed as it
/// arrives) and only its answer waits.
async fn delay(State(inner): State<Arc<Inner>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let ms = match number(&q, "ms") {
        Ok(Some(ms)) => ms,
        Ok(None) => return bad_request("ms is required"),
        Err(m) => return bad_request(&m),
    };
    let first = q.get("commit").is_some_and(|c| c == "first");
    let d = Duration::from_millis(ms);
    inner.lock().always = (ms > 0).then_some(if first { Fault::HoldAnswer(d) } else { Fault::Delay(d) });
    axum::Json(json!({ "delay_ms": ms })).into_response()
}

fn stats_json(inner: &Inner) -> serde_json::Value {
    let st = inner.lock();
    let s = &st.stats;
    json!({
        "token_requests": s.token_requests,
        "reused": s.reused,
        "koe322": s.koe322,
        "logins": s.logins,
        "refreshes": s.refreshes,
        "rotations": s.rotations,
        "refused": s.refused,
        "faults": s.faults,
        "messages": s.messages,
    })
}

/// `GET /admin/stats`: the counters.
async fn stats(State(inner): State<Arc<Inner>>) -> Response {
    axum::Json(stats_json(&inner)).into_response()
}

/// `GET /admin/wait?COUNTER=N[&timeout_ms=T]`: answers with the counters once COUNTER (any of
/// `/admin/stats`'s, e.g. `token_requests`, which counts a request when it arrives, or `rotations`)
/// reaches N; 504 after T ms (default 60 s).
async fn wait(State(inner): State<Arc<Inner>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let timeout = match number(&q, "timeout_ms") {
        Ok(t) => Duration::from_millis(t.unwrap_or(60_000)),
        Err(m) => return bad_request(&m),
    };
    let Some((counter, want)) = q.iter().find(|(k, _)| *k != "timeout_ms") else {
        return bad_request("name a counter: /admin/wait?rotations=2");
    };
    let Ok(want) = want.parse::<u64>() else {
        return bad_request(&format!("{counter} must be a whole number"));
    };
    if stats_json(&inner).get(counter.as_str()).is_none() {
        return bad_request(&format!("no counter {counter:?}"));
    }
    // Subscribed before the first look, so that no change between the look and the wait is missed.
    let mut changes = inner.changes.subscribe();
    let reached = async {
        loop {
            let stats = stats_json(&inner);
            if stats[counter.as_str()].as_u64().unwrap_or(0) >= want {
                return stats;
            }
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    match tokio::time::timeout(timeout, reached).await {
        Ok(stats) => axum::Json(stats).into_response(),
        Err(_) => (StatusCode::GATEWAY_TIMEOUT, axum::Json(stats_json(&inner))).into_response(),
    }
}
