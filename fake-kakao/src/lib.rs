//! A stateful fake of Kakao's token and API endpoints on loopback, for the demo, the tests and the
//! benchmarks. It follows `kakao-api.md`: single-use authorization codes, refresh responses that carry
//! a new refresh token only in the old one's last stretch (the old one then dies at once), Kakao's error
//! bodies and codes, and optional per-user quotas scaled to its lifetimes. Faults can be injected.
//!
//! Lifetimes are in seconds, so a demo can run Kakao's two-month cycle in a minute.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Extension, Router};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, watch};

mod admin;

/// One registered app.
#[derive(Debug, Clone)]
pub struct FakeClient {
    pub client_id: String,
    /// `Some`: Client Secret is ON and must be sent.
    pub client_secret: Option<String>,
    pub redirect_uris: Vec<String>,
    /// Consent items the app's users have agreed to (granted on every login).
    pub scopes: Vec<String>,
}

impl FakeClient {
    pub fn new(client_id: &str) -> FakeClient {
        FakeClient {
            client_id: client_id.into(),
            client_secret: None,
            redirect_uris: vec!["https://localhost.com".into()],
            scopes: vec!["talk_message".into()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct FakeSettings {
    /// Access token lifetime (Kakao REST: 21599 s).
    pub access_ttl: u64,
    /// Refresh token lifetime (Kakao: about 60 days).
    pub refresh_ttl: u64,
    /// A refresh with less than this left on the refresh token rotates it (Kakao: one month of two).
    pub rotate_within: u64,
    /// Behave like a generic RFC 6749 provider: "Bearer", a new refresh token on every refresh, and no
    /// refresh_token_expires_in.
    pub standard_oauth2: bool,
    /// Enforce Kakao's per-user token quotas, scaled to `access_ttl` (20 access tokens per 10 min and 30
    /// refresh tokens per hour, for 6 h tokens).
    pub quotas: bool,
    /// Also answer with absolute expiry times as Strava does (`expires_at`, seconds since the epoch),
    /// names that clash with the token file's own.
    pub absolute_expiry: bool,
    /// Refuse PKCE at the authorize step, as a provider without it might (`error=invalid_request`).
    pub refuse_pkce: bool,
    /// Close every connection after its answer, as a provider does long before the next refresh six
    /// hours later: each request then opens a new connection (and, over TLS, a new handshake).
    pub close_connections: bool,
    pub clients: Vec<FakeClient>,
}

impl Default for FakeSettings {
    fn default() -> Self {
        FakeSettings {
            access_ttl: 21599,
            refresh_ttl: 5183999,
            rotate_within: 5183999 / 2,
            standard_oauth2: false,
            quotas: false,
            absolute_expiry: false,
            refuse_pkce: false,
            close_connections: false,
            clients: vec![FakeClient::new("demo-rest-api-key")],
        }
    }
}

impl FakeSettings {
    /// Kakao's cycle, shrunk: `access_ttl` seconds for access tokens, refresh tokens that live
    /// `refresh_ttl` seconds and rotate in their second half.
    pub fn fast(access_ttl: u64, refresh_ttl: u64) -> FakeSettings {
        FakeSettings {
            access_ttl,
            refresh_ttl,
            rotate_within: refresh_ttl / 2,
            ..FakeSettings::default()
        }
    }
}

/// A fault the token endpoint answers with instead of doing its job.
#[derive(Debug, Clone)]
pub enum Fault {
    /// HTTP `status` with an HTML body.
    ServerError(u16),
    /// Kakao's KOE237 rate limit (HTTP 400), with an optional Retry-After.
    RateLimited { retry_after: Option<u64> },
    /// HTTP 429 with an optional Retry-After and no OAuth body.
    TooManyRequests { retry_after: Option<u64> },
    /// HTTP 200 with a body that is not JSON.
    NotJson,
    /// Sleep this long, then answer 504.
    Hang(Duration),
    /// Sleep this long, then do the job as usual (a slow but working provider).
    Delay(Duration),
    /// Process the request at once (a refresh's rotation is committed as it arrives), then hold the
    /// answer this long: the provider side of a client paused or cut off mid-request.
    HoldAnswer(Duration),
    /// Reset the connection (TCP RST, on the plain-TCP fake) without answering.
    Reset,
    /// Answer 200 and then send the body one byte per interval, never finishing.
    Trickle(Duration),
    /// Answer with this status and body (as application/json), whatever it holds: malformed tokens.
    Answer(u16, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEventKind {
    /// Tokens were issued; `rotated` when a new refresh token replaced (and killed) the one used.
    Issued {
        grant: &'static str,
        rotated: bool,
    },
    Refused {
        code: String,
    },
    Faulted,
    MessageSent {
        text: String,
    },
}

#[derive(Debug, Clone)]
pub struct FakeEvent {
    pub at: SystemTime,
    pub user: Option<u64>,
    pub kind: FakeEventKind,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeStats {
    pub token_requests: u64,
    /// Refresh requests that presented a refresh token already presented before.
    pub reused: u64,
    /// Refresh requests refused with KOE322 (a dead or unknown refresh token).
    pub koe322: u64,
    pub logins: u64,
    pub refreshes: u64,
    pub rotations: u64,
    pub refused: u64,
    pub faults: u64,
    pub messages: u64,
    /// The most token requests ever in progress at once (a client's concurrency bound, seen from here).
    pub max_in_flight: u64,
}

#[derive(Debug)]
struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    /// The PKCE S256 challenge sent with the authorize request: the exchange must bring its verifier.
    code_challenge: Option<String>,
    user: u64,
    scope: Vec<String>,
    expires_at: SystemTime,
}

#[derive(Debug)]
struct RefreshGrant {
    client_id: String,
    user: u64,
    scope: Vec<String>,
    expires_at: SystemTime,
    alive: bool,
}

#[derive(Debug)]
struct AccessGrant {
    user: u64,
    scope: Vec<String>,
    expires_at: SystemTime,
}

#[derive(Debug, Default)]
struct FakeState {
    next_user: u64,
    codes: HashMap<String, CodeGrant>,
    refresh: HashMap<String, RefreshGrant>,
    access: HashMap<String, AccessGrant>,
    once: VecDeque<Fault>,
    always: Option<Fault>,
    deny_next_authorize: bool,
    quota_access: HashMap<u64, VecDeque<SystemTime>>,
    quota_refresh: HashMap<u64, VecDeque<SystemTime>>,
    stats: FakeStats,
    /// Token requests in progress now.
    in_flight: u64,
    /// How many times each refresh token was presented.
    uses: HashMap<String, u64>,
    log: Vec<FakeEvent>,
    messages: Vec<(u64, Value)>,
}

#[derive(Debug)]
struct Inner {
    settings: FakeSettings,
    state: Mutex<FakeState>,
    events: broadcast::Sender<FakeEvent>,
    /// Bumped at each token request's arrival and at each event, for waiters (`/admin/wait`).
    changes: watch::Sender<u64>,
    /// How far the fake's clock runs ahead of the real one: tests age tokens with
    /// [`FakeKakao::advance`] instead of sleeping.
    ahead: Mutex<Duration>,
}

impl Inner {
    /// The fake's clock: every expiry and quota is reckoned from it.
    fn now(&self) -> SystemTime {
        SystemTime::now() + *self.ahead.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // A panicking handler must not wedge the fake for the rest of a test.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, st: &mut FakeState, user: Option<u64>, kind: FakeEventKind) {
        let ev = FakeEvent {
            at: self.now(),
            user,
            kind,
        };
        st.log.push(ev.clone());
        let _ = self.events.send(ev);
        self.changes.send_modify(|n| *n += 1);
    }

    fn client(&self, id: &str) -> Option<&FakeClient> {
        self.settings.clients.iter().find(|c| c.client_id == id)
    }
}

/// The running fake; stops when dropped.
#[derive(Debug)]
pub struct FakeKakao {
    addr: SocketAddr,
    scheme: &'static str,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKakao {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn random_token(prefix: &str) -> String {
    let body: String = std::iter::repeat_with(fastrand::alphanumeric).take(40).collect();
    format!("{prefix}{body}")
}

/// Asks hyper to close the connection once this answer is sent.
async fn close_connection(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn kauth_error(status: StatusCode, error: &str, description: &str, code: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description, "error_code": code})),
    )
        .into_response()
}

fn kapi_error(status: StatusCode, code: i64, msg: &str) -> Response {
    (status, axum::Json(json!({"msg": msg, "code": code}))).into_response()
}

impl FakeKakao {
    /// Starts the fake on 127.0.0.1 with an OS-chosen port.
    pub async fn start(settings: FakeSettings) -> std::io::Result<FakeKakao> {
        Self::start_at(settings, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts the fake on `addr` (port 0: an OS-chosen one), e.g. `0.0.0.0:8080` in a container.
    pub async fn start_at(settings: FakeSettings, addr: SocketAddr) -> std::io::Result<FakeKakao> {
        let listener = ResettableListener(tokio::net::TcpListener::bind(addr).await?);
        let addr = axum::serve::Listener::local_addr(&listener)?;
        let (inner, app) = Self::app(settings);
        // Each connection's reset switch reaches the handlers, so that a Reset fault sends a real RST.
        let app = app.into_make_service_with_connect_info::<Peer>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeKakao {
            addr,
            scheme: "http",
            inner,
            server,
        })
    }

    /// Starts the fake on a listener of the caller's (a TLS one, say); `scheme` is what [`Self::url`]
    /// says.
    pub async fn start_on<L>(settings: FakeSettings, listener: L, scheme: &'static str) -> std::io::Result<FakeKakao>
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr()?;
        let (inner, app) = Self::app(settings);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeKakao {
            addr,
            scheme,
            inner,
            server,
        })
    }

    fn app(settings: FakeSettings) -> (Arc<Inner>, Router) {
        let close_connections = settings.close_connections;
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            settings,
            state: Mutex::new(FakeState {
                next_user: 1000,
                ..FakeState::default()
            }),
            events,
            changes: watch::Sender::new(0),
            ahead: Mutex::new(Duration::ZERO),
        });
        let app = Router::new()
            .route("/oauth/authorize", get(authorize))
            .route("/oauth/token", post(token))
            .route("/v1/user/access_token_info", get(token_info))
            .route("/v2/api/talk/memo/default/send", post(memo_send))
            .merge(admin::routes())
            .with_state(inner.clone());
        let app = if close_connections {
            app.layer(axum::middleware::map_response(close_connection))
        } else {
            app
        };
        (inner, app)
    }

    /// `http://127.0.0.1:PORT` (or https), the value for both `auth_url` and `api_url`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn settings(&self) -> &FakeSettings {
        &self.inner.settings
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FakeEvent> {
        self.inner.events.subscribe()
    }

    pub fn stats(&self) -> FakeStats {
        self.inner.lock().stats.clone()
    }

    pub fn events(&self) -> Vec<FakeEvent> {
        self.inner.lock().log.clone()
    }

    /// Messages sent to "me", as (user, template_object).
    pub fn messages(&self) -> Vec<(u64, Value)> {
        self.inner.lock().messages.clone()
    }

    /// Answers every token request with `fault` until cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.inner.lock().always = fault;
    }

