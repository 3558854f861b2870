//! BER-TLV (ISO 7816-4 annex D / X.690 subset) as cards use it: multi-byte
//! tags, definite lengths up to 4 bytes, constructed values parsed on demand.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlvError {
    #[error("TLV truncated at offset {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("TLV at offset {offset}: unsupported length form {first:02X}")]
    BadLength { offset: usize, first: u8 },
    #[error("TLV tag {tag:X} missing")]
    Missing { tag: u32 },
    #[error("TLV tag {tag:X}: expected {expected} bytes, found {found}")]
    WrongSize { tag: u32, expected: usize, found: usize },
}

/// One TLV object borrowed from a buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u32,
    pub value: &'a [u8],
}

impl fmt::Debug for Tlv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tlv({:X}, {} bytes)", self.tag, self.value.len())
    }
}

impl<'a> Tlv<'a> {
    /// Bit 6 of the first tag byte marks a constructed object.
    pub fn is_constructed(&self) -> bool {
        let first = if self.tag > 0xFFFF {
            (self.tag >> 16) as u8
        } else if self.tag > 0xFF {
            (self.tag >> 8) as u8
        } else {
            self.tag as u8
        };
        first & 0x20 != 0
    }

    /// The children of a constructed object.
    pub fn children(&self) -> Result<Vec<Tlv<'a>>, TlvError> {
        parse_all(self.value)
    }
}

/// Parses one object from the front of `buf`; returns it and the rest.
pub fn parse_one(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    parse_at(buf, 0)
}

fn parse_at(buf: &[u8], base: usize) -> Result<(Tlv<'_>, &[u8]), TlvError> {
    let mut i = 0;
    let first = *buf.first().ok_or(TlvError::Truncated { offset: base, what: "tag" })?;
    let mut tag = first as u32;
    i += 1;
    if first & 0x1F == 0x1F {
        loop {
            let b = *buf.get(i).ok_or(TlvError::Truncated { offset: base + i, what: "tag" })?;
            tag = (tag << 8) | b as u32;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
            if i >= 3 {
                return Err(TlvError::Truncated { offset: base + i, what: "tag longer than 3 bytes" });
            }
        }
    }
    let l0 = *buf.get(i).ok_or(TlvError::Truncated { offset: base + i, what: "length" })?;
    i += 1;
    let len = match l0 {
        0..=0x7F => l0 as usize,
        0x81..=0x84 => {
            let n = (l0 & 0x7F) as usize;
            let bytes = buf.get(i..i + n).ok_or(TlvError::Truncated { offset: base + i, what: "length" })?;
            i += n;
            bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize)
        }
        _ => return Err(TlvError::BadLength { offset: base + i - 1, first: l0 }),
    };
    let value = buf
        .get(i..i.checked_add(len).ok_or(TlvError::Truncated { offset: base + i, what: "value" })?)
        .ok_or(TlvError::Truncated { offset: base + i, what: "value" })?;
    Ok((Tlv { tag, value }, &buf[i + len..]))
}

/// Parses a sequence of objects that fills `buf` exactly.
pub fn parse_all(buf: &[u8]) -> Result<Vec<Tlv<'_>>, TlvError> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let offset = buf.len() - rest.len();
        let (tlv, r) = parse_at(rest, offset)?;
        out.push(tlv);
        rest = r;
    }
    Ok(out)
}

/// The first object with `tag` among `objs`.
pub fn find<'a>(objs: &[Tlv<'a>], tag: u32) -> Option<&'a [u8]> {
    objs.iter().find(|t| t.tag == tag).map(|t| t.value)
}

/// Like [`find`] but an error naming the tag when it is absent.
pub fn require<'a>(objs: &[Tlv<'a>], tag: u32) -> Result<&'a [u8], TlvError> {
    find(objs, tag).ok_or(TlvError::Missing { tag })
}

/// Like [`require`] for a fixed-size value.
pub fn require_array<const N: usize>(objs: &[Tlv<'_>], tag: u32) -> Result<[u8; N], TlvError> {
    let v = require(objs, tag)?;
    v.try_into().map_err(|_| TlvError::WrongSize { tag, expected: N, found: v.len() })
}

/// Appends the BER length of `len` to `out`.
pub fn encode_length(len: usize, out: &mut Vec<u8>) {
    match len {
        0..=0x7F => out.push(len as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, len as u8]),
        0x100..=0xFFFF => {
            out.push(0x82);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0x83);
            out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        }
    }
}

/// Appends tag, length and value to `out`.
pub fn encode(tag: u32, value: &[u8], out: &mut Vec<u8>) {
    let tag_bytes = tag.to_be_bytes();
    let skip = tag_bytes.iter().take_while(|b| **b == 0).count().min(3);
    out.extend_from_slice(&tag_bytes[skip..]);
    encode_length(value.len(), out);
    out.extend_from_slice(value);
}

/// Builds a TLV into a fresh vector.
pub fn tlv(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    encode(tag, value, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_lengths_and_tags() {
        for (tag, len) in [(0x4F, 0), (0x9F7F, 42), (0xC4, 200), (0xE3, 300), (0x5F20, 70_000)] {
            let value = vec![0xAB; len];
            let enc = tlv(tag, &value);
            let (t, rest) = parse_one(&enc).expect("parses");
            assert_eq!(t.tag, tag);
            assert_eq!(t.value.len(), len);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn nested_objects() {
        let mut inner = tlv(0x4F, &[0xA0, 0, 0, 1]);
        inner.extend(tlv(0x9F70, &[0x07]));
        let outer = tlv(0xE3, &inner);
        let objs = parse_all(&outer).expect("parses");
        assert!(objs[0].is_constructed());
        let kids = objs[0].children().expect("children");
        assert_eq!(require(&kids, 0x4F).expect("aid"), &[0xA0, 0, 0, 1]);
        assert_eq!(require_array::<1>(&kids, 0x9F70).expect("state"), [7]);
        assert_eq!(require(&kids, 0x84), Err(TlvError::Missing { tag: 0x84 }));
    }

    #[test]
    fn truncated_and_hostile_input_is_an_error_not_a_panic() {
        assert!(parse_all(&[0x4F, 0x05, 1, 2]).is_err());
        assert!(parse_all(&[0x9F]).is_err());
        assert!(parse_all(&[0x4F, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]).is_err());
        assert!(parse_all(&[0x4F, 0x85, 0, 0, 0, 0, 1]).is_err());
        assert!(parse_all(&[0x5F, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        // Every prefix of a valid encoding fails cleanly.
        let enc = tlv(0xE3, &tlv(0x4F, &[1; 130]));
        for n in 0..enc.len() {
            assert!(parse_all(&enc[..n]).is_err() || n == 0, "prefix {n}");
        }
    }
}
