//! Emulated cards behind the REAL pcscd, spoken to by peer PC/SC clients
//! no one here wrote: `scriptor` and `pcsc_scan` (pcsc-tools) and, when
//! installed, `opensc-tool` (opensc).
//!
//! Needs: pcscd running with vpcd readers from scripts/pcscd-vpcd.sh
//! (`scripts/pcscd-vpcd.sh start 2 $TAPLINE_VPCD_PORT`; scripts/test.sh
//! does it), pcsc-tools, and the port base in TAPLINE_VPCD_PORT (default
//! 35963): the test serves the first two readers, ports P and P+1, with the
//! control socket on P-1. A pcscd in the script's private mode is reached
//! through PCSCLITE_CSOCK_NAME, which the clients inherit. Everything runs
//! in one #[test]: the readers and ports are shared.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use card::gp::cplc::Cplc;

const SELECT_ISD: &str = "00 A4 04 00 08 A0 00 00 01 51 00 00 00";
const GET_CPLC: &str = "80 CA 9F 7F 00";

fn port_base() -> u16 {
    match std::env::var("TAPLINE_VPCD_PORT") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("TAPLINE_VPCD_PORT={v:?} is not a port number")),
        Err(_) => rig::vpcd::DEFAULT_PORT_BASE,
    }
}

fn tool(name: &str) -> Command {
    let mut c = Command::new(name);
    c.stdin(Stdio::null());
    c
}

fn have(name: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success())
}