    /// Answers the next token request with `fault`.
    pub fn push_fault(&self, fault: Fault) {
        self.inner.lock().once.push_back(fault);
    }

    /// The next authorize request is answered as if the user pressed Cancel.
    pub fn deny_next_authorize(&self) {
        self.inner.lock().deny_next_authorize = true;
    }

    /// A user logged in: the token response Kakao would send for a fresh login, as JSON.
    pub fn login(&self, client_id: &str) -> Value {
        login(&self.inner, client_id)
    }

    /// Every user unlinked the app: every token dies at once.
    pub fn revoke_all(&self) -> usize {
        revoke_all(&self.inner)
    }

    /// The user unlinked the app in KakaoTalk: every token of theirs dies at once.
    pub fn unlink_user_of(&self, refresh_token: &str) -> bool {
        let mut st = self.inner.lock();
        let Some(user) = st.refresh.get(refresh_token).map(|g| g.user) else {
            return false;
        };
        for g in st.refresh.values_mut().filter(|g| g.user == user) {
            g.alive = false;
        }
        st.access.retain(|_, g| g.user != user);
        true
    }

    /// Whether this refresh token would still be accepted.
    pub fn refresh_token_alive(&self, refresh_token: &str) -> bool {
        let st = self.inner.lock();
        st.refresh
            .get(refresh_token)
            .is_some_and(|g| g.alive && g.expires_at > self.inner.now())
    }

