//! GlobalPlatform Card Specification v2.3 host side: card manager command
//! builders, GET STATUS parsing, CPLC, keys, the SCP03 secure channel and the
//! authenticated session that ties them together.

pub mod cplc;
pub mod keys;
pub mod scp03;
pub mod session;

use crate::CardError;
use crate::apdu::Command;
use crate::tlv;

/// AID of the GlobalPlatform Issuer Security Domain (card manager).
pub const ISD_AID: [u8; 8] = [0xA0, 0x00, 0x00, 0x01, 0x51, 0x00, 0x00, 0x00];

/// GP instruction bytes (GP Card Spec v2.3 §11).
pub mod ins {
    pub const DELETE: u8 = 0xE4;
    pub const INSTALL: u8 = 0xE6;
    pub const LOAD: u8 = 0xE8;
    pub const PUT_KEY: u8 = 0xD8;
    pub const SET_STATUS: u8 = 0xF0;
    pub const GET_STATUS: u8 = 0xF2;
    pub const GET_DATA: u8 = 0xCA;
    pub const INITIALIZE_UPDATE: u8 = 0x50;
    pub const EXTERNAL_AUTHENTICATE: u8 = 0x82;
    pub const SELECT: u8 = 0xA4;
}

/// INSTALL P1 roles (GP Card Spec v2.3 §11.5.2.1).
pub mod install {
    pub const FOR_LOAD: u8 = 0x02;
    pub const FOR_INSTALL: u8 = 0x04;
    pub const FOR_MAKE_SELECTABLE: u8 = 0x08;
}

/// GET STATUS P1 subsets (GP Card Spec v2.3 §11.4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusScope {
    IssuerSecurityDomain = 0x80,
    Applications = 0x40,
    LoadFiles = 0x20,
    LoadFilesAndModules = 0x10,
}

/// Card life cycle of the ISD (GP Card Spec v2.3 §5.1.1).
pub mod card_state {
    pub const OP_READY: u8 = 0x01;
    pub const INITIALIZED: u8 = 0x07;
    pub const SECURED: u8 = 0x0F;
    pub const CARD_LOCKED: u8 = 0x7F;
    pub const TERMINATED: u8 = 0xFF;
}

/// Application life cycle (GP Card Spec v2.3 §5.3.1).
pub mod app_state {
    pub const LOADED: u8 = 0x01;
    pub const INSTALLED: u8 = 0x03;
    pub const SELECTABLE: u8 = 0x07;
    pub const LOCKED: u8 = 0x83;
}

pub fn select(aid: &[u8]) -> Command {
    Command::new(0x00, ins::SELECT, 0x04, 0x00).with_data(aid.to_vec()).with_le(256)
}

/// GET DATA (ISO CLA 80 variant used by card managers) for a tag.
pub fn get_data(tag: u16) -> Command {
    let [p1, p2] = tag.to_be_bytes();
    Command::new(0x80, ins::GET_DATA, p1, p2).with_le(256)
}

/// GET STATUS, TLV response format (P2 bit 2), first or next occurrence.
pub fn get_status(scope: StatusScope, next: bool) -> Command {
    let p2 = if next { 0x03 } else { 0x02 };
    Command::new(0x80, ins::GET_STATUS, scope as u8, p2).with_data(vec![0x4F, 0x00]).with_le(256)
}

/// DELETE an AID; `related` also deletes the applets of a load file.
pub fn delete(aid: &[u8], related: bool) -> Command {
    Command::new(0x80, ins::DELETE, 0x00, if related { 0x80 } else { 0x00 }).with_data(tlv::tlv(0x4F, aid))
}

fn lv(out: &mut Vec<u8>, v: &[u8]) {
    out.push(v.len() as u8);
    out.extend_from_slice(v);
}

/// INSTALL [for load]: load file AID, security domain AID, load file data
/// block hash (SHA-256 of the load file data), no load parameters, no token.
pub fn install_for_load(package_aid: &[u8], sd_aid: &[u8], hash: Option<&[u8; 32]>) -> Command {
    let mut d = Vec::with_capacity(64);
    lv(&mut d, package_aid);
    lv(&mut d, sd_aid);
    lv(&mut d, hash.map_or(&[][..], |h| &h[..]));
    lv(&mut d, &[]);
    lv(&mut d, &[]);
    Command::new(0x80, ins::INSTALL, install::FOR_LOAD, 0x00).with_data(d)
}

