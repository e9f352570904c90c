//! Where the accounts wait between jobs: one timer heap over a table of idle tasks, and two bounded
//! lanes of workers. A task costs its table entry while idle (no tokio task, timer or span of its own),
//! and a worker only while it does something: a refresh, a command, its start or its last write. A
//! storm of due accounts waits as entries in a queue, never as thousands of futures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::FutureExt;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, error};

use super::task::{AccountTask, Command, Context, Mailbox};
use crate::config::Account;
use crate::store::{IndexBuilder, Known};

/// Commands, starts and last writes in flight at once. They are short (reads of small files), and a
/// bound keeps an inotify overflow or a clock jump on 100,000 accounts from starting 100,000 futures.
const COMMAND_WORKERS: usize = 64;

/// Jobs done in place (see [`Scheduler::spawn`]) per turn of the supervisor's loop: enough to start
/// thousands of accounts a second, few enough that signals and inotify are served between them.
const INLINE_PER_TURN: usize = 256;

/// An account's place in the table, valid until the account is removed and its last write is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Id(u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Timers that fired: at most `max_concurrent_refreshes` at once, as the refreshes' permits are.
    Refresh,
    Command,
}

#[derive(Debug)]
enum Job {
    Start,
    Commands(Mailbox),
    Attempt,
    LastWrite,
}

#[derive(Debug, Default)]
struct Slot {
    live: bool,
    /// None while a worker has the task.
    task: Option<Box<AccountTask>>,
    mailbox: Mailbox,
    started: bool,
    /// Waiting in a lane's queue.
    queued: bool,
    /// Bumped whenever the timer is set or the task leaves: heap entries with an older number are stale.
    timer: u32,
}

/// What a worker hands back. The task is missing only if the job panicked.
struct Done {
    id: Id,
    lane: Lane,
    task: Option<Box<AccountTask>>,
}

/// Sends the task back when the job ends, or its absence if the job panicked, so a lane's count of
/// running workers stays right either way.
struct Returner {
    id: Id,
    lane: Lane,
    done: mpsc::UnboundedSender<Done>,
    task: Option<Box<AccountTask>>,
}

impl Drop for Returner {
    fn drop(&mut self) {
        let _ = self.done.send(Done {
            id: self.id,
            lane: self.lane,
            task: self.task.take(),
        });
    }
}

pub struct Scheduler {
    ctx: Arc<Context>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    refreshes: VecDeque<Id>,
    commands: VecDeque<Id>,
    running_refreshes: usize,
    running_commands: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    stopping: bool,
    /// At shutdown, each account as its task ends, with what the start index may keep of it.
    leaving: Vec<(Arc<Account>, Option<Known>)>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("live", &self.live)
            .field("timers", &self.timers.len())
            .field("running_refreshes", &self.running_refreshes)
            .field("running_commands", &self.running_commands)
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    pub fn new(ctx: Arc<Context>) -> Scheduler {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Scheduler {
            ctx,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            timers: BinaryHeap::new(),
            refreshes: VecDeque::new(),
            commands: VecDeque::new(),
            running_refreshes: 0,
            running_commands: 0,
            done_tx,
            done_rx,
            stopping: false,
            leaving: Vec::new(),
        }
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Room for this many more accounts, so that the table does not grow by doubling past them.
    pub fn reserve(&mut self, more: usize) {
        let more = more.saturating_sub(self.free.len());
        self.slots.reserve_exact(more);
    }

    /// Takes a new account; its start is queued at once.
    pub fn add(&mut self, task: AccountTask) -> Id {
        let slot = Slot {
            live: true,
            task: Some(Box::new(task)),
            ..Slot::default()
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 accounts")
            }
        };
        self.live += 1;
        let id = Id(index);
        // Started by the next turn: 100,000 accounts added at once are not all started in here.
        self.route(id);
        id
    }

    /// Hands a command to an account: now if it is idle, or when its current job ends. A stop ends it
    /// (after a last write if a refreshed token is still unwritten).
    pub fn send(&mut self, id: Id, cmd: Command) {
        let Some(slot) = self.slots.get_mut(id.0 as usize).filter(|s| s.live) else {
            return;
        };
        slot.mailbox.send(cmd);
        // Carried out by the next turn, which is at once when a lane has room.
        self.route(id);
    }