    /// Whether this access token would be accepted by the API.
    pub fn access_token_valid(&self, access_token: &str) -> bool {
        let st = self.inner.lock();
        st.access
            .get(access_token)
            .is_some_and(|g| g.expires_at > self.inner.now())
    }

    /// Moves the fake's clock forward: its tokens and codes age by `by` at once. The daemon's clock is
    /// not moved; a test ages the provider's view instead of sleeping.
    pub fn advance(&self, by: Duration) {
        *self
            .inner
            .ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += by;
    }
}

fn login(inner: &Inner, client_id: &str) -> Value {
    let mut st = inner.lock();
    st.next_user += 1;
    let user = st.next_user;
    let scope = inner.client(client_id).map(|c| c.scopes.clone()).unwrap_or_default();
    st.stats.logins += 1;
    let body = issue(inner, &mut st, client_id, user, &scope, true, false);
    inner.record(
        &mut st,
        Some(user),
        FakeEventKind::Issued {
            grant: "login",
            rotated: false,
        },
    );
    body
}

/// Kills every refresh and access token; returns how many refresh tokens were alive.
fn revoke_all(inner: &Inner) -> usize {
    let mut st = inner.lock();
    let mut alive = 0;
    for g in st.refresh.values_mut().filter(|g| g.alive) {
        g.alive = false;
        alive += 1;
    }
    st.access.clear();
    alive
}

