//! Shared pieces of the fuzz targets: the allocation guard every target
//! links (one allocation larger than [`MAX_ALLOCATION`] aborts, so libFuzzer
//! records the input as a crash: unbounded allocation is a failure even
//! when it would fit in memory), a transport that replays scripted card
//! responses, and fixed keys.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

use card::apdu::Command;
use card::transport::{Atr, Transport, TransportError};
use k256::ecdsa::SigningKey;

/// The largest single allocation any target may make. Inputs are at most
/// 64 KiB (scripts/fuzz.sh passes -max_len), so nothing legitimate comes
/// near it; libFuzzer's -rss_limit_mb bounds the total.
pub const MAX_ALLOCATION: usize = 64 << 20;

struct Guard;

fn too_big(size: usize) {
    if size > MAX_ALLOCATION {
        let _ = std::io::stderr()
            .write_all(b"tapline-fuzz: allocation larger than MAX_ALLOCATION (unbounded allocation)\n");
        std::process::abort();
    }
}

// SAFETY: every call goes straight to the system allocator after a size check.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        too_big(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        too_big(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        too_big(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

/// A deterministic secp256k1 key (`seed` repeated; any non-zero byte below
/// the curve order's first byte is a valid scalar).
pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
}

/// Splits fuzz input into length-prefixed chunks (u16 big-endian length,
/// then that many bytes; a short last chunk takes what is left).
pub fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        data = &rest[n..];
    }
    out
}

/// A card that answers each command with the next scripted raw response
/// (data + SW1 SW2), and is removed once the script runs out.
pub struct ScriptedCard<'a> {
    responses: std::vec::IntoIter<&'a [u8]>,
    atr: Atr,
    /// Commands the host sent (checked to be well-formed encodings).
    pub sent: usize,
}

impl<'a> ScriptedCard<'a> {
    pub fn new(responses: Vec<&'a [u8]>) -> Self {
        Self { responses: responses.into_iter(), atr: Atr(vec![0x3B, 0x80, 0x80, 0x01, 0x01]), sent: 0 }
    }
}

impl Transport for ScriptedCard<'_> {
    fn transmit_raw(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        // Whatever the host sends must be a command it can parse back.
        Command::parse(apdu).expect("host sent a malformed command APDU");
        self.sent += 1;
        self.responses.next().map(<[u8]>::to_vec).ok_or(TransportError::CardRemoved)
    }

    fn atr(&self) -> &Atr {
        &self.atr
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        Ok(())
    }
}
