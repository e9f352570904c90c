//! kakao-tokend's rules, without I/O: the account state machine, the refresh schedule, the token file
//! model and its merge, the classification of a token endpoint's answer, Kakao's error table and the
//! account's state. Nothing here reads a clock, a file or the network, or spawns a task: every input
//! comes in as an argument, so every rule is a plain `#[test]`. The `kakao-tokend` crate does the I/O.

pub mod account;
pub mod answer;
pub mod compact;
pub mod events;
pub mod kakao_errors;
pub mod machine;
pub mod record;
pub mod replica;
pub mod schedule;
pub mod secret;
pub mod state;
pub mod token;

/// Kakao's limit for a text message's `text`, in characters (the alert the machine sends keeps to it).
pub const MAX_MESSAGE_CHARS: usize = 200;
