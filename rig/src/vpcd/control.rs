//! The bridge's control socket: a line protocol on loopback TCP through
//! which an operator (or the station's card handler, or a test) feeds and
//! bins the emulated cards. ASCII, one command per line, one reply line
//! each, `OK ...` or `ERR reason` (docs/real-readers.md):
//!
//! ```text
//! EJECT <port> PASS|FAIL   the card is done: bin it; the next hopper card follows after the gap
//! REMOVE <port>            pull the card out without a verdict; it is kept aside
//! INSERT <port>            put the pulled card back, or else the next hopper card
//! STATUS                   OK <port>=present:<id>|arriving:<id>|pulled:<id>|empty ... hopper=N pass=N fail=N
//! QUIT                     OK quitting; the bridge takes the cards out, prints its summary and exits
//! ```
//!
//! It owns only the parsing and the socket; the feeder does the work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::mpsc::Sender;

use super::feeder::{Feeder, Verdict};

/// Longest command line accepted.
const MAX_LINE: u64 = 1024;

const HELP: &str = "commands: EJECT <port> PASS|FAIL, REMOVE <port>, INSERT <port>, STATUS, QUIT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlCommand {
    Eject(u16, Verdict),
    Remove(u16),
    Insert(u16),
    Status,
    Quit,
}

impl FromStr for ControlCommand {
    type Err = String;

    /// Command words and verdicts are case-insensitive.
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let Some(first) = words.first() else {
            return Err(format!("empty command; {HELP}"));
        };
        let port = |w: Option<&&str>| -> Result<u16, String> {
            let w = w.ok_or_else(|| format!("{} needs a port; {HELP}", first.to_ascii_uppercase()))?;
            w.parse().map_err(|_| format!("{w:?} is not a port number"))
        };
        let cmd = match first.to_ascii_uppercase().as_str() {
            "EJECT" => {
                let p = port(words.get(1))?;
                let verdict = match words.get(2).map(|w| w.to_ascii_uppercase()).as_deref() {
                    Some("PASS") => Verdict::Pass,
                    Some("FAIL") => Verdict::Fail,
                    _ => return Err("EJECT needs a verdict: EJECT <port> PASS|FAIL".into()),
                };
                Self::Eject(p, verdict)
            }
            "REMOVE" => Self::Remove(port(words.get(1))?),
            "INSERT" => Self::Insert(port(words.get(1))?),
            "STATUS" => Self::Status,
            "QUIT" => Self::Quit,
            other => return Err(format!("unknown command {other:?}; {HELP}")),
        };
        let expected = match cmd {
            Self::Eject(..) => 3,
            Self::Remove(_) | Self::Insert(_) => 2,
            Self::Status | Self::Quit => 1,
        };
        if words.len() > expected {
            return Err(format!("unexpected {:?} after the command; {HELP}", words[expected..].join(" ")));
        }
        Ok(cmd)
    }
}

/// Runs one command on the feeder; the reply line without its newline.
pub fn execute(feeder: &Feeder, cmd: ControlCommand) -> String {
    let ms = |d: std::time::Duration| d.as_millis();
    let reply = match cmd {
        ControlCommand::Eject(port, verdict) => feeder.eject(port, verdict).map(|e| match e.next {
            Some((next, after)) => {
                format!("OK {port}: card {} binned {verdict}; next card {next} in {} ms", e.card, ms(after))
            }
            None => format!("OK {port}: card {} binned {verdict}; hopper empty", e.card),
        }),
        ControlCommand::Remove(port) => feeder.remove(port).map(|id| format!("OK {port}: card {id} pulled out")),
        ControlCommand::Insert(port) => {
            feeder.insert(port).map(|(id, after)| format!("OK {port}: card {id} in {} ms", ms(after)))
        }
        ControlCommand::Status => Ok(format!("OK {}", feeder.status())),
        ControlCommand::Quit => Ok("OK quitting".to_string()),
    };
    reply.unwrap_or_else(|e| format!("ERR {e}"))
}

