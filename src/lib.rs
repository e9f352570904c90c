//! kakao-tokend keeps Kakao (and other RFC 6749) OAuth token files valid at every moment, so that
//! cron jobs, bots and scripts can read a working `access_token` from a file whenever they like.
//!
//! Pure logic (schedule, merge, error classification, backup naming) lives apart from I/O so it can be
//! tested with plain `#[test]`s; the binary is a thin wrapper over [`cli::main`].

pub mod account;
pub mod ca;
pub mod cli;
pub mod commands;
pub mod config;
pub mod config_errors;
pub mod config_sections;
pub mod crypto;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod exit;
pub mod failpoint;
pub mod heap;
pub mod kapi;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod oauth;
pub mod outputs;
pub mod permissions;
pub mod pkce;
pub mod refresh;
pub mod replica;
pub mod store;
pub mod systemd;
pub mod watch;

// The rules without I/O live in the core crate; these paths keep naming them as before.
pub use kakao_tokend_core::{events, kakao_errors, schedule, secret, token};
