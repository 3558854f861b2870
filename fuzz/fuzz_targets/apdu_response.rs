//! APDU responses: `Response::parse`, the response trace, and the host's
//! handling of what a (hostile) card answers: `Transport::transmit`'s
//! 61xx / 6Cxx chaining and every `WalletClient` and GP call that parses a
//! response. Input: one selector byte (which host call), then the card's
//! raw responses, each u16-length-prefixed (tapline_fuzz::chunks).
#![no_main]

use card::apdu::{Command, Response, trace_response};
use card::cardid::CardId;
use card::gp::session;
use card::transport::Transport;
use card::wallet::client::WalletClient;
use libfuzzer_sys::fuzz_target;
use tapline_fuzz::{ScriptedCard, chunks};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Response::parse(data) {
        assert_eq!(r.to_bytes(), data, "a parsed response re-encodes to its bytes");
    }
    let _ = trace_response(data);
    let Some((&op, rest)) = data.split_first() else { return };
    let mut card = ScriptedCard::new(chunks(rest));
    let _ = match op % 24 {
        0 => card.transmit(&Command::new(0x80, 0xCA, 0x9F, 0x7F).with_le(256)).map(drop).map_err(drop),
        1 => WalletClient::new(&mut card).select().map(drop).map_err(drop),
        2 => WalletClient::new(&mut card).identity().map(drop).map_err(drop),
        3 => WalletClient::new(&mut card).attest(&[7; 32]).map(drop).map_err(drop),
        4 => WalletClient::new(&mut card).generate_wallet_key().map(drop).map_err(drop),
        5 => WalletClient::new(&mut card).wallet_key().map(drop).map_err(drop),
        6 => WalletClient::new(&mut card).sign(&[1; 32]).map(drop).map_err(drop),
        7 => WalletClient::new(&mut card).self_test_kat().map(drop).map_err(drop),
        8 => WalletClient::new(&mut card).self_test_sign(b"vector").map(drop).map_err(drop),
        9 => WalletClient::new(&mut card).self_test_memory(&[1, 2, 3, 4], 512).map(drop).map_err(drop),
        10 => WalletClient::new(&mut card).get_challenge(usize::from(op)).map(drop).map_err(drop),
        11 => WalletClient::new(&mut card).link_primary(&[2; 16], 2).map(drop).map_err(drop),
        12 => WalletClient::new(&mut card).link_backup(&[2; 16], &[0x7F; 300], &[3; 32]).map(drop).map_err(drop),
        13 => WalletClient::new(&mut card).export_to(&CardId([4; 10])).map(drop).map_err(drop),
        14 => WalletClient::new(&mut card).import(&[0x5A; 300]).map(drop).map_err(drop),
        15 => WalletClient::new(&mut card).prove_wallet(&[5; 32]).map(drop).map_err(drop),
        16 => WalletClient::new(&mut card).finalize().map(drop).map_err(drop),
        17 => WalletClient::new(&mut card).abort_bundle().map(drop).map_err(drop),
        18 => WalletClient::new(&mut card).set_access_code(b"123456").map(drop).map_err(drop),
        19 => WalletClient::new(&mut card).verify_access_code(b"123456").map(drop).map_err(drop),
        20 => session::read_cplc(&mut card).map(drop).map_err(drop),
        21 => session::read_identity(&mut card).map(drop).map_err(drop),
        22 => session::select_isd(&mut card).map(drop).map_err(drop),
        _ => card.transmit(&Command::new(0x00, 0xB0, 0, 0).with_le(65_536)).map(drop).map_err(drop),
    };
});
