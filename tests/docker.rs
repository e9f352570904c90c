//! The container image, built from the repository's Dockerfile and run for real on the Docker engine:
//! the image itself, the user it runs as, a read-only root, the volume, secrets, logs, signals and PID 1,
//! the HEALTHCHECK, a consumer in another container, and compose.yaml. The fake Kakao runs in a container
//! of its own (the `fake-kakao serve` binary) on a private network, reached over plain http.
//!
//! The image is built once per run by docker/build-image.sh (the binary built on this machine, a
//! runtime base made from Debian's packages), so no registry is needed. Without a Docker engine every
//! test here says SKIPPED and passes, except under CI=true, where it fails.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::containers::*;
use common::{CLIENT_ID, CLIENT_SECRET, assert_no_secrets};
use serde_json::Value;

#[test]
fn the_image_is_small_bare_and_non_root() {
    let Some(_) = built() else { return };
    let size: u64 = inspect(IMAGE, "{{.Size}}").parse().unwrap();
    eprintln!("image size: {size} bytes ({:.1} MB)", size as f64 / 1e6);
    assert!(size <= 30_000_000, "the image is {size} bytes, over 30 MB");
    assert_eq!(inspect(IMAGE, "{{.Config.User}}"), "65532:65532");
    assert_eq!(
        inspect(IMAGE, "{{json .Config.Healthcheck.Test}}"),
        r#"["CMD","/usr/local/bin/kakao-tokend","status"]"#
    );
    assert_eq!(
        inspect(IMAGE, "{{json .Config.Entrypoint}}"),
        r#"["/usr/local/bin/kakao-tokend"]"#
    );

    // Its files: the binary, glibc, CA certificates, the users; no shell and no package manager.
    let scope = Scope::new("bare");
    let label = format!("kakao-tokend-test={}", scope.id);
    let name = scope.name("export");
    docker_ok(&["create", "--name", &name, "--label", &label, IMAGE]);
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!("docker export {name} | tar -tvf -"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let has = |path: &str| {
        listing
            .lines()
            .any(|l| l.ends_with(&format!(" {path}")) || l.contains(&format!(" {path} ->")))
    };
    for needed in [
        "usr/local/bin/kakao-tokend",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(has(needed), "the image lacks {needed}");
    }
    assert!(
        listing.contains("libc.so.6") && listing.contains("libgcc_s.so.1"),
        "no glibc or libgcc_s"
    );
    for absent in ["bin/sh", "bin/bash", "usr/bin/apt", "usr/bin/dpkg", "usr/bin/perl"] {
        assert!(!has(absent), "the image holds {absent}");
    }
    let state = listing
        .lines()
        .find(|l| l.ends_with(" var/lib/kakao-tokend/"))
        .expect("no /var/lib/kakao-tokend");
    assert!(state.starts_with("drwxr-x--- nonroot/nonroot"), "{state}");
    // And the binary is the stripped release build: no symbol table section left to name.
    let bin = std::fs::read(repo().join("target/docker/bin/kakao-tokend")).unwrap();
    assert!(!bin.windows(8).any(|w| w == b".symtab\0"), "the binary is not stripped");
    // And static: no program interpreter, so no shared library is mapped when it runs.
    assert!(!has_interpreter(&bin), "the binary is linked dynamically");
}

/// Whether a 64-bit little-endian ELF file names a program interpreter (a `PT_INTERP` header): a
/// dynamically linked program does, a static one does not.
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([elf[at], elf[at + 1]]));
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap())).unwrap();
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