/// Accepts control connections for ever, one thread each. A QUIT is
/// answered, then reported on `quit`.
pub fn serve(listener: TcpListener, feeder: Feeder, quit: Sender<()>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let feeder = feeder.clone();
        let quit = quit.clone();
        let _ = std::thread::Builder::new().name("vpcd-control".into()).spawn(move || {
            let _ = session(conn, &feeder, &quit);
        });
    }
}

fn session(conn: TcpStream, feeder: &Feeder, quit: &Sender<()>) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut input = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut input).take(MAX_LINE + 1).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_LINE {
            writeln!(out, "ERR line longer than {MAX_LINE} bytes")?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let (reply, is_quit) = match line.parse::<ControlCommand>() {
            Ok(cmd) => (execute(feeder, cmd), cmd == ControlCommand::Quit),
            Err(e) => (format!("ERR {e}"), false),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
        if is_quit {
            let _ = quit.send(());
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_explains_mistakes() {
        assert_eq!("EJECT 35963 PASS".parse(), Ok(ControlCommand::Eject(35963, Verdict::Pass)));
        assert_eq!("eject 35964 fail\n".parse(), Ok(ControlCommand::Eject(35964, Verdict::Fail)));
        assert_eq!(" REMOVE 35963 ".parse(), Ok(ControlCommand::Remove(35963)));
        assert_eq!("INSERT 35963".parse(), Ok(ControlCommand::Insert(35963)));
        assert_eq!("STATUS".parse(), Ok(ControlCommand::Status));
        assert_eq!("QUIT\r\n".parse(), Ok(ControlCommand::Quit));
        let err = |s: &str| s.parse::<ControlCommand>().expect_err(s);
        assert!(err("EJECT 35963").contains("PASS|FAIL"));
        assert!(err("EJECT 35963 MAYBE").contains("PASS|FAIL"));
        assert!(err("REMOVE").contains("needs a port"));
        assert!(err("REMOVE 99999").contains("not a port"));
        assert!(err("STATUS now").contains("unexpected"));
        assert!(err("FLY 1").contains("unknown command"));
        assert!(err("").contains("empty"));
    }

    #[test]
    fn serves_lines_over_tcp() {
        use std::sync::Arc;
        use std::time::Duration;

        use super::super::feeder::FeederConfig;

        // Nothing listens on the slot's port: the card waits for vpcd.
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let config = FeederConfig {
            port_base: port,
            readers: 1,
            speed: 0.0,
            mute_timeout: Duration::from_millis(100),
            reinsert_gap: Duration::from_millis(50),
        };
        let feeder = Feeder::start(config, Vec::new(), Arc::new(|_: &str| {}));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = std::sync::mpsc::channel();
        let f = feeder.clone();
        std::thread::spawn(move || serve(listener, f, tx));
        let conn = TcpStream::connect(addr).expect("connect");
        let mut out = conn.try_clone().expect("clone");
        let mut lines = BufReader::new(conn).lines();
        let mut ask = |cmd: &str| {
            writeln!(out, "{cmd}").expect("send");
            lines.next().expect("a reply").expect("a line")
        };
        assert_eq!(ask("STATUS"), format!("OK {port}=empty hopper=0 pass=0 fail=0"));
        assert_eq!(ask("INSERT 1"), "ERR no slot on port 1");
        assert_eq!(ask("INSERT"), format!("ERR INSERT needs a port; {HELP}"));
        assert_eq!(ask(&format!("INSERT {port}")), "ERR the hopper is empty");
        assert!(ask("BOGUS").starts_with("ERR unknown command"));
        assert_eq!(ask("QUIT"), "OK quitting");
        rx.recv_timeout(Duration::from_secs(5)).expect("quit reported");
        feeder.shutdown();
    }
}
