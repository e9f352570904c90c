//! The command line: `kakao-tokend [--config PATH] <command>`, and what each command returns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, LogFormat};
use crate::oauth::OAuthClient;

/// Exit codes, documented in the README.
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

#[derive(Debug, Parser)]
#[command(
    name = "kakao-tokend",
    version,
    about = "Keeps Kakao OAuth token files valid at every moment"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, short = 'c', global = true, env = "KAKAO_TOKEND_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: keep every account's token file valid until SIGTERM (SIGHUP reloads).
    Run,
    /// Run the daemon against a built-in fake Kakao with seconds-long tokens; no account needed.
    Demo {
        /// How long to run.
        #[arg(long, default_value = "24s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

fn complain(message: &str) {
    #[expect(
        clippy::print_stderr,
        reason = "errors before logging is set up go straight to stderr"
    )]
    {
        eprintln!("kakao-tokend: {message}");
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .thread_name("kakao-tokend")
        .enable_all()
        .build()
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => run_daemon(&cli.config).into(),
        Command::Demo { duration } => demo(duration).into(),
    }
}

fn run_daemon(config_path: &std::path::Path) -> Exit {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            complain(&e.to_string());
            return Exit::Config;
        }
    };
    if let Err(e) = crate::logging::init(config.daemon.log_format) {
        complain(&e);
        return Exit::Config;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            complain(&format!("cannot start the runtime: {e}"));
            return Exit::Failure;
        }
    };
    rt.block_on(async {
        let client = match OAuthClient::new() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("cannot build the HTTP client: {e}");
                return Exit::Failure;
            }
        };
        match crate::daemon::run(config, client, std::future::pending()).await {
            Ok(()) => Exit::Success,
            Err(e) => {
                tracing::error!("{e}");
                Exit::Failure
            }
        }
    })
}

fn demo(duration: Duration) -> Exit {
    if let Err(e) = crate::logging::init(LogFormat::Text) {
        complain(&e);
        return Exit::Usage;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            complain(&format!("cannot start the runtime: {e}"));
            return Exit::Failure;
        }
    };
    match rt.block_on(crate::demo::run(duration)) {
        Ok(()) => Exit::Success,
        Err(e) => {
            complain(&format!("demo failed: {e}"));
            Exit::Failure
        }
    }
}
