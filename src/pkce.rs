//! PKCE (RFC 7636) for `login`: a one-time secret, the verifier, stays in this process; the authorize
//! address carries only its SHA-256, the challenge. A local user who intercepts the code on its way to
//! the loopback listener (or reads it off a pasted address) cannot exchange it without the verifier.
//! Kakao's own SDKs send it (S256, base64url without padding), as RFC 8252 asks of native apps.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::secret::Secret;

/// The method sent as `code_challenge_method`.
pub const METHOD: &str = "S256";

#[derive(Debug, Clone)]
pub struct Pkce {
    /// Sent with the code exchange only.
    pub verifier: Secret,
    /// Sent in the authorize address.
    pub challenge: String,
}

impl Pkce {
    /// A fresh pair: 32 bytes from the OS CSPRNG make a 43-character verifier (RFC 7636 4.1).
    pub fn new() -> Result<Pkce, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Pkce::from_verifier(URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn from_verifier(verifier: String) -> Pkce {
        let challenge = challenge_of(&verifier);
        Pkce {
            verifier: Secret::new(verifier),
            challenge,
        }
    }
}

/// `BASE64URL(SHA256(verifier))`, without padding.
pub fn challenge_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_7636_appendix_b() {
        assert_eq!(
            challenge_of("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn fresh_verifiers_are_43_unreserved_characters_and_differ() {
        let a = Pkce::new().unwrap();
        let b = Pkce::new().unwrap();
        for p in [&a, &b] {
            let v = p.verifier.expose();
            assert_eq!(v.len(), 43);
            assert!(
                v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
                "{v}"
            );
            assert_eq!(p.challenge, challenge_of(v));
        }
        assert_ne!(a.verifier.expose(), b.verifier.expose());
    }
}
