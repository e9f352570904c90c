//! A private CA bundle (`ca_file`): read and checked once by the config, used by the HTTP client. Its own
//! module, so that the config and the client do not depend on each other.

use std::path::Path;

/// Reads a PEM file of one or more CA certificates.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}
