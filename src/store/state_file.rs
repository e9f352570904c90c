//! The per-account state file (`NAME.json.state`) that `status` reads.

use std::io::{self};
use std::path::Path;

use super::*;

/// A state file is a few hundred bytes; more is not one.
pub(super) const STATE_FILE_CAP: usize = 64 * 1024;

/// Reading and writing the [`AccountState`] beside a token file.
pub trait StateFile: Sized {
    fn load(token_file: &Path) -> io::Result<Option<Self>>;
    fn save(&self, token_file: &Path) -> io::Result<()>;
}

impl StateFile for AccountState {
    fn load(token_file: &Path) -> io::Result<Option<AccountState>> {
        match read_regular(&state_path(token_file), STATE_FILE_CAP, false) {
            Ok((bytes, _)) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&self, token_file: &Path) -> io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        bytes.push(b'\n');
        replace_atomic(&state_path(token_file), &bytes)
    }
}