/// Issues an access token, and a refresh token when `new_refresh`; returns Kakao's response body.
fn issue(
    inner: &Inner,
    st: &mut FakeState,
    client_id: &str,
    user: u64,
    scope: &[String],
    new_refresh: bool,
    rotated: bool,
) -> Value {
    let s = &inner.settings;
    let now = inner.now();
    let at = random_token("fake-at-");
    st.access.insert(
        at.clone(),
        AccessGrant {
            user,
            scope: scope.to_vec(),
            expires_at: now + Duration::from_secs(s.access_ttl),
        },
    );
    let mut body = json!({
        "token_type": if s.standard_oauth2 { "Bearer" } else { "bearer" },
        "access_token": at,
        "expires_in": s.access_ttl,
    });
    if s.absolute_expiry {
        body["expires_at"] = json!(epoch_secs(now + Duration::from_secs(s.access_ttl)));
    }
    if new_refresh {
        let rt = random_token("fake-rt-");
        st.refresh.insert(
            rt.clone(),
            RefreshGrant {
                client_id: client_id.into(),
                user,
                scope: scope.to_vec(),
                expires_at: now + Duration::from_secs(s.refresh_ttl),
                alive: true,
            },
        );
        body["refresh_token"] = json!(rt);
        if !s.standard_oauth2 {
            body["refresh_token_expires_in"] = json!(s.refresh_ttl);
        }
        if s.absolute_expiry {
            body["refresh_token_expires_at"] = json!(epoch_secs(now + Duration::from_secs(s.refresh_ttl)));
        }
        if rotated {
            st.stats.rotations += 1;
        }
    }
    if !scope.is_empty() {
        body["scope"] = json!(scope.join(" "));
    }
    body
}

