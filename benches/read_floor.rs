//! The floor under a start that reads every file: the system calls such a start cannot do without,
//! and nothing else. One listing of the folder into a 256 KiB buffer, then for each account its token
//! file and its state file, each opened as the daemon opens them (no symlink followed, no access-time
//! update), `fstat`, read whole and closed; the state file under a shared `flock`, as the daemon reads
//! it. No parse, no task, no log line. `benches/many_accounts.sh` runs it over the folder it made and
//! prints its CPU beside the daemon's first start, which does all of this and the rest.
//!
//! Usage: cargo bench --bench read_floor -- FOLDER N [STATE_FILES]
//! (token files FOLDER/a0.json .. a{N-1}.json; with STATE_FILES=1, a{i}.json.state beside each)

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::expect_used)]

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

fn read_one(path: &Path, lock: bool, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let flags = nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOATIME;
    let mut file: File = OpenOptions::new().read(true).custom_flags(flags).open(path)?;
    if lock {
        file.lock_shared()?;
    }
    // One read into a buffer a byte larger than the file, which stops short at its end, as the
    // daemon's does: no second read to find the end.
    let size = file.metadata()?.len() as usize;
    buf.resize(size + 1, 0);
    file.read(buf)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let [dir, n, rest @ ..] = &args[..] else {
        eprintln!("usage: cargo bench --bench read_floor -- FOLDER N [STATE_FILES]");
        return Ok(());
    };
    let dir = Path::new(dir);
    let n: usize = n.parse().expect("N is a number");
    let state_files = rest.first().is_some_and(|s| s == "1");

    let mut names = 0usize;
    {
        use rustix::fs::{Mode, OFlags, RawDir};
        let folder = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
        let mut space = Vec::with_capacity(256 << 10);
        let mut listing = RawDir::new(&folder, space.spare_capacity_mut());
        while let Some(entry) = listing.next() {
            names += usize::from(!entry?.file_name().to_bytes().is_empty());
        }
    }
    let mut buf = Vec::new();
    let mut bytes = 0;
    for i in 0..n {
        let token = dir.join(format!("a{i}.json"));
        bytes += read_one(&token, false, &mut buf)?;
        if state_files {
            bytes += read_one(&dir.join(format!("a{i}.json.state")), true, &mut buf)?;
        }
    }
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() * 1000 + t.tv_usec() / 1000;
    println!(
        "run=read_floor accounts={n} state_files={} names={names} bytes={bytes} cpu_ms={} user_ms={} sys_ms={}",
        u8::from(state_files),
        ms(usage.user_time()) + ms(usage.system_time()),
        ms(usage.user_time()),
        ms(usage.system_time()),
    );
    Ok(())
}
