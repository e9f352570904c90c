//! One account's life in the daemon: its token is refreshed under the lock when due, published, and
//! backed off or parked on failure. The decisions are a state machine without I/O ([`machine`], in the
//! core crate); the task ([`task`]) is the thin async shell that carries them out, one job at a time;
//! the scheduler ([`scheduler`]) keeps the idle tasks, fires their timers and runs their jobs on
//! bounded lanes of workers.

pub use kakao_tokend_core::machine;
pub mod scheduler;
pub mod task;

pub use machine::Report;
pub use scheduler::Scheduler;
pub use task::{AccountTask, Command, Context, Mailbox, Shared};
