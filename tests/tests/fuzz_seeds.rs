//! Writes the seed corpora of the fuzz targets that take card-side
//! encodings (fuzz/corpus/{tlv,cert,attestation,bundle,apdu_response}) and
//! the serial fixture protocol's frames (fuzz/corpus/fixture),
//! made with the project's own encoders and demo keys. The test checks the committed seeds are current; rewrite them with
//! `TAPLINE_WRITE_FUZZ_SEEDS=1 cargo test -p tapline-tests --test fuzz_seeds`.

use std::path::{Path, PathBuf};

use card::cardid::CardId;
use card::emu::factory::demo_vendor_ca;
use card::gp::cplc::Cplc;
use card::wallet::bundle::{self, ImportConfirmation, LinkAttestation, TransferRoute, WalletProof};
use card::wallet::cert::Certificate;
use card::wallet::{Attestation, WalletKeyProof, public_key_bytes, sign_digest, wallet_key_digest};
use k256::ecdsa::SigningKey;
use station::fixture::{Command, Frame, PROTOCOL, PowerAction, Reply, codes};
use station::handler::Bin;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
}

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    dir
}

/// Checks the committed seed equals what the encoders make now; with
/// TAPLINE_WRITE_FUZZ_SEEDS=1 writes it instead (after an encoding change).
fn write(target: &str, name: &str, bytes: &[u8]) {
    let path = corpus(target).join(name);
    if std::env::var_os("TAPLINE_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::write(&path, bytes).expect("write seed");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("seed {} missing ({e})", path.display()));
    assert!(
        committed == bytes,
        "seed {} is stale: the encoding changed; rewrite the seeds with TAPLINE_WRITE_FUZZ_SEEDS=1 \
         cargo test -p tapline-tests --test fuzz_seeds",
        path.display()
    );
}

/// u16-length-prefixed chunks (tapline_fuzz::chunks).
fn script(op: u8, responses: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![op];
    for r in responses {
        out.extend_from_slice(&u16::try_from(r.len()).expect("short").to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

fn ok(body: &[u8]) -> Vec<u8> {
    [body, &[0x90, 0x00]].concat()
}

#[test]
fn fuzz_seeds_match_the_encoders() {
    let card_key = key(0x11);
    let card_id = CardId([0x42; 10]);
    let cert = Certificate::issue(&demo_vendor_ca(), card_id, card_key.verifying_key(), 1_700_000_000, 2_000_000_000);
    let cert_bytes = cert.encode();
    write("cert", "demo-ca-certificate", &cert_bytes);
    write("tlv", "certificate", &cert_bytes);

    let wallet = key(0x12);
    let wallet_key = public_key_bytes(wallet.verifying_key());
    let mut att = Attestation {
        card_id,
        counter: 7,
        lifecycle: 0x03,
        firmware_hash: [0xC8; 32],
        wallet_key: Some(wallet_key),
        signature: [0; 64],
    };
    att.signature = sign_digest(&card_key, &att.digest(&[0x42; 32]));
    write("attestation", "attestation-keyed", &att.encode());
    write("tlv", "attestation", &att.encode());
    let bare = Attestation { wallet_key: None, ..att.clone() };
    write("attestation", "attestation-installed", &bare.encode());
    let proof = WalletKeyProof {
        public_key: wallet_key,
        signature: sign_digest(&card_key, &wallet_key_digest(&card_id, &wallet_key)),
    };
    write("attestation", "wallet-key-proof", &proof.encode());

    let (bundle_id, primary_id) = ([0xB0; 16], CardId([1; 10]));
    let (primary, backup) = (key(0x21), key(0x22));
    let mut link = LinkAttestation { card_id, firmware_hash: [0xC8; 32], signature: [0; 64] };
    link.signature = sign_digest(&backup, &link.digest(&bundle_id, &primary_id, &[3; 32]));
    write("bundle", "link-attestation", &[&[0u8][..], &link.encode()].concat());
    let mut conf = ImportConfirmation { card_id, wallet_key, signature: [0; 64] };
    conf.signature = sign_digest(&backup, &conf.digest(&bundle_id, &primary_id));
    write("bundle", "import-confirmation", &[&[1u8][..], &conf.encode()].concat());
    let wp = WalletProof { wallet_key, signature: [0x33; 64] };
    write("bundle", "wallet-proof", &[&[2u8][..], &wp.encode()].concat());
    let route = TransferRoute { bundle_id, from: primary_id, to: card_id };
    let blob = bundle::seal_transfer(&route, &wallet, backup.verifying_key(), &primary, &key(0x23), &[7; 12]);
    write("bundle", "transfer-blob", &[&[3u8][..], &blob.encode()].concat());
    write("tlv", "transfer-blob", &blob.encode());

    let cplc = Cplc::for_card(&card_id, [0x47, 0x90]).encode();
    write("apdu_response", "get-cplc", &script(0, &[&ok(&cplc)]));
    write("apdu_response", "get-cplc-61xx-chain", &script(0, &[&[0x61, 0x10], &ok(&cplc[..16]), &ok(&cplc[16..])]));
    write("apdu_response", "get-cplc-6cxx", &script(0, &[&[0x6C, 0x2D], &ok(&cplc)]));
    write("apdu_response", "identity", &script(2, &[&ok(&cert_bytes)]));
    write("apdu_response", "attest", &script(3, &[&ok(&att.encode())]));
    write("apdu_response", "wallet-key", &script(5, &[&ok(&proof.encode())]));
    write("apdu_response", "wallet-key-absent", &script(5, &[&[0x6A, 0x88]]));
    write("apdu_response", "export", &script(13, &[&ok(&blob.encode())]));
    write("apdu_response", "read-cplc", &script(20, &[&ok(&cplc)]));
    write("apdu_response", "read-identity", &script(21, &[&ok(&cert_bytes)]));

    // TAPLINE-FIXTURE/1: a station's session as the fixture receives it
    // (with a retransmission), and a fixture's answers as the station
    // receives them (with line noise and a sequence-0 complaint).
    let session: String = [
        (1, Command::Hello),
        (2, Command::Feed(0)),
        (3, Command::Eject(0, Bin::Pass)),
        (3, Command::Eject(0, Bin::Pass)),
        (4, Command::Status),
        (5, Command::Power(1, PowerAction::Cycle(500))),
        (6, Command::Eject(3, Bin::Fail)),
        (7, Command::Power(2, PowerAction::Off)),
    ]
    .iter()
    .map(|(seq, c)| Frame::new(*seq, c.to_string()).encode())
    .collect();
    write("fixture", "station-session", session.as_bytes());
    let answers: String = [
        Frame::new(1, format!("{}", Reply::Ok(format!("{PROTOCOL} readers=4 power=yes name=seed")))),
        Frame::new(2, Reply::Ok(String::new()).to_string()),
        Frame::new(0, Reply::err(codes::FRAME, "checksum mismatch").to_string()),
        Frame::new(3, Reply::err(codes::EMPTY, "hopper empty").to_string()),
        Frame::new(4, Reply::Ok("readers=4 hopper=7".into()).to_string()),
    ]
    .iter()
    .map(Frame::encode)
    .collect::<Vec<_>>()
    .join("\x00#noise\n");
    write("fixture", "fixture-answers", answers.as_bytes());
}
