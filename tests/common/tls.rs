//! The fake behind TLS, as a real provider is: a private CA made by rcgen, a rustls server, and a count
//! of full and resumed handshakes. Shared by the tests and by `benches/daemon.rs` (which includes this
//! file by path).

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A private CA (written to `ca.pem` in `dir`, for the config's `ca_file`) and a server certificate for
/// localhost and 127.0.0.1 that it signed, with the server's key.
pub fn private_ca(dir: &Path) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "kakao-tokend test CA");
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (vec![srv.der().clone()], key)
}

/// A rustls server for `certs`. With `resumption`, rustls' defaults: a session cache and two TLS 1.3
/// tickets per handshake. Without, neither, so every handshake is a full one.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    resumption: bool,
) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    if !resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Arc::new(config)
}

/// Handshakes completed, by kind.
#[derive(Debug, Default)]
pub struct Handshakes {
    pub full: AtomicU64,
    pub resumed: AtomicU64,
}

impl Handshakes {
    pub fn full(&self) -> u64 {
        self.full.load(Ordering::Relaxed)
    }

    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }
}

/// TLS in front of a TCP listener, for serving the fake over https. Handshakes run in tasks of their own,
/// so that many clients connecting at once are not served one after another.
pub struct TlsListener {
    addr: std::net::SocketAddr,
    accepted: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl TlsListener {
    pub fn new(tcp: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> (TlsListener, Arc<Handshakes>) {
        let addr = tcp.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let counts = Arc::new(Handshakes::default());
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        let accept_loop = tokio::spawn({
            let counts = counts.clone();
            async move {
                while let Ok((tcp, peer)) = tcp.accept().await {
                    let (acceptor, tx, counts) = (acceptor.clone(), tx.clone(), counts.clone());
                    tokio::spawn(async move {
                        // A client that refuses the certificate ends its handshake: nothing to serve.
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let counter = match tls.get_ref().1.handshake_kind() {
                            Some(rustls::HandshakeKind::Resumed) => &counts.resumed,
                            _ => &counts.full,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send((tls, peer)).await;
                    });
                }
            }
        });
        (
            TlsListener {
                addr,
                accepted,
                accept_loop,
            },
            counts,
        )
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(conn) => conn,
            // The accept loop ended (its listener failed): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
