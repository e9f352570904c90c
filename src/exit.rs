//! Exit codes, documented in the README: their own module, so that the command line and the commands
//! both use them without depending on each other.

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    /// A refresh, login or send failed, or `status` found an account not valid.
    Failure = 1,
    /// Bad command line (clap exits with 2 itself).
    Usage = 2,
    /// The config is broken (sysexits EX_CONFIG), so systemd's RestartPreventExitStatus can use it.
    Config = 78,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}
