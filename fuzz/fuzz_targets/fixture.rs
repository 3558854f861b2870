//! The serial fixture protocol TAPLINE-FIXTURE/1 (station::fixture,
//! docs/fixtures.md) on both ends of the line. The input is what arrives on
//! the serial port, however broken:
//!
//! - the station's side: split into lines the way `fixture::serial` reads
//!   them (up to LF, at most `MAX_LINE` bytes), each through
//!   `Frame::decode`, and a decoded body through `Reply::parse` (and
//!   `Command::from_str`). A decoded frame must encode to a line that
//!   decodes to the same frame, and a parsed reply or command must print as
//!   text that parses to the same value;
//! - the fixture's side: the whole input served by the rig's
//!   `EmulatedFixture` (over an in-memory port) with a backend that only
//!   counts, and every line it answers must be a frame that decodes.
#![no_main]

use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use rig::fixture::{EmulatedFixture, FaultScript, FixtureBackend};
use station::fixture::{Command, Frame, MAX_LINE, PowerAction, Reply};
use station::handler::Bin;
use tapline_fuzz as _;

/// A fixture backend that answers without acting (no sleeping on POWER
/// CYCLE: what the fuzzer exercises is the protocol, not the relays).
struct Counting {
    feeds: usize,
}

impl FixtureBackend for Counting {
    fn readers(&self) -> usize {
        4
    }
    fn has_power(&self) -> bool {
        true
    }
    fn feed(&mut self, _reader: usize) -> Reply {
        self.feeds += 1;
        if self.feeds % 3 == 0 { Reply::err("EMPTY", "hopper empty") } else { Reply::Ok(String::new()) }
    }
    fn eject(&mut self, _reader: usize, _bin: Bin) -> Reply {
        Reply::Ok(String::new())
    }
    fn status(&mut self) -> Reply {
        Reply::Ok("readers=4 hopper=7".into())
    }
    fn power(&mut self, _reader: usize, _action: PowerAction) -> Reply {
        Reply::Ok(String::new())
    }
}

/// The port as the fixture sees it: reads come from the input, writes are kept.
struct Port<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Port<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Port<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines of `data` as the station's reader cuts them.
fn lines(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let end = match data.iter().position(|&b| b == b'\n') {
            Some(i) if i <= MAX_LINE => i + 1,
            _ => data.len().min(MAX_LINE + 1),
        };
        out.push(&data[..end]);
        data = &data[end..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    for line in lines(data) {
        let Ok(frame) = Frame::decode(line) else { continue };
        let again = Frame::decode(frame.encode().as_bytes());
        assert_eq!(again.as_ref(), Ok(&frame), "a decoded frame re-encodes to itself");
        if let Some(reply) = Reply::parse(&frame.body) {
            assert_eq!(Reply::parse(&reply.to_string()), Some(reply), "a reply prints as it parses");
        }
        if let Ok(cmd) = frame.body.parse::<Command>() {
            assert_eq!(cmd.to_string().parse::<Command>(), Ok(cmd), "a command prints as it parses");
        }
    }

    let fixture = EmulatedFixture::new(Box::new(Counting { feeds: 0 }), FaultScript::default());
    let mut port = Port { input: data, written: Vec::new() };
    fixture.serve(&mut port);
    for answer in port.written.split_inclusive(|&b| b == b'\n') {
        assert!(Frame::decode(answer).is_ok(), "the fixture answered a line that is no frame: {answer:?}");
    }
});
