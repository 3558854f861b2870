//! The terminal dashboard as an operator sees it: the real `station`
//! binary in a detached tmux session (100x30; the line view at 80x24), read with `capture-pane`,
//! driven with `send-keys`. Needs tmux (scripts/test.sh installs it); each
//! test uses its own tmux server socket and kills it even when failing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A private tmux server with one session; killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(tag: &str, command: &str) -> Tmux {
        Self::start_sized(tag, command, 100, 30)
    }

    fn start_sized(tag: &str, command: &str, width: u16, height: u16) -> Tmux {
        match Command::new("tmux").arg("-V").output() {
            Ok(o) if o.status.success() => {}
            _ => panic!(
                "tmux is not installed: this test drives the real dashboard in tmux \
                 (install it: apt-get install tmux, or run scripts/test.sh which does)"
            ),
        }
        let t = Tmux { socket: format!("tapline-{tag}-{}", std::process::id()) };
        // The pane stays after the command ends, showing its exit code.
        let script = format!("{command}; echo EXIT=$?; sleep 600");
        let o = t.tmux(
            &[
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-s",
                "main",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
            ],
            &["-c", repo().to_str().expect("utf8 path"), &script],
        );
        assert!(o.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&o.stderr));
        t
    }

    fn tmux(&self, args: &[&str], more: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).args(more).output().expect("tmux runs")
    }

    fn screen(&self) -> String {
        let o = self.tmux(&["capture-pane", "-p", "-t", "main"], &[]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let o = self.tmux(&["send-keys", "-t", "main", keys], &[]);
        assert!(o.status.success(), "send-keys {keys}: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// Waits until the screen satisfies `ok`; fails with the last screen.
    fn wait(&self, what: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            if Instant::now() > end {
                panic!("timed out after {secs} s waiting for {what}; the screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"], &[]);
    }
}

/// A big state word, plain in a lane row or letter-spaced in a lane tile.
fn shows_state(screen: &str, word: &str) -> bool {
    let spaced: String = word.chars().map(|c| c.to_string()).collect::<Vec<_>>().join(" ");
    screen.contains(word) || screen.contains(&spaced)
}

fn dashboard_complete(s: &str, station: &str) -> bool {
    s.contains(&format!("station {station}"))
        && ["emu-00", "emu-01", "emu-02", "emu-03", "Batch", "Failures by step", "Events", "cards/h", "1st pass"]
            .iter()
            .all(|w| s.contains(w))
        && ["WORKING", "INSERT CARD", "WAITING FOR PAIRING", "PASS", "REMOVE CARD"].iter().any(|w| shows_state(s, w))
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn station_run_shows_the_dashboard_and_obeys_pause_and_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = format!(
        "{} run --profile profiles/demo.yaml --sim 4 --cards 24 --card-speed 0.3 --seed 3 --station-id tmux-st \
         --ledger {} --report-dir {} --log-file {}",
        quote(Path::new(env!("CARGO_BIN_EXE_station"))),
        quote(&dir.path().join("l.db")),
        quote(&dir.path().join("report")),
        quote(&dir.path().join("station.log")),
    );
    let t = Tmux::start("run", &cmd);
    let s = t.wait("the dashboard with all panels", 30, |s| dashboard_complete(s, "tmux-st"));
    assert!(s.contains("RUNNING"), "{s}");
    // Pause the selected (first) reader: it finishes its card, then shows PAUSED.
    t.keys("p");
    t.wait("the pause reply", 10, |s| s.contains("emu-00 paused"));
    t.wait("emu-0 PAUSED", 40, |s| shows_state(s, "PAUSED"));
    // Drain asks first.
    t.keys("d");
    t.wait("the drain question", 10, |s| s.contains("Drain the station"));
    t.keys("y");
    let s = t.wait("the end of the drained batch", 60, |s| s.contains("Batch over") || s.contains("EXIT="));
    if s.contains("Batch over") {
        t.keys("Enter");
    }
    let s = t.wait("the summary after the dashboard", 30, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
    assert!(s.contains("summary:") && s.contains("passed:"), "the summary prints after the screen:\n{s}");
    assert!(!s.contains("Failures by step"), "the alternate screen is left:\n{s}");
}

/// The headless station with the API; killed on drop.
struct Station(Child);

impl Drop for Station {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn station_dash_connect_shows_a_running_station_from_another_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let token = "tmux-test-token-0123456789";
    let mut station = Station(
        Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["run", "--profile", "profiles/demo.yaml", "--sim", "4", "--cards", "40", "--card-speed", "0.3"])
            .args(["--seed", "4", "--station-id", "remote-st", "--headless", "--token", "env:TAPLINE_TEST_TOKEN"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ledger")
            .arg(dir.path().join("l.db"))
            .arg("--report-dir")
            .arg(dir.path().join("report"))
            .env("TAPLINE_TEST_TOKEN", token)
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("station runs"),
    );
    let cmd = format!(
        "TAPLINE_TEST_TOKEN={token} {} dash --connect 127.0.0.1:{port} --token env:TAPLINE_TEST_TOKEN",
        quote(Path::new(env!("CARGO_BIN_EXE_station")))
    );
    let t = Tmux::start("connect", &cmd);
    let s = t.wait("the remote station's dashboard", 30, |s| dashboard_complete(s, "remote-st"));
    assert!(s.contains(&format!("remote 127.0.0.1:{port}")), "{s}");
    // Actions go over the API.
    t.keys("p");
    t.wait("the pause reply from the station", 10, |s| s.contains("emu-00 paused"));
    t.wait("emu-0 PAUSED", 40, |s| shows_state(s, "PAUSED"));
    t.keys("d");
    t.wait("the drain question", 10, |s| s.contains("Drain the station"));
    t.keys("y");
    t.wait("DRAINING from the station", 10, |s| s.contains("DRAINING") || s.contains("IDLE"));
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = station.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < end, "the drained station did not end; the dashboard:\n{}", t.screen());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "station run: {status}");
    // The station is gone: the dashboard says so and keeps the last state.
    let s = t.wait("connection lost", 15, |s| s.contains("CONNECTION LOST"));
    assert!(s.contains("emu-00"), "{s}");
    t.keys("q");
    let s = t.wait("the dashboard to detach", 10, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}

#[test]
fn station_dash_connect_watches_a_daemon_between_and_during_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = dir.path().join("station.yaml");
    std::fs::write(
        &config,
        format!(
            "station_id: daemon-st\nlisten: 127.0.0.1:{port}\nledger: ledger.db\nreaders:\n  sim:\n    readers: 4\n    \
             card_speed: 0.3\n    seed: 5\nprofiles:\n  demo: {}\n",
            repo().join("profiles/demo.yaml").canonicalize().expect("profile").display()
        ),
    )
    .expect("config");
    let mut daemon = Station(
        Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["daemon", "--config"])
            .arg(&config)
            .arg("--log-file")
            .arg(dir.path().join("daemon.log"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("daemon runs"),
    );
    let cmd = format!("{} dash --connect 127.0.0.1:{port}", quote(Path::new(env!("CARGO_BIN_EXE_station"))));
    let t = Tmux::start("daemon", &cmd);
    // Between batches the daemon shows its readers idle.
    let s = t.wait("the idle daemon", 30, |s| s.contains("station daemon-st") && s.contains("IDLE"));
    assert!(s.contains("emu-00") && s.contains("emu-03"), "{s}");
    // A batch started over the API shows up live.
    let started = ureq::post(format!("http://127.0.0.1:{port}/api/actions"))
        .send(r#"{"action":"start_batch","profile":"demo","name":"tmux-lot"}"#)
        .expect("start");
    assert_eq!(started.status().as_u16(), 200);
    t.wait("the daemon's batch on the dashboard", 30, |s| dashboard_complete(s, "daemon-st") && s.contains("tmux-lot"));
    t.wait("cards passing", 60, |s| s.contains("PASS "));
    // Drained from the dashboard: the daemon goes back to idle and stays up.
    t.keys("d");
    t.wait("the drain question", 10, |s| s.contains("Drain the station"));
    t.keys("y");
    t.wait("the daemon idle again", 60, |s| s.contains("IDLE") && s.contains("finished"));
    assert!(daemon.0.try_wait().expect("wait").is_none(), "the daemon keeps running between batches");
    let ok = Command::new("kill").args(["-TERM", &daemon.0.id().to_string()]).status().expect("kill");
    assert!(ok.success());
    t.wait("connection lost after SIGTERM", 30, |s| s.contains("CONNECTION LOST"));
    t.keys("q");
    let s = t.wait("the dashboard to detach", 10, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `station run --listen` on emulated readers, headless, as station `id`.
fn listening_station(dir: &Path, id: &str, port: u16, seed: &str) -> Station {
    Station(
        Command::new(env!("CARGO_BIN_EXE_station"))
            .args(["run", "--profile", "profiles/demo.yaml", "--sim", "4", "--cards", "400", "--card-speed", "0.3"])
            .args(["--seed", seed, "--station-id", id, "--headless"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--ledger")
            .arg(dir.join(format!("{id}.db")))
            .arg("--report-dir")
            .arg(dir.join(format!("{id}-report")))
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("station runs"),
    )
}

/// The PASS figure of station `row` ("1 line-a") in the line summary.
fn passed_in_summary(screen: &str, row: &str) -> Option<u64> {
    screen.lines().filter(|l| l.contains(row)).find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mode = words.iter().position(|w| ["RUNNING", "DRAINING", "STOPPING", "IDLE"].contains(w))?;
        words.get(mode + 1)?.parse().ok()
    })
}

#[test]
fn station_dash_watches_a_line_of_stations_with_one_unreachable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb, nobody) = (free_port(), free_port(), free_port());
    let _a = listening_station(dir.path(), "line-a", pa, "11");
    let mut b = listening_station(dir.path(), "line-b", pb, "12");
    // Three stations at 80x24: two real ones (one given as a URL) and an
    // address where nothing listens.
    let cmd = format!(
        "{} dash --connect 127.0.0.1:{pa} --connect http://127.0.0.1:{pb}/ --connect 127.0.0.1:{nobody}",
        quote(Path::new(env!("CARGO_BIN_EXE_station")))
    );
    let t = Tmux::start_sized("line", &cmd, 80, 24);
    let s = t.wait("the line summary with both stations passing cards", 60, |s| {
        s.contains("0 LINE")
            && s.contains("UNREACHABLE")
            && s.contains("2/3 up")
            && passed_in_summary(s, "1 line-a").is_some_and(|n| n > 0)
            && passed_in_summary(s, "2 line-b").is_some_and(|n| n > 0)
    });
    assert!(s.contains("LINE") && s.contains("Failures across the line") && s.contains("BUSY/IDLE"), "{s}");
    assert!(s.contains(&format!("127.0.0.1:{nobody}")), "the unreachable station by its address:\n{s}");

    // Tabs: 1 is line-a's own dashboard, Tab the next station, 0 the summary.
    t.keys("1");
    t.wait("line-a's tab", 15, |s| s.contains("station line-a") && s.contains("Lanes") && s.contains("emu-00"));
    t.keys("Tab");
    t.wait("line-b's tab", 15, |s| s.contains("station line-b") && s.contains("emu-00"));
    // A station tab's keys go to that station: pause its first reader.
    t.keys("p");
    t.wait("line-b's pause reply", 10, |s| s.contains("emu-00 paused"));
    t.keys("Tab");
    t.wait("the unreachable station's tab", 15, |s| s.contains("CONNECTION LOST") && s.contains("connecting…"));
    t.keys("0");
    t.wait("the summary again", 15, |s| s.contains("Failures across the line"));

    // line-b goes away: the summary says so and line-a keeps counting.
    let _ = b.0.kill();
    let _ = b.0.wait();
    let s = t.wait("line-b lost", 20, |s| {
        s.lines().any(|l| l.contains("2 line-b") && l.contains("LOST")) && s.contains("1/3 up")
    });
    let before = passed_in_summary(&s, "1 line-a").expect("line-a's figure");
    t.wait("line-a still updating", 60, |s| passed_in_summary(s, "1 line-a").is_some_and(|n| n > before));
    // The help lists the tab keys.
    t.keys("?");
    t.wait("the help", 10, |s| s.contains("Tab ⇧Tab") && s.contains("Enter"));
    t.keys("Escape");
    t.keys("q");
    let s = t.wait("the dashboard to detach", 10, |s| s.contains("EXIT="));
    assert!(s.contains("EXIT=0"), "{s}");
}