/// One LOAD block: P1 bit 8 marks the last block, P2 is the block number.
pub fn load_block(number: u8, last: bool, block: &[u8]) -> Command {
    Command::new(0x80, ins::LOAD, if last { 0x80 } else { 0x00 }, number).with_data(block.to_vec())
}

/// INSTALL [for install and make selectable] with privileges and
/// application specific parameters (wrapped in C9 as §11.5.2.3.7 requires).
pub fn install_for_install(
    package_aid: &[u8],
    class_aid: &[u8],
    instance_aid: &[u8],
    privileges: u8,
    params: &[u8],
) -> Command {
    let mut d = Vec::with_capacity(64);
    lv(&mut d, package_aid);
    lv(&mut d, class_aid);
    lv(&mut d, instance_aid);
    lv(&mut d, &[privileges]);
    lv(&mut d, &tlv::tlv(0xC9, params));
    lv(&mut d, &[]);
    Command::new(0x80, ins::INSTALL, install::FOR_INSTALL | install::FOR_MAKE_SELECTABLE, 0x00).with_data(d)
}

/// SET STATUS of the ISD (card life cycle), P1 = 80.
pub fn set_card_status(state: u8) -> Command {
    Command::new(0x80, ins::SET_STATUS, 0x80, state)
}

/// One GET STATUS entry (GP Card Spec v2.3 table 11-36, TLV format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusEntry {
    pub aid: Vec<u8>,
    pub lifecycle: u8,
    pub privileges: Vec<u8>,
    pub version: Option<Vec<u8>>,
    pub modules: Vec<Vec<u8>>,
}

impl StatusEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut inner = tlv::tlv(0x4F, &self.aid);
        tlv::encode(0x9F70, &[self.lifecycle], &mut inner);
        if !self.privileges.is_empty() {
            tlv::encode(0xC5, &self.privileges, &mut inner);
        }
        if let Some(v) = &self.version {
            tlv::encode(0xCE, v, &mut inner);
        }
        for m in &self.modules {
            tlv::encode(0x84, m, &mut inner);
        }
        tlv::tlv(0xE3, &inner)
    }

    /// Parses the concatenated E3 entries of one GET STATUS response.
    pub fn parse_all(data: &[u8]) -> Result<Vec<Self>, CardError> {
        let bad = |e: tlv::TlvError| CardError::malformed("GET STATUS response", e);
        let mut out = Vec::new();
        for obj in tlv::parse_all(data).map_err(bad)? {
            if obj.tag != 0xE3 {
                return Err(CardError::malformed("GET STATUS response", format!("unexpected tag {:X}", obj.tag)));
            }
            let kids = obj.children().map_err(bad)?;
            out.push(Self {
                aid: tlv::require(&kids, 0x4F).map_err(bad)?.to_vec(),
                lifecycle: tlv::require_array::<1>(&kids, 0x9F70).map_err(bad)?[0],
                privileges: tlv::find(&kids, 0xC5).unwrap_or_default().to_vec(),
                version: tlv::find(&kids, 0xCE).map(<[u8]>::to_vec),
                modules: kids.iter().filter(|k| k.tag == 0x84).map(|k| k.value.to_vec()).collect(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_for_load_layout() {
        let c = install_for_load(&[1, 2, 3, 4, 5], &ISD_AID, None);
        assert_eq!(c.data, [5, 1, 2, 3, 4, 5, 8, 0xA0, 0, 0, 1, 0x51, 0, 0, 0, 0, 0, 0]);
        assert_eq!((c.p1, c.p2), (0x02, 0x00));
    }

    #[test]
    fn install_for_install_wraps_params_in_c9() {
        let c = install_for_install(&[1; 5], &[2; 6], &[3; 6], 0x00, &[0xAA]);
        let tail = &c.data[c.data.len() - 5..];
        assert_eq!(tail, [3, 0xC9, 1, 0xAA, 0]);
        assert_eq!(c.p1, 0x0C);
    }

    #[test]
    fn status_entries_round_trip() {
        let e = StatusEntry {
            aid: vec![0xF0, 1, 2, 3, 4],
            lifecycle: 0x01,
            privileges: vec![],
            version: Some(vec![1, 0]),
            modules: vec![vec![0xF0, 1, 2, 3, 4, 1]],
        };
        let mut data = e.encode();
        data.extend(e.encode());
        assert_eq!(StatusEntry::parse_all(&data).expect("parses"), vec![e.clone(), e]);
        assert!(StatusEntry::parse_all(&[0x61, 0x00]).is_err());
    }
}