#[test]
fn runs_read_only_as_65532_on_a_named_volume_with_a_secret_file_and_json_logs() {
    let Some(b) = built() else { return };
    let scope = Scope::new("volume");
    let fake = scope.fake(b, 4, 3600);
    let etc = scope.config_dir(&config("", "client_secret_file = \"/run/secrets/kakao_client_secret\""));
    let secret = scope.dir.path().join("kakao_client_secret");
    std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).unwrap();
    std::os::unix::fs::chown(&secret, Some(NONROOT), Some(NONROOT)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    let volume = scope.name("tokens");
    docker_ok(&[
        "volume",
        "create",
        "--label",
        &format!("kakao-tokend-test={}", scope.id),
        &volume,
    ]);

    let etc_mount = etc_mount(&etc);
    let vol_mount = format!("{volume}:/var/lib/kakao-tokend");
    let secret_mount = format!("{}:/run/secrets/kakao_client_secret:ro", secret.display());
    let d = scope.run(
        "daemon",
        &[
            "--read-only",
            "-v",
            &etc_mount,
            "-v",
            &vol_mount,
            "-v",
            &secret_mount,
            "-e",
            "KAKAO_TOKEND__DAEMON__LOG_FORMAT=json",
        ],
        &[IMAGE],
    );
    let mut log = LogStream::follow(&d);
    log.wait_event("started", None);
    login_by_paste(&d, &fake, "me");
    let refreshed = log.wait_event("refreshed", Some("me"));
    assert_eq!(refreshed["level"], "INFO");

    // The named volume took the image's folder: 0750, the image's user; the file is 0600 and theirs.
    let data = PathBuf::from(inspect(&volume, "{{.Mountpoint}}"));
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (NONROOT, NONROOT, 0o750)
    );
    let file = std::fs::metadata(data.join("me.json")).unwrap();
    assert_eq!((file.uid(), file.mode() & 0o777), (NONROOT, 0o600));
    assert!(fake.access_token_works(token_file(&data, "me")["access_token"].as_str().unwrap()));
    assert!(docker_ok(&["exec", &d, "kakao-tokend", "status"]).contains("valid"));
    assert_eq!(inspect(&d, "{{.Config.User}}"), "65532:65532");
    assert_eq!(inspect(&d, "{{.HostConfig.ReadonlyRootfs}}"), "true");

    docker_ok(&["stop", &d]);
    assert_eq!(inspect(&d, "{{.State.ExitCode}}"), "0");
    let all = logs(&d);
    assert!(
        all.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "a log line is not JSON:\n{all}"
    );
    assert_no_secrets("docker logs", &all);
}

#[test]
fn runs_as_another_user_who_owns_the_folder_with_the_secret_from_the_environment() {
    let Some(b) = built() else { return };
    let scope = Scope::new("otheruser");
    let fake = scope.fake(b, 4, 3600);
    let etc = scope.config_dir(&config("", ""));
    let tokens = scope.tokens_dir(1000, 1000);
    seed_login(&tokens, "me", &fake, 1000);

    let etc_mount = etc_mount(&etc);
    let tok_mount = tokens_mount(&tokens);
    let secret = secret_env();
    let d = scope.run(
        "daemon",
        &[
            "--read-only",
            "--user",
            "1000:1000",
            "-v",
            &etc_mount,
            "-v",
            &tok_mount,
            "-e",
            &secret,
        ],
        &[IMAGE],
    );
    let mut log = LogStream::follow(&d);
    // The seed's format (no absolute times) is refreshed at once; then on schedule.
    log.wait_line(|l| l.contains("event=\"refreshed\""));
    log.wait_line(|l| l.contains("event=\"refreshed\""));
    let meta = std::fs::metadata(tokens.join("me.json")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert!(token_file(&tokens, "me")["expires_at"].is_string());
    docker_ok(&["stop", &d]);
    assert_eq!(inspect(&d, "{{.State.ExitCode}}"), "0");
    assert_no_secrets("docker logs", &logs(&d));
}

#[test]
fn health_follows_the_token_and_a_login_by_docker_exec_restores_it() {
    let Some(b) = built() else { return };
    let scope = Scope::new("health");
    let fake = scope.fake(b, 4, 3600);
    let etc = scope.config_dir(&config("", ""));
    let tokens = scope.tokens_dir(NONROOT, NONROOT);
    seed_login(&tokens, "me", &fake, NONROOT);

    let etc_mount = etc_mount(&etc);
    let tok_mount = tokens_mount(&tokens);
    let secret = secret_env();
    let since = now_for_events();
    let started = Instant::now();
    let d = scope.run(
        "daemon",
        &[
            "--read-only",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            "--health-start-period",
            "0s",
            "-v",
            &etc_mount,
            "-v",
            &tok_mount,
            "-e",
            &secret,
        ],
        &[IMAGE],
    );
    wait_health(&d, &since, "healthy");
    eprintln!("docker run to healthy: {:.2} s", started.elapsed().as_secs_f64());

    // Every token dies; the next refresh is refused, and once the access token in the file runs out
    // the HEALTHCHECK fails.
    let since = now_for_events();
    fake.revoke();
    wait_health(&d, &since, "unhealthy");
    let status = docker(&["exec", &d, "kakao-tokend", "status"]);
    assert_eq!(status.status.code(), Some(1));

    // A new login, by hand, in the running container: healthy again.
    let since = now_for_events();
    login_by_paste(&d, &fake, "me");
    wait_health(&d, &since, "healthy");
    assert!(fake.access_token_works(token_file(&tokens, "me")["access_token"].as_str().unwrap()));
    assert_no_secrets("docker logs", &logs(&d));
}

#[test]
fn sighup_adopts_an_added_account_whose_token_file_exists() {
    let Some(b) = built() else { return };
    let scope = Scope::new("hup");
    let fake = scope.fake(b, 4, 3600);
    let etc = scope.config_dir(&config("metrics_listen = \"0.0.0.0:9464\"", ""));
    let tokens = scope.tokens_dir(NONROOT, NONROOT);
    for account in ["me", "you"] {
        seed_login(&tokens, account, &fake, NONROOT);
    }
    let etc_mount = etc_mount(&etc);
    let tok_mount = tokens_mount(&tokens);
    let d = scope.run(
        "daemon",
        &[
            "--read-only",
            "-v",
            &etc_mount,
            "-v",
            &tok_mount,
            "-e",
            "KAKAO_TOKEND__DAEMON__LOG_FORMAT=json",
            "-e",
            &secret_env(),
        ],
        &[IMAGE],
    );
    let mut log = LogStream::follow(&d);
    log.wait_event("refreshed", Some("me"));
    let healthz = format!("{}:9464", ip(&d));
    let (_, body) = http(&healthz, "GET", "/healthz");
    assert!(!body.contains("\"you\""), "{body}");

    // The config folder is mounted, so the editor's rename reaches the container.
    let you = format!(
        "{}\n[accounts.you]\nclient_id = \"{CLIENT_ID}\"\nauth_url = \"http://fake:8080\"\napi_url = \"http://fake:8080\"\nallow_insecure_http = true\nclient_secret = \"{CLIENT_SECRET}\"\n",
        config("metrics_listen = \"0.0.0.0:9464\"", "")
    );
    write_by_rename(&etc.join("config.toml"), &you);
    docker_ok(&["kill", "-s", "HUP", &d]);
    let reloaded = log.wait_event("reloaded", None);
    assert_eq!(reloaded["added"], 1, "{reloaded}");
    log.wait_event("refreshed", Some("you"));
    let (status, body) = http(&healthz, "GET", "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"you\""), "{body}");
    let status = docker_ok(&["exec", &d, "kakao-tokend", "status", "--json"]);
    let accounts: Value = serde_json::from_str(&status).unwrap();
    let you = accounts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == "you")
        .unwrap();
    assert_eq!(you["state"], "valid", "{status}");
    assert_no_secrets("docker logs", &logs(&d));
}