/// RFC 7636's S256: `BASE64URL(SHA256(verifier))` without padding.
fn pkce_challenge(verifier: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn take_fault(inner: &Inner) -> Option<Fault> {
    let mut st = inner.lock();
    let f = st.once.pop_front().or_else(|| st.always.clone());
    if f.is_some() {
        st.stats.faults += 1;
        inner.record(&mut st, None, FakeEventKind::Faulted);
    }
    f
}

/// The plain-TCP fake's listener: its connections can be aborted with a RST by a Reset fault.
#[derive(Debug)]
struct ResettableListener(tokio::net::TcpListener);

impl axum::serve::Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, addr)) => {
                    let reset = Arc::default();
                    return (ResettableStream { stream, reset }, addr);
                }
                // Out of descriptors, say: wait rather than spin, as axum's own listener does.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A connection that, once its switch is thrown, refuses every write and shutdown with SO_LINGER 0
/// set, so that hyper drops it without a FIN and the kernel answers with a RST.
#[derive(Debug)]
struct ResettableStream {
    stream: tokio::net::TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    fn aborted(&self) -> Option<std::io::Error> {
        if !self.reset.load(Ordering::Relaxed) {
            return None;
        }
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        Some(std::io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.aborted() {
            Some(e) => Poll::Ready(Err(e)),
            None => Pin::new(&mut self.stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.aborted() {
            Some(e) => Poll::Ready(Err(e)),
            None => Pin::new(&mut self.stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.aborted() {
            Some(e) => Poll::Ready(Err(e)),
            None => Pin::new(&mut self.stream).poll_shutdown(cx),
        }
    }
}

/// The switch of the connection a request came on.
#[derive(Debug, Clone)]
struct Peer(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, ResettableListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        Peer(stream.io().reset.clone())
    }
}

/// A body that fails at once: hyper then drops the connection without a complete answer.
fn aborted_body() -> Body {
    Body::from_stream(futures_util::stream::once(async {
        Err::<Vec<u8>, std::io::Error>(std::io::Error::other("connection reset by the fake"))
    }))
}

async fn answer_fault(f: Fault, peer: Option<&Peer>) -> Option<Response> {
    let with_retry = |mut r: Response, retry_after: Option<u64>| {
        if let Some(s) = retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    };
    Some(match f {
        Fault::ServerError(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (
                status,
                [(header::CONTENT_TYPE, "text/html")],
                "<html><body>Service Unavailable</body></html>",
            )
                .into_response()
        }
        Fault::RateLimited { retry_after } => with_retry(
            kauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "token request rate limit exceeded",
                "KOE237",
            ),
            retry_after,
        ),
        Fault::TooManyRequests { retry_after } => with_retry(
            (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
            retry_after,
        ),
        Fault::NotJson => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html>maintenance</html>",
        )
            .into_response(),
        Fault::Hang(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::GATEWAY_TIMEOUT, "late").into_response()
        }
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            return None;
        }
        // Handled by the token endpoint around its answer.
        Fault::HoldAnswer(_) => return None,
        Fault::Reset => {
            // The connection refuses this answer's first write and is dropped with a RST. A fake
            // without the switch (the TLS one) drops it when the body fails instead.
            match peer {
                Some(p) => {
                    p.0.store(true, Ordering::Relaxed);
                    (StatusCode::OK, "never sent").into_response()
                }
                None => Response::new(aborted_body()),
            }
        }
        Fault::Answer(status, body) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Fault::Trickle(every) => {
            let bytes = futures_util::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((Ok::<_, std::io::Error>(vec![b' ']), ()))
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(bytes),
            )
                .into_response()
        }
    })
}

