//! The one crypto provider of every TLS client in the process: ring. tonic (for etcd) is built on it,
//! and reqwest is built without a provider of its own, so one is linked, not two: a smaller binary and
//! a shorter build.

/// Names ring as the process's provider; later calls change nothing. Every builder of a TLS client
/// (reqwest's, tonic's) calls it first.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
