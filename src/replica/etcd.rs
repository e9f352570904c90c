//! The etcd connection: one gRPC channel, to the first member that answers a quorum read (over every
//! endpoint while none does), with TLS and a user when configured; and the few calls the replicas need,
//! each with a deadline, since a member without quorum answers nothing.

use std::time::Duration;

use etcdv3client::grpc::{CredentialInterceptor, GrpcService, TonicClient};
use etcdv3client::pb::{self, compare, request_op, response_op};
use http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::EtcdSettings;
use kakao_tokend_core::replica::prefix_end;

pub type Client = etcdv3client::Client<RequireLeader>;

/// Every call carries etcd's `hasleader` mark: a member without a leader (no quorum, or cut off from
/// the others) refuses at once instead of holding the call until its deadline, and cancels a watch or
/// keep-alive stream when it loses its leader.
#[derive(Debug, Clone)]
pub struct RequireLeader(CredentialInterceptor<TonicClient>);

fn mark<M>(mut req: tonic::Request<M>) -> tonic::Request<M> {
    req.metadata_mut()
        .insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
    req
}

impl GrpcService for RequireLeader {
    fn unary<M, T>(
        &mut self,
        req: tonic::Request<M>,
        path: PathAndQuery,
    ) -> impl Future<Output = Result<tonic::Response<T>, etcdv3client::Error>> + Send
    where
        M: prost::Message + Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.unary(mark(req), path)
    }

    fn client_streaming<S, M, T>(
        &mut self,
        req: tonic::Request<S>,
        path: PathAndQuery,
    ) -> impl Future<Output = Result<tonic::Response<T>, etcdv3client::Error>> + Send
    where
        S: futures_util::Stream<Item = M> + Send + 'static,
        M: prost::Message + Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.client_streaming(mark(req), path)
    }

    fn server_streaming<M, T>(
        &mut self,
        req: tonic::Request<M>,
        path: PathAndQuery,
    ) -> impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, etcdv3client::Error>> + Send
    where
        M: prost::Message + Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.server_streaming(mark(req), path)
    }

    fn streaming<S, M, T>(
        &mut self,
        req: tonic::Request<S>,
        path: PathAndQuery,
    ) -> impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, etcdv3client::Error>> + Send
    where
        S: futures_util::Stream<Item = M> + Send + 'static,
        M: prost::Message + Clone + Send + Sync + 'static,
        T: prost::Message + Default + Send + Sync + 'static,
    {
        self.0.streaming(mark(req), path)
    }
}
pub use pb::KeyValue;

/// The longest any one call may take before the store counts as unreachable for it. etcd answers in
/// milliseconds, and a member without a leader refuses at once (`hasleader`): a call that takes longer
/// is on a dead connection, which is then replaced.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Call(String),
    #[error("cannot set up the connection to etcd: {0}")]
    Setup(String),
}

impl From<etcdv3client::Error> for EtcdError {
    fn from(e: etcdv3client::Error) -> Self {
        EtcdError::Call(kakao_tokend_core::answer::scrub(&e.to_string()))
    }
}

/// The connection, replaced as a whole when a call finds it dead: a TCP connection to a member that
/// vanished (a cut network) can hang for minutes before the kernel gives up on it.
#[derive(Debug)]
pub struct Connection {
    settings: EtcdSettings,
    current: std::sync::Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    client: Client,
    /// Over one member that just answered a linearizable read; else over every endpoint, untried.
    probed: bool,
}

impl Current {
    /// The first member that answers, or else every endpoint.
    async fn choose(settings: &EtcdSettings) -> Result<Current, EtcdError> {
        Ok(match first_ready(settings).await {
            Some(client) => Current { client, probed: true },
            None => Current {
                client: connect(settings).await?,
                probed: false,
            },
        })
    }
}

impl Connection {
    pub async fn open(settings: &EtcdSettings) -> Result<Connection, EtcdError> {
        Ok(Connection {
            settings: settings.clone(),
            current: std::sync::Mutex::new(Current::choose(settings).await?),
        })
    }

    pub fn client(&self) -> Client {
        self.lock().client.clone()
    }

    /// Whether the channel goes to a member known to answer (see [`first_ready`]).
    pub fn probed(&self) -> bool {
        self.lock().probed
    }

    /// Marks the channel as one to probe again before the lease is granted over it.
    pub fn distrust(&self) {
        self.lock().probed = false;
    }