fn client_error(inner: &Inner, params: &HashMap<String, String>) -> Option<Response> {
    let client_id = params.get("client_id").map(String::as_str).unwrap_or_default();
    let Some(client) = inner.client(client_id) else {
        return Some(kauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "invalid client_id",
            "KOE101",
        ));
    };
    if let Some(secret) = &client.client_secret
        && params.get("client_secret") != Some(secret)
    {
        return Some(kauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Bad client credentials",
            "KOE010",
        ));
    }
    None
}

/// Kakao's per-user token quotas, scaled: 20 access tokens per 10/360 of the access lifetime and
/// 30 refresh tokens per 1/6 of it.
fn over_quota(inner: &Inner, st: &mut FakeState, user: u64, refresh_too: bool) -> bool {
    if !inner.settings.quotas {
        return false;
    }
    let ttl = inner.settings.access_ttl as f64;
    let now = inner.now();
    let window = |secs: f64| now - Duration::from_secs_f64(secs.max(0.001));
    let trim = |q: &mut VecDeque<SystemTime>, since: SystemTime| {
        while q.front().is_some_and(|t| *t < since) {
            q.pop_front();
        }
    };
    let a_since = window(ttl * 600.0 / 21600.0);
    let r_since = window(ttl / 6.0);
    let access = st.quota_access.entry(user).or_default();
    trim(access, a_since);
    if access.len() >= 20 {
        return true;
    }
    access.push_back(now);
    if refresh_too {
        let refresh = st.quota_refresh.entry(user).or_default();
        trim(refresh, r_since);
        if refresh.len() >= 30 {
            return true;
        }
        refresh.push_back(now);
    }
    false
}

async fn token(
    State(inner): State<Arc<Inner>>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: HeaderMap,
    Form(params): Form<HashMap<String, String>>,
) -> Response {
    {
        let mut st = inner.lock();
        st.stats.token_requests += 1;
        st.in_flight += 1;
        st.stats.max_in_flight = st.stats.max_in_flight.max(st.in_flight);
    }
    // Counted out however the request ends, a client that hangs up included.
    let _in_flight = InFlight(inner.clone());
    inner.changes.send_modify(|n| *n += 1);
    let hold = match take_fault(&inner) {
        Some(Fault::HoldAnswer(d)) => Some(d),
        Some(f) => match answer_fault(f, peer.as_ref().map(|p| &p.0.0)).await {
            Some(r) => return r,
            None => None,
        },
        None => None,
    };
    let answer = token_answer(&inner, &headers, &params);
    if let Some(d) = hold {
        tokio::time::sleep(d).await;
    }
    answer
}

struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().in_flight -= 1;
    }
}

