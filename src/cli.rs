//! The command line: `kakao-tokend [--config PATH] <command>`, and what each command returns.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::oauth::OAuthClient;
use crate::{commands, kapi, login};

pub use crate::exit::Exit;

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
    Run {
        /// Refresh what is due, write, and exit (for init containers and cron).
        #[arg(long)]
        once: bool,
        /// With --once: refresh every account, due or not.
        #[arg(long, requires = "once")]
        force: bool,
    },
    /// Run the daemon against a built-in fake Kakao with seconds-long tokens; no account needed.
    Demo {
        /// How long to run.
        #[arg(long, default_value = "24s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Log in through a browser and write the account's first token file.
    Login {
        /// The account (may be left out when the config has one).
        #[arg(long)]
        account: Option<String>,
        /// How long to wait for the browser step.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Refresh now (every account when none is named).
    Refresh {
        #[arg(long)]
        account: Option<String>,
    },
    /// Show each account's token expiry, last refresh and state; exit 1 if any access token is not valid.
    Status {
        #[arg(long)]
        account: Option<String>,
        /// A JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the current access token (refreshing it first if it has expired), for scripts.
    Token {
        #[arg(long)]
        account: Option<String>,
    },
    /// Send a KakaoTalk message to yourself.
    Send {
        #[arg(long)]
        account: Option<String>,
        /// The link the message opens (default: the account's message_link).
        #[arg(long)]
        link: Option<String>,
        /// The button's title (Kakao's default: 자세히 보기).
        #[arg(long)]
        button_title: Option<String>,
        /// The message, at most 200 characters.
        text: String,
    },
    /// Load and check the config, and that every token file's folder is writable.
    CheckConfig,
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
        // File work comes in bursts (start-up, a refresh storm) hours apart: idle blocking threads go
        // after a second instead of holding their stacks for tokio's default ten.
        .thread_keep_alive(Duration::from_secs(1))
        .thread_name("kakao-tokend")
        .enable_all()
        .build()
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    // Tokens and the client secret live in this process's memory: no core dump of it, and no ptrace
    // or /proc/PID/mem by other processes of the same user.
    let _ = nix::sys::prctl::set_dumpable(false);
    crate::crypto::install_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { once: false, .. } => run_daemon(&cli.config).into(),
        Command::Demo { duration } => demo(duration).into(),
        command => run_command(&cli.config, command).into(),
    }
}

/// The commands for people: config errors are 78, usage errors 2, failures 1.
fn run_command(config_path: &std::path::Path, command: Command) -> Exit {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            complain(&e.to_string());
            return Exit::Config;
        }
    };
    // A bad RUST_LOG is a configuration error for a command as for the daemon: 78 everywhere.
    if let Err(e) = crate::logging::init_for_command() {
        complain(&e);
        return Exit::Config;
    }
    if let Command::CheckConfig = command {
        return commands::check_config(&config);
    }
    if let Command::Send { text, .. } = &command
        && text.chars().count() > kapi::MAX_TEXT_CHARS
    {
        complain(&format!(
            "the message has {} characters; Kakao allows at most {}",
            text.chars().count(),
            kapi::MAX_TEXT_CHARS
        ));
        return Exit::Usage;
    }
    let (name, all) = match &command {
        Command::Refresh { account } | Command::Status { account, .. } => (account.as_deref(), true),
        Command::Login { account, .. } | Command::Token { account } | Command::Send { account, .. } => {
            (account.as_deref(), false)
        }
        Command::Run { .. } | Command::Demo { .. } | Command::CheckConfig => (None, true),
    };
    let accounts = match commands::select(&config, name, all) {
        Ok(a) => a,
        Err(e) => {
            complain(&e);
            return Exit::Usage;
        }
    };
    with_client(|client| async move {
        let (store, _session) = match crate::replica::open_for_command(&config).await {
            Ok(s) => s,
            Err(e) => {
                complain(&format!("{e}\n  fix: check [store] in {}", config.path.display()));
                return Exit::Failure;
            }
        };
        let store = store.as_ref();
        match command {
            Command::Status { json, .. } => return commands::status(store, &accounts, json).await,
            Command::Refresh { .. } => return commands::refresh(&client, store, &config, &accounts).await,
            Command::Run { force, .. } => return commands::run_once(&client, store, &config, force).await,
            _ => {}
        }
        // The remaining commands act on one account, which select() guarantees.
        let Some(first) = accounts.first() else {
            return Exit::Usage;
        };
        match command {
            Command::Token { .. } => commands::token(&client, store, &config, first).await,
            Command::Send {
                text,
                link,
                button_title,
                ..
            } => {
                commands::send(
                    &client,
                    store,
                    &config,
                    first,
                    &text,
                    link.as_deref(),
                    button_title.as_deref(),
                )
                .await
            }
            Command::Login { timeout, .. } => {
                match login::login(&client, store, first, &config.daemon, timeout, &TerminalPrompt).await {
                    Ok(file) => {
                        commands::out(&format!(
                            "{}: logged in; token file {} written (access token valid until {})",
                            first.name,
                            first.token_file.display(),
                            file.expires_at.map(|t| t.to_string()).unwrap_or_default()
                        ));
                        Exit::Success
                    }
                    Err(e @ login::LoginError::NoRedirectUri(_)) => {
                        complain(&e.to_string());
                        Exit::Config
                    }
                    Err(e) => {
                        complain(&format!("{}: login failed: {e}", first.name));
                        if let Some(fix) = e.fix(&first.name) {
                            complain(&format!("  fix: {fix}"));
                        }
                        Exit::Failure
                    }
                }
            }
            Command::Run { .. }
            | Command::Refresh { .. }
            | Command::Demo { .. }
            | Command::Status { .. }
            | Command::CheckConfig => Exit::Usage,
        }
    })
}