#[test]
fn docker_stop_is_quick_when_idle_and_finishes_a_refresh_in_flight() {
    let Some(b) = built() else { return };
    let scope = Scope::new("stop");
    let fake = scope.fake(b, 4, 3600);
    let etc = scope.config_dir(&config("", ""));
    let tokens = scope.tokens_dir(NONROOT, NONROOT);
    seed_login(&tokens, "me", &fake, NONROOT);
    let etc_mount = etc_mount(&etc);
    let tok_mount = tokens_mount(&tokens);
    let secret = secret_env();
    let options = ["--read-only", "-v", &etc_mount, "-v", &tok_mount, "-e", &secret];

    // Idle: between refreshes.
    let d = scope.run("idle", &options, &[IMAGE]);
    let mut log = LogStream::follow(&d);
    log.wait_line(|l| l.contains("event=\"refreshed\""));
    let t = Instant::now();
    docker_ok(&["stop", "-t", "10", &d]);
    let idle = t.elapsed();
    eprintln!("docker stop, idle: {:.3} s", idle.as_secs_f64());
    assert_eq!(inspect(&d, "{{.State.ExitCode}}"), "0");
    assert!(
        idle < Duration::from_secs(2),
        "docker stop of an idle daemon took {idle:?}"
    );

    // Mid-refresh: the fake holds the answer 3 s; the stop waits for it and the write.
    let before = fake.stats();
    fake.delay(3000);
    let d = scope.run("busy", &options, &[IMAGE]);
    fake.wait("token_requests", before["token_requests"].as_u64().unwrap() + 1);
    let t = Instant::now();
    docker_ok(&["stop", "-t", "20", &d]);
    let busy = t.elapsed();
    eprintln!("docker stop, mid-refresh: {:.3} s", busy.as_secs_f64());
    assert_eq!(inspect(&d, "{{.State.ExitCode}}"), "0");
    assert_eq!(inspect(&d, "{{.State.OOMKilled}}"), "false");
    let after = fake.stats();
    assert_eq!(after["refreshes"], before["refreshes"].as_u64().unwrap() + 1, "{after}");
    // The answer was written: the file holds the token the delayed request brought.
    let file = token_file(&tokens, "me");
    assert!(fake.access_token_works(file["access_token"].as_str().unwrap()));
    assert!(logs(&d).contains("refreshed"), "{}", logs(&d));
    assert!(
        busy >= Duration::from_millis(1500) && busy < Duration::from_secs(10),
        "{busy:?}"
    );
    fake.delay(0);
}

