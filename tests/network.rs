//! Networks that need them: the standard proxy variables, and a CA file for a provider (or proxy)
//! behind a private CA. Real sockets, a real TLS server (rustls, with a CA made by rcgen), the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{Daemon, Env, message};
use fake_kakao::FakeSettings;

use common::LONG;

/// A proxy that records each request line and answers 502.
fn refusing_proxy() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut first = String::new();
            let _ = BufReader::new(conn.try_clone().unwrap()).read_line(&mut first);
            log.lock().unwrap().push(first.trim().to_string());
            let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_are_honoured_and_no_proxy_bypasses_them() {
    let env = Env::new(FakeSettings::fast(3600, 7200)).await;
    env.write_config("", &["me"]);
    // The seed's format: refreshed at once.
    std::fs::write(env.path("me.json"), env.fake.login(common::CLIENT_ID).to_string()).unwrap();
    let (port, seen) = refusing_proxy();
    let proxy = format!("http://127.0.0.1:{port}");
    let mut cmd = Command::new(common::BIN);
    cmd.arg("run").arg("--config").arg(&env.config);
    for v in [
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("HTTP_PROXY", &proxy).env("http_proxy", &proxy);
    let mut d = Daemon::from_command(cmd);
    let e = d.wait_event(LONG, Some("me"), "refresh_failed").await;
    assert!(message(&e).contains("HTTP 502"), "{e}");
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first, format!("POST {}/oauth/token HTTP/1.1", env.fake.url()));
    drop(d);

    let mut cmd = Command::new(common::BIN);
    cmd.arg("run").arg("--config").arg(&env.config);
    cmd.env("HTTP_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1");
    let before = seen.lock().unwrap().len();
    let mut d = Daemon::from_command(cmd);
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert_eq!(seen.lock().unwrap().len(), before, "NO_PROXY was ignored");
}

/// TLS in front of a TCP listener, for serving the fake over https.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // A client that refuses the certificate ends its handshake: wait for the next one.
            if let Ok((tcp, addr)) = self.tcp.accept().await
                && let Ok(tls) = self.acceptor.accept(tcp).await
            {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A private CA (written to `ca.pem` in `dir`, for the config's ca_file) and a server certificate for
/// localhost and 127.0.0.1 that it signed, with the server's key.
fn private_ca(
    dir: &std::path::Path,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
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
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (vec![srv.der().clone()], key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_lets_a_private_ca_be_trusted_and_only_by_the_account_that_names_it() {
    let certs = tempfile::tempdir().unwrap();
    let (chain, key) = private_ca(certs.path());
    // Two crypto providers are linked (reqwest's aws-lc-rs, and ring through tonic): name one.
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let listener = TlsListener {
        tcp: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    };
    let fake = fake_kakao::FakeKakao::start_on(FakeSettings::default(), listener, "https")
        .await
        .unwrap();
    assert!(fake.url().starts_with("https://127.0.0.1:"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(certs.path().join("ca.pem"), dir.path().join("ca.pem")).unwrap();
    let url = fake.url();
    let mut config = String::new();
    for (name, ca) in [("trusting", true), ("plain", false)] {
        config.push_str(&format!(
            "[accounts.{name}]\nclient_id = \"{}\"\ntoken_file = \"{name}.json\"\nauth_url = \"{url}\"\n",
            common::CLIENT_ID
        ));
        if ca {
            config.push_str("ca_file = \"ca.pem\"\n");
        }
        // The seed's format: refreshed at once.
        std::fs::write(
            dir.path().join(format!("{name}.json")),
            fake.login(common::CLIENT_ID).to_string(),
        )
        .unwrap();
    }
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &config).unwrap();
    let mut d = Daemon::spawn(&config_path, &[]);
    d.wait_event(LONG, Some("trusting"), "refreshed").await;
    let e = d.wait_event(LONG, Some("plain"), "refresh_failed").await;
    assert!(
        message(&e).contains("cannot reach") && message(&e).contains("UnknownIssuer"),
        "{e}"
    );
    assert_eq!(fake.stats().refreshes, 1);
    drop(d);

    // A CA file that is not one is a config error naming the key.
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let out = common::output_swept(
        Command::new(common::BIN)
            .args(["check-config", "--config"])
            .arg(&config_path),
        false,
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.trusting.ca_file"));
}