struct TerminalPrompt;

impl login::Prompt for TerminalPrompt {
    fn url(&self, url: &str) {
        commands::out(url);
    }

    fn note(&self, text: &str) {
        commands::err(text);
    }
}

/// Runs `work` on a fresh runtime with the process's HTTP client; failing to set either up is exit 1.
fn with_client<F, Fut>(work: F) -> Exit
where
    F: FnOnce(OAuthClient) -> Fut,
    Fut: Future<Output = Exit>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            complain(&format!("cannot start the runtime: {e}"));
            return Exit::Failure;
        }
    };
    rt.block_on(async {
        match OAuthClient::new() {
            Ok(client) => work(client).await,
            Err(e) => {
                complain(&format!("cannot build the HTTP client: {e}"));
                Exit::Failure
            }
        }
    })
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
    let mut refused = false;
    for f in crate::permissions::check(&config) {
        match f.severity {
            crate::permissions::Severity::Warn => tracing::warn!("{}", f.message),
            crate::permissions::Severity::Refuse => {
                tracing::error!("{}", f.message);
                refused = true;
            }
        }
    }
    if refused {
        return Exit::Config;
    }
    with_client(|client| async move {
        match crate::daemon::run(config, client, std::future::pending()).await {
            Ok(()) => Exit::Success,
            Err(e) => {
                tracing::error!("{e}");
                Exit::Failure
            }
        }
    })
}

#[cfg(not(feature = "demo"))]
fn demo(_: Duration) -> Exit {
    complain(
        "this build has no demo: it was built without the `demo` feature (on by default); build with `cargo build --features demo`",
    );
    Exit::Usage
}

#[cfg(feature = "demo")]
fn demo(duration: Duration) -> Exit {
    if let Err(e) = crate::logging::init(config::LogFormat::Text) {
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
    match rt.block_on(crate::demo::run(duration)) {
        Ok(()) => Exit::Success,
        Err(e) => {
            complain(&format!("demo failed: {e}"));
            Exit::Failure
        }
    }
}