/// The token endpoint's answer, with its effects on the fake's state.
fn token_answer(inner: &Arc<Inner>, headers: &HeaderMap, params: &HashMap<String, String>) -> Response {
    let form_ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let mut st = inner.lock();
    let refused = |st: &mut FakeState, user: Option<u64>, code: &str, r: Response| {
        st.stats.refused += 1;
        inner.record(st, user, FakeEventKind::Refused { code: code.into() });
        r
    };
    if !form_ok {
        return refused(
            &mut st,
            None,
            "KOE001",
            kauth_error(StatusCode::BAD_REQUEST, "invalid_request", "bad content type", "KOE001"),
        );
    }
    if let Some(r) = client_error(inner, params) {
        let code = if r.status() == StatusCode::UNAUTHORIZED && params.contains_key("client_secret") {
            "KOE010"
        } else {
            "KOE101"
        };
        return refused(&mut st, None, code, r);
    }
    let client_id = params["client_id"].clone();
    match params.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let code = params.get("code").cloned().unwrap_or_default();
            let grant = st.codes.remove(&code);
            let Some(grant) = grant.filter(|g| g.client_id == client_id && g.expires_at > inner.now()) else {
                // Kakao quotes the code back, so the client must scrub it before showing the error.
                let r = kauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    &format!("authorization code not found for code={code}"),
                    "KOE320",
                );
                return refused(&mut st, None, "KOE320", r);
            };
            if let Some(challenge) = &grant.code_challenge {
                let verified = params
                    .get("code_verifier")
                    .is_some_and(|v| pkce_challenge(v) == *challenge);
                if !verified {
                    let r = kauth_error(
                        StatusCode::BAD_REQUEST,
                        "invalid_grant",
                        "code_verifier does not match the code_challenge",
                        "KOE320",
                    );
                    return refused(&mut st, Some(grant.user), "KOE320", r);
                }
            }
            if params.get("redirect_uri") != Some(&grant.redirect_uri) {
                let r = kauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "redirect_uri mismatch",
                    "KOE303",
                );
                return refused(&mut st, Some(grant.user), "KOE303", r);
            }
            st.stats.logins += 1;
            let body = issue(inner, &mut st, &client_id, grant.user, &grant.scope, true, false);
            inner.record(
                &mut st,
                Some(grant.user),
                FakeEventKind::Issued {
                    grant: "authorization_code",
                    rotated: false,
                },
            );
            axum::Json(body).into_response()
        }
        Some("refresh_token") => {
            let Some(rt) = params.get("refresh_token").filter(|s| !s.is_empty()).cloned() else {
                let r = kauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is required",
                    "KOE319",
                );
                return refused(&mut st, None, "KOE319", r);
            };
            let uses = st.uses.entry(rt.clone()).or_default();
            *uses += 1;
            if *uses > 1 {
                st.stats.reused += 1;
            }
            let now = inner.now();
            let grant = st
                .refresh
                .get(&rt)
                .filter(|g| g.alive && g.client_id == client_id && g.expires_at > now)
                .map(|g| (g.user, g.scope.clone(), g.expires_at));
            let Some((user, scope, rt_expires_at)) = grant else {
                let user = st.refresh.get(&rt).map(|g| g.user);
                let r = kauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "expired_or_invalid_refresh_token",
                    "KOE322",
                );
                st.stats.koe322 += 1;
                return refused(&mut st, user, "KOE322", r);
            };
            let left = rt_expires_at.duration_since(now).unwrap_or_default();
            let rotate = inner.settings.standard_oauth2 || left < Duration::from_secs(inner.settings.rotate_within);
            if over_quota(inner, &mut st, user, rotate) {
                let r = kauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "token request rate limit exceeded",
                    "KOE237",
                );
                return refused(&mut st, Some(user), "KOE237", r);
            }
            if rotate {
                // The old refresh token dies the moment the new one is issued.
                if let Some(g) = st.refresh.get_mut(&rt) {
                    g.alive = false;
                }
            }
            st.stats.refreshes += 1;
            let mut body = issue(inner, &mut st, &client_id, user, &scope, rotate, rotate);
            // Kakao's refresh response carries no scope.
            if let Some(obj) = body.as_object_mut() {
                obj.remove("scope");
            }
            inner.record(
                &mut st,
                Some(user),
                FakeEventKind::Issued {
                    grant: "refresh_token",
                    rotated: rotate,
                },
            );
            axum::Json(body).into_response()
        }
        _ => {
            let r = kauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type must be authorization_code or refresh_token",
                "KOE001",
            );
            refused(&mut st, None, "KOE001", r)
        }
    }
}