#[test]
fn a_config_error_exits_78_and_docker_shows_it() {
    let Some(b) = built() else { return };
    let scope = Scope::new("config78");
    let _ = b;
    let etc = scope.config_dir("[accounts.me]\nclient_id = \"x\"\nauth_url = \"http://fake:8080\"\n");
    let etc_mount = etc_mount(&etc);
    let d = scope.run("daemon", &["--read-only", "-v", &etc_mount], &[IMAGE]);
    assert_eq!(docker_ok(&["wait", &d]), "78");
    let ps = docker_ok(&["ps", "-a", "--filter", &format!("name={d}"), "--format", "{{.Status}}"]);
    assert!(ps.starts_with("Exited (78)"), "{ps}");
    let all = logs(&d);
    assert!(all.contains("allow_insecure_http"), "{all}");

    // A group the image does not know is the same clean error. The binary is static: its C library
    // resolves groups and hosts with the name services it has built in, as the image's nsswitch.conf
    // asks; one that reached for a shared NSS module would crash here instead.
    scope.config_dir("[accounts.me]\nclient_id = \"x\"\nfile_group = \"no-such-group\"\n");
    let c = scope.run("check", &["--read-only", "-v", &etc_mount], &[IMAGE, "check-config"]);
    assert_eq!(docker_ok(&["wait", &c]), "78", "{}", logs(&c));
    let out = logs(&c);
    assert!(out.contains("names no group"), "{out}");
}

/// Zombies whose parent is the container's PID 1, read from the host's /proc (an exited process leaves
/// the cgroup, so `docker top` no longer lists it).
fn zombies(container: &str) -> usize {
    let init = inspect(container, "{{.State.Pid}}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid ...: comm may hold spaces, so split after its last ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, r)| r.split_whitespace().collect());
            fields.first() == Some(&"Z") && fields.get(1) == Some(&init.as_str())
        })
        .count()
}