/// The readers pcscd lists, as pcsc_scan -r prints them ("0: NAME"), and
/// pcsc_scan's whole output for error messages.
fn readers() -> (Vec<String>, String) {
    let out = tool("pcsc_scan").arg("-r").output().unwrap_or_else(|e| {
        panic!("pcsc_scan not runnable ({e}): install pcsc-tools (scripts/pcscd-vpcd.sh start installs it)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let names = text
        .lines()
        .filter_map(|l| {
            l.split_once(": ").filter(|(n, _)| n.parse::<u32>().is_ok()).map(|(_, name)| name.trim().to_string())
        })
        .collect();
    (names, text)
}

/// `rig vpcd` as a child process; QUIT on drop, killed if it does not go.
struct Bridge {
    child: Child,
    control: u16,
    output: Arc<Mutex<Vec<String>>>,
}

impl Bridge {
    fn start(base: u16) -> Self {
        let control = base - 1;
        let mut child = Command::new(env!("CARGO_BIN_EXE_rig"))
            .args(["vpcd", "--readers", "2", "--port-base", &base.to_string()])
            .args(["--card-speed", "0", "--cards", "5", "--seed", "42"])
            .args(["--control", &format!("127.0.0.1:{control}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting rig vpcd");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let out = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
            }
        });
        Self { child, control, output }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n")
    }

    /// One control command, one reply line; retried while the bridge is
    /// still opening its control socket.
    fn ask(&mut self, cmd: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match TcpStream::connect(("127.0.0.1", self.control)) {
                Ok(c) => break c,
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("rig vpcd exited ({status}) before its control socket opened:\n{}", self.output());
                    }
                    assert!(Instant::now() < deadline, "control socket 127.0.0.1:{}: {e}", self.control);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut out = conn.try_clone().expect("clone");
        writeln!(out, "{cmd}").expect("send");
        let mut reply = String::new();
        BufReader::new(conn).read_line(&mut reply).expect("reply");
        reply.trim_end().to_string()
    }

    fn status(&mut self) -> String {
        let s = self.ask("STATUS");
        assert!(s.starts_with("OK "), "STATUS: {s}");
        s
    }

    /// The card id STATUS shows present on `port`.
    fn present(&mut self, port: u16) -> Option<String> {
        let s = self.status();
        let prefix = format!("{port}=present:");
        s.split(' ').find_map(|w| w.strip_prefix(&prefix)).map(str::to_string)
    }

    fn quit(mut self) -> String {
        assert_eq!(self.ask("QUIT"), "OK quitting");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "rig vpcd did not exit after QUIT");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The reader thread drains stdout to its end.
        std::thread::sleep(Duration::from_millis(100));
        self.output()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One APDU exchange as scriptor printed it.
#[derive(Debug)]
struct Exchanged {
    response: Vec<u8>,
}

impl Exchanged {
    fn sw(&self) -> u16 {
        let n = self.response.len();
        assert!(n >= 2, "no status word in {:02X?}", self.response);
        u16::from_be_bytes([self.response[n - 2], self.response[n - 1]])
    }
    fn data(&self) -> &[u8] {
        &self.response[..self.response.len() - 2]
    }
}

/// Runs scriptor on `reader` with the APDUs; Err(output) when it could
/// not talk to a card there.
fn scriptor(reader: &str, apdus: &[&str]) -> Result<Vec<Exchanged>, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("apdus");
    std::fs::write(&script, apdus.join("\n") + "\n").expect("script");
    let out = tool("scriptor").arg("-r").arg(reader).arg(&script).output().expect("running scriptor");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // "< 9F 7F 2A ... \n ... 90 00 : Normal processing." per response.
    let mut exchanges = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    for line in text.lines() {
        let body = match (line.strip_prefix("< "), &current) {
            (Some(rest), _) => {
                current = Some(Vec::new());
                rest
            }
            (None, Some(_)) => line,
            (None, None) => continue,
        };
        let (hex_part, end) = match body.split_once(" : ") {
            Some((h, _)) => (h, true),
            None => (body, false),
        };
        let bytes = hex::decode(hex_part.split_whitespace().collect::<String>())
            .map_err(|e| format!("scriptor printed {line:?}: {e}\n{text}"))?;
        if let Some(c) = current.as_mut() {
            c.extend(bytes);
        }
        if end {
            exchanges.push(Exchanged { response: current.take().unwrap_or_default() });
        }
    }
    if exchanges.len() == apdus.len() { Ok(exchanges) } else { Err(text) }
}

/// SELECT the card manager, read CPLC: both 9000, CPLC 45 bytes.
fn read_cplc(reader: &str) -> Result<Cplc, String> {
    let ex = scriptor(reader, &[SELECT_ISD, GET_CPLC])?;
    assert_eq!(ex[0].sw(), 0x9000, "SELECT card manager on {reader}");
    assert_eq!(ex[1].sw(), 0x9000, "GET DATA CPLC on {reader}");
    assert_eq!(ex[1].data().len(), 45, "CPLC with its 9F7F 2A header on {reader}");
    Ok(Cplc::parse(ex[1].data()).expect("a CPLC"))
}

/// Polls `read_cplc` until it succeeds (pcscd notices an insertion within
/// about 0.5 s).
fn wait_for_card(reader: &str, within: Duration) -> (Cplc, Duration) {
    let t = Instant::now();
    loop {
        match read_cplc(reader) {
            Ok(c) => return (c, t.elapsed()),
            Err(out) => assert!(t.elapsed() < within, "no card answered on {reader} within {within:?}:\n{out}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until scriptor finds no card on `reader`.
fn wait_until_empty(reader: &str, within: Duration) {
    let t = Instant::now();
    loop {
        match scriptor(reader, &[GET_CPLC]) {
            Err(out) if out.contains("No smartcard inserted") => return,
            other => assert!(t.elapsed() < within, "{reader} still has a card after {within:?}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// opensc-tool's "Received (SW1=0x90, SW2=0x00):" blocks, with their data.
fn opensc_send(reader: &str, apdus: &[&str]) -> Vec<(u16, Vec<u8>)> {
    let mut cmd = tool("opensc-tool");
    // -c default: skip opensc's card-driver probing (dozens of APDUs).
    cmd.args(["--reader", reader, "-c", "default"]);
    for a in apdus {
        cmd.args(["--send-apdu", &a.replace(' ', ":")]);
    }
    let out = cmd.output().expect("running opensc-tool");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut answers: Vec<(u16, Vec<u8>)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Received (SW1=0x") {
            let sw1 = u8::from_str_radix(&rest[..2], 16).expect("SW1");
            let sw2 = u8::from_str_radix(&rest[10..12], 16).expect("SW2");
            answers.push((u16::from_be_bytes([sw1, sw2]), Vec::new()));
        } else if let Some((_, data)) = answers.last_mut() {
            // "9F 7F 2A 47 ... ..*G" : hex columns (16 x 3 chars), then ASCII.
            let hex_cols: String = line.chars().take(48).collect();
            data.extend(hex::decode(hex_cols.split_whitespace().collect::<String>()).unwrap_or_default());
        }
    }
    assert_eq!(answers.len(), apdus.len(), "opensc-tool on {reader}:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    answers
}

#[test]
fn emulated_cards_answer_peer_pcsc_clients_through_pcscd() {
    let base = port_base();
    let names = [rig::vpcd::reader_name(base, base), rig::vpcd::reader_name(base, base + 1)];
    let (listed, scan) = readers();
    for name in &names {
        assert!(
            listed.contains(name),
            "no PC/SC reader {name:?}: start pcscd with vpcd readers first: scripts/pcscd-vpcd.sh start 2 {base} \
             (export PCSCLITE_CSOCK_NAME too if you started it in private mode; TAPLINE_VPCD_PORT sets the \
             port base, default {}). pcsc_scan -r said:\n{scan}",
            rig::vpcd::DEFAULT_PORT_BASE
        );
        assert_eq!(rig::vpcd::port_of_reader(name), Some(if name == &names[0] { base } else { base + 1 }));
    }
    let t0 = Instant::now();
    let mut bridge = Bridge::start(base);

    // Both readers get a card; scriptor reads CPLC on each, and the chip
    // identity in it is the card the bridge says it put there.
    let mut cplcs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (cplc, _) = wait_for_card(name, Duration::from_secs(10));
        let port = base + i as u16;
        assert_eq!(Some(cplc.card_id().to_hex()), bridge.present(port), "card on {name}");
        cplcs.push(cplc);
    }
    assert_ne!(cplcs[0].card_id(), cplcs[1].card_id());

    if have("opensc-tool") {
        let answers = opensc_send(&names[1], &[SELECT_ISD, GET_CPLC]);
        assert_eq!(answers[0].0, 0x9000, "opensc-tool SELECT");
        assert_eq!(answers[1].0, 0x9000, "opensc-tool GET DATA");
        assert_eq!(answers[1].1.len(), 45);
        assert_eq!(Cplc::parse(&answers[1].1).expect("CPLC").card_id(), cplcs[1].card_id());
    } else {
        eprintln!("opensc-tool not installed (Debian package opensc): its part of this test is skipped");
    }

    // EJECT: the card goes to the PASS bin and the next one from the hopper
    // appears on the same reader after the re-insertion gap.
    let reply = bridge.ask(&format!("EJECT {base} PASS"));
    assert!(reply.starts_with(&format!("OK {base}: card {} binned PASS; next card", cplcs[0].card_id())), "{reply}");
    let t = Instant::now();
    wait_until_empty(&names[0], Duration::from_secs(3));
    let (next, _) = wait_for_card(&names[0], Duration::from_secs(10));
    let appeared = t.elapsed();
    assert_ne!(next.card_id(), cplcs[0].card_id(), "a new card after EJECT");
    assert!(reply.contains(&next.card_id().to_hex()), "the card EJECT announced: {reply}");
    assert!(appeared >= Duration::from_millis(1000), "next card only after the gap: {appeared:?}");
    assert!(appeared < Duration::from_secs(4), "next card took {appeared:?}");
    eprintln!("after EJECT the next card answered on {} in {appeared:?}", names[0]);

    // REMOVE: the reader goes empty; INSERT puts the same card back.
    let reply = bridge.ask(&format!("REMOVE {}", base + 1));
    assert_eq!(reply, format!("OK {}: card {} pulled out", base + 1, cplcs[1].card_id()));
    wait_until_empty(&names[1], Duration::from_secs(3));
    assert!(bridge.status().contains(&format!("{}=pulled:{}", base + 1, cplcs[1].card_id())));
    assert!(bridge.ask(&format!("INSERT {}", base + 1)).starts_with("OK "));
    let (back, _) = wait_for_card(&names[1], Duration::from_secs(10));
    assert_eq!(back.card_id(), cplcs[1].card_id(), "INSERT puts the pulled card back");

    assert!(bridge.ask(&format!("EJECT {} maybe", base)).starts_with("ERR "));
    let summary = bridge.quit();
    assert!(summary.contains("binned 1 PASS, 0 FAIL"), "{summary}");
    assert!(summary.contains(&format!("port {base}: card {} (genuine) inserted", cplcs[0].card_id())), "{summary}");
    eprintln!("vpcd + pcscd round trip took {:?}", t0.elapsed());
}