    /// A new channel: to the first member that answers, or else over every endpoint (connecting
    /// lazily). The old one's calls fail or time out on their own.
    pub async fn reset(&self) {
        if let Ok(current) = Current::choose(&self.settings).await {
            *self.lock() = current;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// How long a member may take to answer the probe. A member restarted after an outage accepts
/// connections before it serves them (it serves once it has rejoined), and a call sent to it then
/// hangs: the probe finds the member that answers instead.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A client over the first member to answer a linearizable read with a leader, tried on every
/// endpoint at once; `None` when none answers within [`PROBE_TIMEOUT`].
async fn first_ready(settings: &EtcdSettings) -> Option<Client> {
    let endpoints = endpoints(settings).ok()?;
    // A key the replicas read anyway: a user whose role covers only the prefix may read it.
    let probe = kakao_tokend_core::replica::Keys::new(&settings.prefix).records();
    let probes = endpoints.into_iter().map(|ep| {
        let probe = &probe;
        Box::pin(async move {
            let mut c = client_over(settings, ep.connect_lazy()).await?;
            c.kv.range(range(probe)).await?;
            Ok::<Client, EtcdError>(c)
        })
    });
    tokio::time::timeout(PROBE_TIMEOUT, futures_util::future::select_ok(probes))
        .await
        .ok()?
        .ok()
        .map(|(c, _)| c)
}

/// Runs one call with [`CALL_TIMEOUT`].
pub async fn timed<T>(fut: impl Future<Output = Result<T, etcdv3client::Error>>) -> Result<T, EtcdError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(EtcdError::from),
        Err(_) => Err(EtcdError::Timeout(CALL_TIMEOUT)),
    }
}

/// Builds the channel over every endpoint. It connects lazily, so that a replica starts while etcd
/// is down and catches up when it comes back; HTTP/2 pings find a dead connection within a few seconds.
pub async fn connect(settings: &EtcdSettings) -> Result<Client, EtcdError> {
    client_over(settings, Channel::balance_list(endpoints(settings)?.into_iter())).await
}

fn endpoints(settings: &EtcdSettings) -> Result<Vec<Endpoint>, EtcdError> {
    let tls = tls_config(settings)?;
    let mut endpoints = Vec::new();
    for url in &settings.endpoints {
        let mut ep = Endpoint::from_shared(url.as_str().trim_end_matches('/').to_string())
            .map_err(|e| EtcdError::Setup(format!("endpoint {}: {e}", url.host_str().unwrap_or("?"))))?
            // No per-request timeout here: it would cut the watch and keep-alive streams. Each call
            // has its own deadline instead (`timed`).
            .connect_timeout(Duration::from_secs(1))
            // etcd closes connections that ping more often than every 5 s (its keepalive enforcement);
            // a dead connection is mostly found by the session's own deadlines, which reconnect.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if url.scheme() == "https" {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| EtcdError::Setup(format!("TLS for {}: {e}", url.host_str().unwrap_or("?"))))?;
        }
        endpoints.push(ep);
    }
    Ok(endpoints)
}

/// The client over `channel`: authenticated when a user is configured, every call marked `hasleader`.
async fn client_over(settings: &EtcdSettings, channel: Channel) -> Result<Client, EtcdError> {
    let credential = match (&settings.username, &settings.password) {
        (Some(user), Some(password)) => {
            let mut plain = etcdv3client::Client::with_service(TonicClient::new(channel.clone()));
            let token = timed(plain.auth.authenticate(pb::AuthenticateRequest {
                name: user.clone(),
                password: password.expose().to_string(),
            }))
            .await?
            .token;
            let token = token
                .try_into()
                .map_err(|_| EtcdError::Setup("etcd answered an authentication token that is not ASCII".into()))?;
            Some(((user.clone(), password.expose().to_string()), token))
        }
        _ => None,
    };
    let (cred, token) = match credential {
        Some((c, t)) => (Some(c), Some(t)),
        None => (None, None),
    };
    let service = CredentialInterceptor::new(cred, token, TonicClient::new(channel));
    Ok(etcdv3client::Client::with_service(RequireLeader(service)))
}

