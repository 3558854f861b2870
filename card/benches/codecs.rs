//! Micro-benchmarks of the hot codecs (criterion): APDU and BER-TLV encode
//! and decode, SCP03 wrap/unwrap, the CAP load-file build. Built only by
//! `cargo bench -p card --features bench` (criterion stays out of the test
//! run).

use std::hint::black_box;

use card::apdu::{Command, Response};
use card::cap::{CapBuilder, CapFile};
use card::gp::keys::StaticKeys;
use card::gp::scp03::{CardChannel, HostChannel, InitUpdateResponse, SecurityLevel};
use card::sw::StatusWord;
use card::tlv;
use criterion::{Criterion, criterion_group, criterion_main};

fn apdu(c: &mut Criterion) {
    let load = Command::new(0x80, 0xE8, 0x00, 0x01).with_data(vec![0xA5; 231]);
    let raw = load.to_bytes().expect("encodes");
    c.bench_function("apdu/encode LOAD 231 B", |b| b.iter(|| black_box(&load).to_bytes()));
    c.bench_function("apdu/decode LOAD 231 B", |b| b.iter(|| Command::parse(black_box(&raw))));
    let resp = Response::new(vec![0x5A; 64], StatusWord::OK).to_bytes();
    c.bench_function("apdu/decode response 64 B", |b| b.iter(|| Response::parse(black_box(&resp))));
}

fn tlvs(c: &mut Criterion) {
    let mut inner = Vec::new();
    for i in 0..8u32 {
        tlv::encode(0x80 + i, &[i as u8; 20], &mut inner);
    }
    let doc = tlv::tlv(0x7F21, &inner);
    c.bench_function("tlv/encode 8 children", |b| {
        b.iter(|| {
            let mut v = Vec::new();
            for i in 0..8u32 {
                tlv::encode(0x80 + i, &[i as u8; 20], &mut v);
            }
            tlv::tlv(0x7F21, &v)
        })
    });
    c.bench_function("tlv/decode 8 children", |b| {
        b.iter(|| {
            let (t, _) = tlv::parse_one(black_box(&doc)).expect("parses");
            t.children().expect("children").len()
        })
    });
}

fn scp03(c: &mut Criterion) {
    let keys = StaticKeys::gp_default();
    let hc = [0x11; 8];
    let cc = [0x22; 8];
    let mut card = CardChannel::new(&keys, 0x30, &hc, &cc);
    let iu = InitUpdateResponse::parse(&card.init_update_response(&[0x33; 10], 0x60, None).to_bytes()).expect("IU");
    let (mut host, ea) = HostChannel::open(&keys, &hc, &iu, SecurityLevel::CMacCDecRMac).expect("opens");
    card.verify_external_authenticate(&ea).expect("EA");
    let load = Command::new(0x80, 0xE8, 0x00, 0x01).with_data(vec![0xA5; 231]);
    c.bench_function("scp03/wrap+unwrap LOAD 231 B (C-MAC, C-DEC, R-MAC), both sides", |b| {
        b.iter(|| {
            let wrapped = host.wrap(black_box(&load)).expect("wraps");
            let plain = card.unwrap_command(&wrapped).expect("unwraps");
            let resp = card.wrap_response(Response::new(Vec::new(), StatusWord::OK));
            black_box(plain);
            host.unwrap(resp).expect("R-MAC")
        })
    });
}

fn cap(c: &mut Criterion) {
    let bytes = CapBuilder::new(&[0xA0, 0, 0, 0x06, 0x47, 0x2F, 0, 1], "tapline/wallet")
        .applet(&[0xA0, 0, 0, 0x06, 0x47, 0x2F, 0, 1, 1])
        .code_size(20 * 1024)
        .build()
        .expect("builds");
    c.bench_function("cap/parse 20 KB CAP", |b| b.iter(|| CapFile::from_bytes(black_box(&bytes)).expect("parses")));
    let file = CapFile::from_bytes(&bytes).expect("parses");
    c.bench_function("cap/load file data block 20 KB", |b| b.iter(|| black_box(&file).load_file_data_block(false)));
}

criterion_group!(benches, apdu, tlvs, scp03, cap);
criterion_main!(benches);