async fn authorize(State(inner): State<Arc<Inner>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let client_id = q.get("client_id").cloned().unwrap_or_default();
    let Some(client) = inner.client(&client_id).cloned() else {
        return (StatusCode::BAD_REQUEST, "KOE101: invalid client_id").into_response();
    };
    let redirect_uri = q.get("redirect_uri").cloned().unwrap_or_default();
    if !client.redirect_uris.contains(&redirect_uri) {
        return (StatusCode::BAD_REQUEST, "KOE006: redirect_uri is not registered").into_response();
    }
    if q.get("response_type").map(String::as_str) != Some("code") {
        return (StatusCode::BAD_REQUEST, "KOE201: response_type must be code").into_response();
    }
    let mut target = match url::Url::parse(&redirect_uri) {
        Ok(u) => u,
        Err(_) => return (StatusCode::BAD_REQUEST, "KOE006: bad redirect_uri").into_response(),
    };
    let challenge = q.get("code_challenge").cloned();
    let method = q.get("code_challenge_method").map(String::as_str);
    let pkce_problem = match (&challenge, method) {
        (Some(_), _) if inner.settings.refuse_pkce => Some("code_challenge is not supported"),
        (Some(_), Some("S256")) | (None, None) => None,
        (Some(_), _) => Some("code_challenge_method must be S256"),
        (None, Some(_)) => Some("code_challenge_method without code_challenge"),
    };
    let mut st = inner.lock();
    {
        let mut pairs = target.query_pairs_mut();
        if let Some(problem) = pkce_problem {
            pairs
                .append_pair("error", "invalid_request")
                .append_pair("error_description", problem);
        } else if std::mem::take(&mut st.deny_next_authorize) {
            pairs
                .append_pair("error", "access_denied")
                .append_pair("error_description", "User denied access");
        } else {
            st.next_user += 1;
            let user = st.next_user;
            let mut scope = client.scopes;
            for s in q
                .get("scope")
                .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()))
                .into_iter()
                .flatten()
            {
                if !scope.iter().any(|x| x == s) {
                    scope.push(s.to_string());
                }
            }
            let code = random_token("fake-code-");
            st.codes.insert(
                code.clone(),
                CodeGrant {
                    client_id,
                    redirect_uri,
                    code_challenge: challenge,
                    user,
                    scope,
                    expires_at: inner.now() + Duration::from_secs(600),
                },
            );
            pairs.append_pair("code", &code);
        }
        if let Some(state) = q.get("state") {
            pairs.append_pair("state", state);
        }
    }
    (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
}

fn bearer<'a>(st: &'a FakeState, headers: &HeaderMap, now: SystemTime) -> Option<(&'a String, &'a AccessGrant)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?;
    st.access.get_key_value(token).filter(|(_, g)| g.expires_at > now)
}

async fn token_info(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let st = inner.lock();
    match bearer(&st, &headers, inner.now()) {
        Some((_, g)) => {
            let left = g.expires_at.duration_since(inner.now()).unwrap_or_default().as_secs();
            axum::Json(json!({"id": g.user, "expires_in": left, "app_id": 1})).into_response()
        }
        None => kapi_error(StatusCode::UNAUTHORIZED, -401, "this access token does not exist"),
    }
}

async fn memo_send(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Form(params): Form<HashMap<String, String>>,
) -> Response {
    let mut st = inner.lock();
    let Some((_, g)) = bearer(&st, &headers, inner.now()) else {
        return kapi_error(StatusCode::UNAUTHORIZED, -401, "this access token does not exist");
    };
    let (user, scope) = (g.user, g.scope.clone());
    if !scope.iter().any(|s| s == "talk_message") {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(
                json!({"msg": "insufficient scopes.", "code": -402, "api_type": "TALK_MEMO_DEFAULT_SEND",
                "required_scopes": ["talk_message"], "allowed_scopes": scope}),
            ),
        )
            .into_response();
    }
    let Some(template) = params
        .get("template_object")
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
    else {
        return kapi_error(StatusCode::BAD_REQUEST, -2, "template_object is required");
    };
    let text = template
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if template.get("object_type").and_then(Value::as_str) != Some("text")
        || text.is_empty()
        || text.chars().count() > 200
    {
        return kapi_error(StatusCode::BAD_REQUEST, -2, "invalid text template");
    }
    if !template.get("link").is_some_and(Value::is_object) {
        return kapi_error(StatusCode::BAD_REQUEST, -2, "link is required");
    }
    st.stats.messages += 1;
    st.messages.push((user, template));
    inner.record(&mut st, Some(user), FakeEventKind::MessageSent { text });
    axum::Json(json!({"result_code": 0})).into_response()
}
