//! Logs go to stderr (stdout belongs to command output), as text or JSON, at the level RUST_LOG asks
//! for (info by default). Secrets never reach here: they are `Secret`s, which redact themselves.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::config::LogFormat;

/// For commands: text, warnings and errors only unless RUST_LOG asks for more; their results are
/// printed on stdout by the command itself.
pub fn init_for_command() -> Result<(), String> {
    init_with(LogFormat::Text, LevelFilter::WARN)
}

/// Installs the daemon's global subscriber. A bad RUST_LOG is an error rather than silently ignored.
pub fn init(format: LogFormat) -> Result<(), String> {
    init_with(format, LevelFilter::INFO)
}

fn init_with(format: LogFormat, default: LevelFilter) -> Result<(), String> {
    let filter = EnvFilter::builder()
        .with_default_directive(default.into())
        .from_env()
        .map_err(|e| format!("RUST_LOG is not a valid filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}