    /// Waits for the next timer or a worker's end, and acts on it. Cancel-safe: all that is done after
    /// the wait is done before the next await.
    pub async fn turn(&mut self) {
        if self.has_ready_work() {
            // Other branches of the caller's loop get their turn first.
            tokio::task::yield_now().await;
            self.pump();
            return;
        }
        let next = self.timers.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            Some(done) = self.done_rx.recv() => {
                self.returned(done);
                // Everything else that ended meanwhile, in one go.
                while let Ok(done) = self.done_rx.try_recv() {
                    self.returned(done);
                }
            }
            () = sleep_until_opt(next) => self.fire(Instant::now()),
        }
        self.pump();
    }

    /// From here on no job starts but last writes: a task that comes back (or is idle) with a refreshed
    /// token still unwritten gets one last try, and the others end.
    pub fn shut_down(&mut self) {
        self.stopping = true;
        for id in self.refreshes.drain(..).chain(self.commands.drain(..)) {
            self.slots[id.0 as usize].queued = false;
        }
        for i in 0..self.slots.len() {
            self.route(Id(i as u32));
        }
    }

    /// After [`shut_down`](Self::shut_down): completes once every worker has ended.
    pub async fn finished(&mut self) {
        while self.running_refreshes + self.running_commands > 0 {
            match self.done_rx.recv().await {
                Some(done) => self.returned(done),
                None => return,
            }
        }
    }

    fn returned(&mut self, done: Done) {
        match done.lane {
            Lane::Refresh => self.running_refreshes -= 1,
            Lane::Command => self.running_commands -= 1,
        }
        let slot = &mut self.slots[done.id.0 as usize];
        match done.task {
            Some(task) => {
                slot.task = Some(task);
                self.route(done.id);
            }
            None => {
                error!("an account's job panicked: the account is no longer refreshed until the next start");
                self.release(done.id);
            }
        }
    }

    /// The timers due by `now` move to the refresh lane's queue.
    fn fire(&mut self, now: Instant) {
        while let Some(Reverse((at, index, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let slot = &mut self.slots[index as usize];
            if slot.live && slot.timer == timer && slot.task.is_some() && !slot.queued {
                slot.queued = true;
                self.refreshes.push_back(Id(index));
            }
        }
    }

    /// Puts an account where its state says it belongs: a lane's queue, the timer heap, or out.
    fn route(&mut self, id: Id) {
        let slot = &mut self.slots[id.0 as usize];
        if !slot.live || slot.queued {
            return;
        }
        let Some(task) = slot.task.as_ref() else {
            // With a worker: routed again when it comes back.
            return;
        };
        if self.stopping || slot.mailbox.stopping() {
            self.end(id);
            return;
        }
        if !slot.started || !slot.mailbox.is_empty() {
            slot.queued = true;
            self.commands.push_back(id);
            return;
        }
        let Some(at) = task.deadline() else { return };
        slot.timer = slot.timer.wrapping_add(1);
        if at <= Instant::now() {
            slot.queued = true;
            self.refreshes.push_back(id);
        } else {
            self.timers.push(Reverse((at, id.0, slot.timer)));
            // Stale entries (a timer replaced before it fired) are dropped when they come up; a burst of
            // reschedules (a clock jump on every account) is swept here instead of waiting hours.
            if self.timers.len() > 2 * self.live + 1024 {
                let slots = &self.slots;
                self.timers
                    .retain(|Reverse((_, i, t))| slots[*i as usize].live && slots[*i as usize].timer == *t);
            }
        }
    }

    /// A removed account, or any at shutdown: a last write if one is owed, then its slot is free.
    fn end(&mut self, id: Id) {
        let slot = &mut self.slots[id.0 as usize];
        let Some(task) = slot.task.take() else { return };
        if task.has_unwritten() && slot.started {
            // Not routed again: `started` is cleared so the write is not repeated when it comes back.
            slot.started = false;
            self.spawn(id, Lane::Command, task, Job::LastWrite);
        } else {
            if self.stopping {
                self.leaving
                    .push((task.account().clone(), task.index_entry(std::time::SystemTime::now())));
            }
            drop(task);
            self.release(id);
        }
    }

    /// While running: the start indexes of every account whose task is idle in its slot, as it stands
    /// now. An account whose task is out with a worker (a refresh, a command) is left out, and the next
    /// start reads its files; so is one not started yet.
    pub fn index_now(&self, now: std::time::SystemTime) -> IndexBuilder {
        let idle = || {
            self.slots
                .iter()
                .filter(|slot| slot.live && slot.started)
                .filter_map(|slot| slot.task.as_ref())
        };
        let mut index = IndexBuilder::for_files(idle().map(|task| task.account().token_file.as_path()));
        for task in idle() {
            index.add(&task.account().token_file, task.index_entry(now).as_ref());
        }
        index
    }

    /// After [`finished`](Self::finished): every account that ended at shutdown, with what the start
    /// index may keep of it.
    pub fn take_leaving(&mut self) -> Vec<(Arc<Account>, Option<Known>)> {
        std::mem::take(&mut self.leaving)
    }

    fn release(&mut self, id: Id) {
        self.slots[id.0 as usize] = Slot::default();
        self.free.push(id.0);
        self.live -= 1;
    }

    fn max_refreshes(&self) -> usize {
        self.ctx.shared.borrow().settings.max_concurrent_refreshes.max(1)
    }

    /// A queued job that a lane has room for.
    fn has_ready_work(&self) -> bool {
        !self.stopping
            && ((!self.refreshes.is_empty() && self.running_refreshes < self.max_refreshes())
                || (!self.commands.is_empty() && self.running_commands < COMMAND_WORKERS))
    }

    /// Starts the queued jobs that the lanes have room for, and at most `INLINE_PER_TURN` done in place.
    fn pump(&mut self) {
        if self.stopping {
            return;
        }
        let max_refreshes = self.max_refreshes();
        while self.running_refreshes < max_refreshes
            && let Some(id) = self.refreshes.pop_front()
        {
            self.dispatch(id, Lane::Refresh);
        }
        let mut inline = 0;
        while inline < INLINE_PER_TURN
            && self.running_commands < COMMAND_WORKERS
            && let Some(id) = self.commands.pop_front()
        {
            if self.dispatch(id, Lane::Command) {
                inline += 1;
            }
        }
    }

    /// Picks the job for a queued account as things stand now: a command that came while it waited
    /// for a refresh worker goes first, as it did when each account waited on its mailbox and timer.
    /// True when the job was done in place.
    fn dispatch(&mut self, id: Id, lane: Lane) -> bool {
        let slot = &mut self.slots[id.0 as usize];
        slot.queued = false;
        if !slot.live || slot.task.is_none() {
            return false;
        }
        if slot.mailbox.stopping() {
            self.end(id);
            return false;
        }
        let job = if !slot.started {
            slot.started = true;
            Job::Start
        } else if !slot.mailbox.is_empty() {
            Job::Commands(std::mem::take(&mut slot.mailbox))
        } else if lane == Lane::Refresh {
            Job::Attempt
        } else {
            self.route(id);
            return false;
        };
        // The task leaves: any timer it had is void.
        slot.timer = slot.timer.wrapping_add(1);
        let task = slot.task.take().expect("checked above");
        self.spawn(id, lane, task, job)
    }

    /// True when the job was done in place.
    fn spawn(&mut self, id: Id, lane: Lane, task: Box<AccountTask>, job: Job) -> bool {
        // A span per job, not per account: 100,000 idle accounts would keep 100,000 spans. A start
        // enters it only if it has something to say (see `AccountTask::start`).
        let span = match job {
            Job::Start => tracing::Span::none(),
            _ => task.span(),
        };
        let mut work: Pin<Box<dyn Future<Output = Box<AccountTask>> + Send>> = Box::pin(
            async move {
                let mut task = task;
                match job {
                    Job::Start => task.start().await,
                    Job::Commands(mailbox) => task.handle(mailbox).await,
                    Job::Attempt => task.attempt().await,
                    Job::LastWrite => task.last_write().await,
                }
                task
            }
            .instrument(span),
        );
        // A start from the file store is reads of small files and nothing to wait for: done here, it
        // costs no hand-off to a worker thread and no wake-up of this loop when it ends, which at
        // 100,000 accounts was most of the start-up's CPU. Whatever must wait (a lock, etcd) goes on
        // in a worker from where it stopped: a future polled once may be polled again elsewhere.
        if matches!(lane, Lane::Command)
            && let Some(task) = (&mut work).now_or_never()
        {
            self.slots[id.0 as usize].task = Some(task);
            self.route(id);
            return true;
        }
        match lane {
            Lane::Refresh => self.running_refreshes += 1,
            Lane::Command => self.running_commands += 1,
        }
        let returner = Returner {
            id,
            lane,
            done: self.done_tx.clone(),
            task: None,
        };
        tokio::spawn(async move {
            let mut returner = returner;
            returner.task = Some(work.await);
            // `returner` sends the task back as it drops, or its absence if the job panicked.
        });
        false
    }
}

/// Sleeps until `at`, or forever without one: a timer branch of a `select!` that may have no timer.
pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