fn tls_config(settings: &EtcdSettings) -> Result<ClientTlsConfig, EtcdError> {
    crate::crypto::install_provider();
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &settings.ca_file {
        let pem = std::fs::read(ca).map_err(|e| EtcdError::Setup(format!("ca_file {}: {e}", ca.display())))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    } else {
        // The system's bundle (Debian's path, or SSL_CERT_FILE as OpenSSL reads it).
        let bundle = std::env::var_os("SSL_CERT_FILE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
        if let Ok(pem) = std::fs::read(&bundle) {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
    }
    if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
        let cert = std::fs::read(cert).map_err(|e| EtcdError::Setup(format!("cert_file {}: {e}", cert.display())))?;
        let key = std::fs::read(key).map_err(|e| EtcdError::Setup(format!("key_file {}: {e}", key.display())))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Ok(tls)
}

pub fn range(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn range_prefix(prefix: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: prefix_end(prefix.as_bytes()),
        ..Default::default()
    }
}

pub fn put(key: &str, value: Vec<u8>, lease: i64) -> request_op::Request {
    request_op::Request::RequestPut(pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value,
        lease,
        ..Default::default()
    })
}

pub fn delete(key: &[u8]) -> request_op::Request {
    request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
}

pub fn get(req: pb::RangeRequest) -> request_op::Request {
    request_op::Request::RequestRange(req)
}

pub fn create_revision_is(key: &str, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
    }
}

pub fn mod_revision_is(key: &str, revision: i64) -> pb::Compare {
    pb::Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::ModRevision(revision)),
    }
}

pub fn txn(
    compare: Vec<pb::Compare>,
    success: Vec<request_op::Request>,
    failure: Vec<request_op::Request>,
) -> pb::TxnRequest {
    let ops = |v: Vec<request_op::Request>| v.into_iter().map(|r| pb::RequestOp { request: Some(r) }).collect();
    pb::TxnRequest {
        compare,
        success: ops(success),
        failure: ops(failure),
    }
}

/// The key-values of the `i`th answer of a transaction, when it was a range.
pub fn ranged(resp: &pb::TxnResponse, i: usize) -> &[KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

pub fn revision_of(resp: &pb::TxnResponse) -> i64 {
    resp.header.as_ref().map_or(0, |h| h.revision)
}

/// A watch on one key or a range, from a revision. Like every call, it carries `hasleader`: a member
/// that loses its leader cancels the watch instead of going silent.
#[derive(Debug)]
pub struct Watch {
    // Kept: dropping the sender ends the request stream, and with it the watch.
    _requests: tokio::sync::mpsc::Sender<pb::WatchRequest>,
    inbound: tonic::Streaming<pb::WatchResponse>,
}

impl Watch {
    pub async fn start(
        client: Client,
        key: &[u8],
        range_end: Vec<u8>,
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: key.to_vec(),
                range_end,
                start_revision,
                ..Default::default()
            })),
        };
        tx.send(create)
            .await
            .map_err(|_| EtcdError::Call("the watch request stream closed".into()))?;
        let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut c = client;
        let mut inbound = timed(c.watch.watch(request)).await?;
        // The first answer says the watch was created (or why not).
        let first = tokio::time::timeout(CALL_TIMEOUT, inbound.message())
            .await
            .map_err(|_| EtcdError::Timeout(CALL_TIMEOUT))?
            .map_err(|status| EtcdError::Call(kakao_tokend_core::answer::scrub(status.message())))?;
        match first {
            Some(r) if r.created && !r.canceled => {}
            Some(r) => {
                return Err(EtcdError::Call(format!(
                    "the watch was not created: {}",
                    r.cancel_reason
                )));
            }
            None => return Err(EtcdError::Call("the watch stream closed at once".into())),
        }
        Ok(Watch { _requests: tx, inbound })
    }

    /// The next batch of changes; an error when the stream ends, fails or is cancelled.
    pub async fn next(&mut self) -> Result<pb::WatchResponse, EtcdError> {
        match self.inbound.message().await {
            Ok(Some(r)) if r.canceled => Err(EtcdError::Call(if r.compact_revision > 0 {
                format!("the watch's revision was compacted (now {})", r.compact_revision)
            } else {
                format!("the watch was cancelled: {}", r.cancel_reason)
            })),
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(EtcdError::Call("the watch stream ended".into())),
            Err(status) => Err(EtcdError::Call(kakao_tokend_core::answer::scrub(status.message()))),
        }
    }
}