#[test]
fn an_init_reaps_what_hooks_leave_behind() {
    let Some(b) = built() else { return };
    let scope = Scope::new("zombies");
    let fake = scope.fake(b, 3600, 7200);
    let etc = scope.config_dir(&config(
        "",
        "on_refresh = [\"/usr/local/bin/fake-kakao\", \"orphan\", \"--linger\", \"50\"]",
    ));
    let bin = format!("{}:/usr/local/bin/fake-kakao:ro", b.fake_bin.display());
    let etc_mount = etc_mount(&etc);
    let secret = secret_env();
    let mut counts = Vec::new();
    for init in [true, false] {
        let tokens = scope.dir.path().join(format!("tokens-{init}"));
        std::fs::create_dir_all(&tokens).unwrap();
        std::os::unix::fs::chown(&tokens, Some(NONROOT), Some(NONROOT)).unwrap();
        seed_login(&tokens, "me", &fake, NONROOT);
        let tok_mount = tokens_mount(&tokens);
        let mut options = vec![
            "--read-only",
            "-v",
            &etc_mount,
            "-v",
            &tok_mount,
            "-v",
            &bin,
            "-e",
            &secret,
        ];
        if init {
            options.push("--init");
        }
        let d = scope.run(&format!("init-{init}"), &options, &[IMAGE]);
        let mut log = LogStream::follow(&d);
        log.wait_line(|l| l.contains("event=\"hook_ran\""));
        // 20 more hooks, each leaving an orphan that lingers 50 ms: `refresh` in the container runs
        // the hook, and the orphan is reparented to the container's PID 1.
        for _ in 0..20 {
            docker_ok(&["exec", &d, "kakao-tokend", "refresh"]);
        }
        // Each orphan has exited once its `linger` is gone from the process list as a live process.
        let deadline = Instant::now() + LONG;
        let count = loop {
            let top = docker_ok(&["top", &d, "-o", "pid,stat,args"]);
            let lingering = top
                .lines()
                .filter(|l| l.contains("linger") && !l.contains(" Z"))
                .count();
            if lingering == 0 {
                break zombies(&d);
            }
            assert!(Instant::now() < deadline, "orphans still running:\n{top}");
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!(
            "zombies after 21 orphaning hooks, {}: {count}",
            if init { "with --init" } else { "no init" }
        );
        counts.push(count);
        let all = logs(&d);
        assert_eq!(all.contains("running as PID 1 with on_refresh hooks"), !init, "{all}");
        docker_ok(&["stop", &d]);
        assert_eq!(inspect(&d, "{{.State.ExitCode}}"), "0");
    }
    assert_eq!(counts[0], 0, "zombies under --init");
    // Without an init they pile up: the count above can tell.
    assert!(counts[1] >= 20, "no init, yet only {} zombies", counts[1]);
}

#[test]
fn compose_runs_the_daemon_and_a_consumer_reads_a_valid_token_through_rotations() {
    let Some(b) = built() else { return };
    let scope = Scope::new("compose");
    let etc = scope.config_dir(&config("", "file_mode = \"0640\""));
    let secret = scope.dir.path().join("kakao_client_secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o444)).unwrap();
    let project = scope.id.replace('-', "");
    let compose = |args: &[&str]| {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(repo())
            .args(["-p", &project, "-f", "compose.yaml", "-f", "docker/compose.test.yaml"])
            .args(args)
            .env("TEST_RUNTIME_IMAGE", RUNTIME)
            .env("TEST_IMAGE", IMAGE)
            .env("TEST_ACCESS_TTL", "4")
            .env("TEST_REFRESH_TTL", "8")
            .env("TEST_CLIENT_SECRET", CLIENT_SECRET)
            .env("TEST_FAKE_KAKAO_BIN", &b.fake_bin)
            .env("TEST_CONFIG_DIR", &etc)
            .env("TEST_SECRET_FILE", &secret);
        cmd
    };
    struct Down<'a>(&'a dyn Fn(&[&str]) -> Command);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down", "-v", "--remove-orphans", "-t", "5"]).output();
        }
    }
    let _down = Down(&compose);
    let run = |args: &[&str]| {
        let out = compose(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let since = now_for_events();
    run(&["up", "-d", "--no-build", "kakao-tokend"]);
    let daemon = format!("{project}_kakao-tokend_1");
    let fake_c = format!("{project}_fake_1");
    assert_eq!(inspect(&daemon, "{{.HostConfig.Init}}"), "true");
    assert_eq!(inspect(&daemon, "{{.HostConfig.ReadonlyRootfs}}"), "true");
    let grace: u64 = inspect(&daemon, "{{.Config.StopTimeout}}").parse().unwrap();
    assert!(
        grace >= 5 + 30,
        "stop_grace_period {grace}s is not above request_timeout (30s) + 5s"
    );
    let fake = Fake {
        addr: format!("{}:8080", ip(&fake_c)),
    };
    LogStream::follow(&fake_c).wait_line(|l| l.contains("fake-kakao listening"));
    login_by_paste(&daemon, &fake, "me");
    wait_health(&daemon, &since, "healthy");

    // The consumer joins the token files' group and reads every 100 ms through two rotations.
    let rotations = fake.stats()["rotations"].as_u64().unwrap();
    run(&["up", "-d", "--no-build", "bot"]);
    let bot = format!("{project}_bot_1");
    LogStream::follow(&bot).wait_line(|l| l.contains("new_token"));
    fake.wait("rotations", rotations + 2);
    docker_ok(&["stop", &bot]);
    let out = logs(&bot);
    let summary: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("summary").cloned())
        .unwrap_or_else(|| panic!("no summary from the consumer:\n{out}"));
    eprintln!("consumer through two rotations: {summary}");
    assert_eq!(summary["invalid"], 0, "{out}");
    assert_eq!(summary["unreadable"], 0, "{out}");
    assert!(summary["valid"].as_u64().unwrap() >= 20, "{summary}");
    assert!(summary["tokens"].as_u64().unwrap() >= 3, "{summary}");
    assert_eq!(inspect(&bot, "{{.Config.User}}"), "1000:65532");
    assert_no_secrets("docker logs", &logs(&daemon));
}
