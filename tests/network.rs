//! Networks that need them: the standard proxy variables, and a CA file for a provider (or proxy)
//! behind a private CA. Real sockets, a real TLS server (rustls, with a CA made by rcgen), the real binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::{Daemon, Env, message, tls};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_file_lets_a_private_ca_be_trusted_and_only_by_the_account_that_names_it() {
    let certs = tempfile::tempdir().unwrap();
    let (chain, key) = tls::private_ca(certs.path());
    let (listener, _) = tls::TlsListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls::server_config(chain, key, true),
    );
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

/// A provider closes idle connections long before the next refresh, so each refresh opens a new TLS
/// connection. The client keeps the session tickets the server sent, and the next handshake resumes
/// instead of repeating the full one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_to_the_provider_resumes_the_tls_session() {
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = tls::private_ca(dir.path());
    let (listener, handshakes) = tls::TlsListener::new(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls::server_config(chain, key, true),
    );
    let settings = FakeSettings {
        close_connections: true,
        ..FakeSettings::default()
    };
    let fake = fake_kakao::FakeKakao::start_on(settings, listener, "https")
        .await
        .unwrap();
    let url = fake.url();
    let config = format!(
        "[accounts.me]\nclient_id = \"{}\"\ntoken_file = \"me.json\"\nauth_url = \"{url}\"\nca_file = \"ca.pem\"\n",
        common::CLIENT_ID
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    // The seed's format has no expiry: the daemon refreshes such a file at once, each time it appears.
    let token_file = dir.path().join("me.json");
    std::fs::write(&token_file, fake.login(common::CLIENT_ID).to_string()).unwrap();
    let mut d = Daemon::spawn(&config_path, &[]);
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert_eq!((handshakes.full(), handshakes.resumed()), (1, 0));
    std::fs::write(&token_file, fake.login(common::CLIENT_ID).to_string()).unwrap();
    d.wait_event(LONG, Some("me"), "refreshed").await;
    assert_eq!(fake.stats().refreshes, 2);
    assert_eq!(
        (handshakes.full(), handshakes.resumed()),
        (1, 1),
        "the second connection made a full handshake: the session was not resumed"
    );
}
