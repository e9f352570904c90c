#!/usr/bin/env bash
# Start-up and idle memory at a scale the bench's own setup (a login at the fake per account, five
# backups each) takes too long to make: N accounts in one folder, one token file each with 6 hours
# left, and with STATE_FILES=1 a state file each (as every account has after its first refresh). No
# request is made, so the accounts' URLs lead nowhere. With BACKUPS=K, K backups beside each token file
# (the shipped default keeps 5): the folder's listing at start then has K more names per account.
# The daemon starts three times over the same files:
# - first, with nothing but the files: every one is read. The start index is then written while it
#   runs (`start_index_interval`, 10 s here), and the daemon is killed with SIGKILL;
# - after the crash: each account whose files still match that index is not read. With CHANGED=K, K
#   token files are replaced first (a new file renamed over each, as a refresh by another process
#   does): those are read, and so is the folder's listing, since names changed;
# - after a clean stop, which wrote the index again.
# Each run goes until its CPU time stops moving; its start-up CPU and resident size are printed, then
# the CPU of the index written while running (first run) or of its stop (which writes the index, and
# lists each folder to keep its listing there). Before them, `read_floor` (benches/read_floor.rs) prints
# the CPU of the system calls the first start cannot do without: its floor (the second pass's line).
# Usage: [STATE_FILES=1] [BACKUPS=K] [CHANGED=K] benches/many_accounts.sh N [BIN]
#        (BIN: target/release/kakao-tokend)
set -euo pipefail
n=${1:?usage: benches/many_accounts.sh N [BIN]}
bin=${2:-target/release/kakao-tokend}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$n" "$dir" "${STATE_FILES:-0}" "${BACKUPS:-0}" <<'PY'
import datetime, json, os, secrets, sys
n, d, with_state, backups = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
os.makedirs(f"{d}/tokens")
now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
stamp = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")
config = ["[daemon]\nstart_index_interval = \"10s\"\n"]
for i in range(n):
    path = f"{d}/tokens/a{i}.json"
    token = {
        "token_type": "bearer", "access_token": secrets.token_urlsafe(40), "expires_in": 21599,
        "refresh_token": secrets.token_urlsafe(40), "refresh_token_expires_in": 5183999,
        "scope": "talk_message", "expires_at": stamp(now + datetime.timedelta(hours=6)),
        "refresh_token_expires_at": stamp(now + datetime.timedelta(days=60)),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps(token, indent=2).encode())
    os.close(fd)
    for k in range(1, backups + 1):
        # NAME.json.YYYYmmdd_HHMMSS, one refresh (about 4 hours) apart.
        fd = os.open(f"{path}.{(now - datetime.timedelta(hours=4 * k)).strftime('%Y%m%d_%H%M%S')}",
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, json.dumps(token, indent=2).encode())
        os.close(fd)
    if with_state:
        state = {
            "last_attempt_at": stamp(now), "last_success_at": stamp(now), "consecutive_failures": 0,
            "last_error_code": None, "last_error": None, "needs_login": False, "next_attempt_at": None,
        }
        fd = os.open(path + ".state", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, (json.dumps(state, indent=2) + "\n").encode())
        os.close(fd)
    config.append(f'[accounts.a{i}]\nclient_id = "bench"\ntoken_file = "{path}"\n'
                  'auth_url = "http://127.0.0.1:9"\napi_url = "http://127.0.0.1:9"\n')
with open(f"{d}/config.toml", "w") as f:
    f.write("\n".join(config))
PY
# The index keeps only files changed 3 s or more before the stop that writes it.
sleep 3
# The floor under the first start: the same listing, opens, reads and closes, and nothing else. Twice:
# the first pass may still meet the writeback of the files just made, and the second sees them as the
# daemon's first start, which follows, does.
for pass in 1 2; do
    cargo bench -q --bench read_floor -- "$dir/tokens" "$n" "${STATE_FILES:-0}"
done
python3 - "$bin" "$dir" "$n" "${STATE_FILES:-0}" "${BACKUPS:-0}" "${CHANGED:-0}" <<'PY'
import os, signal, subprocess, sys, time
binp, d, n, state_files, backups, changed = sys.argv[1:7]
tck = os.sysconf("SC_CLK_TCK")
index = f"{d}/tokens/.kakao-tokend.index"
def cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])
def settled(pid):
    """The process's CPU ticks once they have stopped moving for 1.5 s."""
    last, still = -1, 0
    while still < 3:
        time.sleep(0.5)
        now = cpu(pid)
        still, last = (still + 1, last) if now == last else (0, now)
    return last
def line(run, start, after, rss):
    print(f"run={run} accounts={n} state_files={state_files} backups={backups} changed={changed} "
          f"startup_cpu_ms={start * 1000 // tck} {after} rss_kib={rss}", flush=True)
for run in ["first", "after_crash", "restart"]:
    if run == "after_crash":
        for i in range(int(changed)):
            path = f"{d}/tokens/a{i}.json"
            text = open(path, "rb").read()
            fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, text)
            os.close(fd)
            os.rename(path + ".new", path)
    p = subprocess.Popen([binp, "run", "--config", f"{d}/config.toml"], stderr=subprocess.DEVNULL)
    start = settled(p.pid)
    rss = next(l.split()[1] for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS"))
    if run == "first":
        # The index written while running, then a crash: no stop writes it again.
        while not os.path.exists(index):
            time.sleep(0.2)
        written = settled(p.pid)
        p.send_signal(signal.SIGKILL)
        p.wait()
        line(run, start, f"index_write_cpu_ms={(written - start) * 1000 // tck}", rss)
        continue
    p.send_signal(signal.SIGINT)
    # The whole run's CPU from the kernel's account at exit: the stop's share is what follows the start.
    _, _, usage = os.wait4(p.pid, 0)
    p.returncode = 0
    stop_ms = round((usage.ru_utime + usage.ru_stime) * 1000 - start * 1000 / tck)
    line(run, start, f"stop_cpu_ms={stop_ms}", rss)
PY
