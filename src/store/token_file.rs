//! Reading a token file: a regular file only, capped, parsed; the seed's format gets its times estimated.

use std::io::{self};
use std::path::Path;

use jiff::Timestamp;

use super::*;

/// Reads and parses a token file. A file in the seed's format gets its refresh token's expiry
/// estimated from its modification time.
pub fn read_token_file(path: &Path) -> Result<Current, ReadError> {
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => ReadError::Missing,
        _ => ReadError::Io(e),
    };
    let (bytes, meta) = read_regular(path, token::MAX_DOCUMENT_BYTES, true).map_err(io_err)?;
    if bytes.len() > token::MAX_DOCUMENT_BYTES {
        return Err(ReadError::Parse(token::ParseError::TooLarge));
    }
    let mut file = TokenFile::parse(&bytes).map_err(ReadError::Parse)?;
    if file.is_seed_format() {
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| Timestamp::try_from(m).ok())
            .unwrap_or_else(Timestamp::now);
        file.estimate_seed_times(modified);
    }
    let digest = digest(&bytes);
    Ok(Current {
        file,
        digest,
        len: bytes.len(),
        version: version_of(&meta),
    })
}
