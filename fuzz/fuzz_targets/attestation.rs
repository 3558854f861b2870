//! ATTEST responses and wallet key proofs as the host receives them: the
//! parsers, then the checks the recipe makes (the card key's signature over
//! the challenge digest, the wallet key proof's signature), and the same
//! bytes through `WalletClient::attest` behind a scripted card.
#![no_main]

use card::transport::Transport;
use card::wallet::client::WalletClient;
use card::wallet::{Attestation, WalletKeyProof, verify_digest};
use libfuzzer_sys::fuzz_target;
use tapline_fuzz::{ScriptedCard, key};

fuzz_target!(|data: &[u8]| {
    let card_key = key(0x11);
    let challenge = [0x42; 32];
    if let Ok(att) = Attestation::parse(data) {
        assert_eq!(att.encode(), data, "only the canonical encoding parses");
        let _ = verify_digest(card_key.verifying_key(), &att.digest(&challenge), &att.signature);
        let _ = card::wallet::Lifecycle::from_byte(att.lifecycle);
    }
    if let Ok(proof) = WalletKeyProof::parse(data) {
        assert_eq!(proof.encode(), data, "only the canonical encoding parses");
        let _ = proof.verify(&card::cardid::CardId([1; 10]), card_key.verifying_key());
    }
    // The client's path: the input plus 90 00 as the card's answer.
    let response = [data, &[0x90, 0x00][..]].concat();
    let mut card = ScriptedCard::new(vec![&response]);
    let _ = WalletClient::new(&mut card).attest(&challenge);
    let _ = card.reset();
});
