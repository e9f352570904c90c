//! One account's life in the daemon: a task that sleeps until its token is due, refreshes it under the
//! lock, publishes the result, and backs off or parks on failure. The decisions are a state machine
//! without I/O ([`machine`], in the core crate); the task ([`task`]) is the thin async shell that
//! carries them out.

pub use kakao_tokend_core::machine;
pub mod task;

pub use machine::Report;
pub use task::{AccountTask, Command, Context, Mailbox, Shared};
