//! vpcd's wire protocol on the card's side (rig::vpcd::VpcdCard): the
//! input is what vpcd sends (length-prefixed control codes and command
//! APDUs, however malformed), written to a real loopback connection and
//! half-closed; the emulated card serves messages until the connection
//! ends, the card leaves or goes mute. Answers are drained by a reader
//! thread so a long script never blocks on a full socket.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

use card::emu::CardFaults;
use card::emu::factory::{ChipFactory, ChipKind};
use libfuzzer_sys::fuzz_target;
use rig::vpcd::{Served, VpcdCard};

fn listener() -> &'static TcpListener {
    static L: OnceLock<TcpListener> = OnceLock::new();
    L.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
}

fuzz_target!(|data: &[u8]| {
    let l = listener();
    let card_side = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (mut vpcd_side, _) = l.accept().expect("accept");
    let card = ChipFactory::new(7).make(ChipKind::Genuine, CardFaults::default());
    let mut vc = VpcdCard::new(card_side, card, 0.0);
    let mut reader = vpcd_side.try_clone().expect("clone");
    reader.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
        sink.len()
    });
    vpcd_side.write_all(data).expect("write to the card");
    vpcd_side.shutdown(Shutdown::Write).expect("half-close");
    loop {
        match vc.serve_one() {
            Served::Control(_) | Served::Answered => {}
            Served::Closed | Served::Removed | Served::Reset | Served::Mute => break,
        }
    }
    vc.close();
    let _ = drain.join();
});
