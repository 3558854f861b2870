//! An authenticated SCP03 session with the card manager: key set chosen by
//! the key version the card reports, card cryptogram checked before anything
//! is sent, then wrapped card-management commands. Nothing here decides what
//! to load; that is the recipe's job.

use std::fmt;

use super::keys::{Diversification, StaticKeys};
use super::scp03::{self, HostChannel, InitUpdateResponse, SecurityLevel, UnwrappedResponse};
use super::{ISD_AID, StatusEntry, StatusScope};
use crate::CardError;
use crate::apdu::{Command, Response};
use crate::sw::StatusWord;
use crate::transport::Transport;

/// Where the keys of one key version come from.
#[derive(Clone)]
pub enum KeySource {
    /// The same keys on every card (e.g. the chip vendor's defaults).
    Static(StaticKeys),
    /// Per-card keys derived from a master key and the card's key
    /// diversification data.
    Diversified { master: StaticKeys, scheme: Diversification },
}

impl KeySource {
    pub fn keys_for(&self, kdd: &[u8; 10]) -> StaticKeys {
        match self {
            Self::Static(k) => k.clone(),
            Self::Diversified { master, scheme } => master.diversify(*scheme, kdd),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(k) => write!(f, "Static({k:?})"),
            Self::Diversified { master, scheme } => write!(f, "Diversified({master:?}, {scheme:?})"),
        }
    }
}

/// The key sets a host knows, by key version number.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    sets: Vec<(u8, KeySource)>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn with(mut self, kvn: u8, source: KeySource) -> Self {
        self.sets.retain(|(v, _)| *v != kvn);
        self.sets.push((kvn, source));
        self
    }

    pub fn get(&self, kvn: u8) -> Option<&KeySource> {
        self.sets.iter().find(|(v, _)| *v == kvn).map(|(_, s)| s)
    }

    pub fn versions(&self) -> Vec<u8> {
        self.sets.iter().map(|(v, _)| *v).collect()
    }
}

/// Reads the CPLC without a secure channel (after selecting the ISD).
pub fn read_cplc(t: &mut dyn Transport) -> Result<super::cplc::Cplc, CardError> {
    let resp = t.transmit(&super::get_data(0x9F7F))?;
    if !resp.is_ok() {
        return Err(CardError::Status { command: "GET DATA (CPLC)", sw: resp.sw });
    }
    super::cplc::Cplc::parse(&resp.data)
}

/// Reads the chip's identity certificate from the card manager (GET DATA
/// 7F21) without a secure channel; `None` when the card does not offer it.
pub fn read_identity(t: &mut dyn Transport) -> Result<Option<Vec<u8>>, CardError> {
    let resp = t.transmit(&super::get_data(0x7F21))?;
    match resp.sw {
        StatusWord::OK => Ok(Some(resp.data)),
        StatusWord::REFERENCED_DATA_NOT_FOUND => Ok(None),
        sw => Err(CardError::Status { command: "GET DATA (identity)", sw }),
    }
}

/// Selects the ISD.
pub fn select_isd(t: &mut dyn Transport) -> Result<Vec<u8>, CardError> {
    let resp = t.transmit(&super::select(&ISD_AID))?;
    if !resp.is_ok() {
        return Err(CardError::Status { command: "SELECT card manager", sw: resp.sw });
    }
    Ok(resp.data)
}

/// An open SCP03 session.
pub struct GpSession<'t> {
    t: &'t mut dyn Transport,
    channel: HostChannel,
    key_version: u8,
    kdd: [u8; 10],
    keys: StaticKeys,
}

impl fmt::Debug for GpSession<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpSession(kvn {:02X})", self.key_version)
    }
}

impl<'t> GpSession<'t> {
    /// SELECT ISD, INITIALIZE UPDATE with key version `requested` (0 = the
    /// card's choice), then picks the key set for the version the card
    /// reports, checks the card cryptogram, and only then authenticates.
    /// A cryptogram mismatch returns an error without sending EXTERNAL
    /// AUTHENTICATE: wrong keys must never count against the card's retry
    /// limit.
    pub fn open(
        t: &'t mut dyn Transport,
        ring: &KeyRing,
        requested: u8,
        level: SecurityLevel,
    ) -> Result<Self, CardError> {
        select_isd(t)?;
        let mut host_challenge = [0u8; 8];
        getrandom::fill(&mut host_challenge).map_err(|e| CardError::verification("host RNG", e))?;
        let resp = t.transmit(&scp03::initialize_update(requested, &host_challenge))?;
        if !resp.is_ok() {
            return Err(CardError::Status { command: "INITIALIZE UPDATE", sw: resp.sw });
        }
        let iu = InitUpdateResponse::parse(&resp.data)?;
        let source = ring.get(iu.key_version).ok_or_else(|| {
            CardError::verification(
                "card key version",
                format!(
                    "card reports key version {:02X}; the profile has keys for {}",
                    iu.key_version,
                    ring.versions().iter().map(|v| format!("{v:02X}")).collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let keys = source.keys_for(&iu.kdd);
        // Checks the card cryptogram before anything else goes to the card.
        let (channel, ext) = HostChannel::open(&keys, &host_challenge, &iu, level)?;
        let resp = t.transmit(&ext)?;
        if !resp.is_ok() {
            return Err(CardError::Status { command: "EXTERNAL AUTHENTICATE", sw: resp.sw });
        }
        Ok(Self { t, channel, key_version: iu.key_version, kdd: iu.kdd, keys })
    }

    pub fn key_version(&self) -> u8 {
        self.key_version
    }

    /// Ends the session (on the host side) and gives the transport back.
    pub fn into_transport(self) -> &'t mut dyn Transport {
        self.t
    }

    pub fn kdd(&self) -> &[u8; 10] {
        &self.kdd
    }

    pub fn level(&self) -> SecurityLevel {
        self.channel.level()
    }

    /// Sends a wrapped command; checks the response MAC; an error status is
    /// returned as `CardError::Status`.
    pub fn send(&mut self, name: &'static str, cmd: &Command) -> Result<Vec<u8>, CardError> {
        let resp = self.exchange(cmd)?;
        if resp.sw != StatusWord::OK {
            return Err(CardError::Status { command: name, sw: resp.sw });
        }
        Ok(resp.data)
    }

    /// Sends a wrapped command and returns the unwrapped response whatever
    /// its status. With R-MAC, success responses are verified; error status
    /// words carry no R-MAC (Amendment D §6.2.5) and so are unauthenticated:
    /// callers act on them only to stop, never to do something irreversible.
    pub fn exchange(&mut self, cmd: &Command) -> Result<Response, CardError> {
        Ok(self.exchange_checked(cmd)?.into_response())
    }

    /// Like [`exchange`](Self::exchange), keeping whether an R-MAC vouched
    /// for the response.
    pub fn exchange_checked(&mut self, cmd: &Command) -> Result<UnwrappedResponse, CardError> {
        let wrapped = self.channel.wrap(cmd)?;
        let resp = self.t.transmit(&wrapped)?;
        Ok(self.channel.unwrap(resp)?)
    }

    /// GET STATUS of one scope, following 6310 "more data" continuation.
    pub fn get_status(&mut self, scope: StatusScope) -> Result<Vec<StatusEntry>, CardError> {
        let mut out = Vec::new();
        let mut next = false;
        loop {
            let resp = self.exchange(&super::get_status(scope, next))?;
            match resp.sw {
                StatusWord::OK => {
                    out.extend(StatusEntry::parse_all(&resp.data)?);
                    return Ok(out);
                }
                StatusWord(0x6310) => {
                    out.extend(StatusEntry::parse_all(&resp.data)?);
                    next = true;
                }
                StatusWord::REFERENCED_DATA_NOT_FOUND => return Ok(out),
                sw => return Err(CardError::Status { command: "GET STATUS", sw }),
            }
            if out.len() > 1024 {
                return Err(CardError::malformed("GET STATUS response", "more than 1024 entries"));
            }
        }
    }

    /// DELETE; `Ok(false)` when the card has no such AID.
    pub fn delete(&mut self, aid: &[u8], related: bool) -> Result<bool, CardError> {
        let resp = self.exchange(&super::delete(aid, related))?;
        match resp.sw {
            StatusWord::OK => Ok(true),
            StatusWord::REFERENCED_DATA_NOT_FOUND => Ok(false),
            sw => Err(CardError::Status { command: "DELETE", sw }),
        }
    }

    /// INSTALL [for load] then LOAD of the whole load file data block (the
    /// C4-wrapped load file) in blocks of at most `block_size` bytes;
    /// `progress(sent, total)` runs after each block.
    pub fn load(
        &mut self,
        package_aid: &[u8],
        load_file_hash: &[u8; 32],
        data_block: &[u8],
        block_size: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), CardError> {
        self.send("INSTALL [for load]", &super::install_for_load(package_aid, &ISD_AID, Some(load_file_hash)))?;
        let blocks: Vec<&[u8]> = data_block.chunks(block_size.max(1)).collect();
        if blocks.len() > 256 {
            return Err(CardError::malformed(
                "load file",
                format!("{} blocks of {block_size} bytes exceed LOAD's 256 block numbers", blocks.len()),
            ));
        }
        let total = blocks.len();
        for (i, block) in blocks.into_iter().enumerate() {
            let last = i + 1 == total;
            self.send("LOAD", &super::load_block(i as u8, last, block))?;
            progress(i + 1, total);
        }
        Ok(())
    }

    pub fn install_for_install(
        &mut self,
        package_aid: &[u8],
        class_aid: &[u8],
        instance_aid: &[u8],
        privileges: u8,
        params: &[u8],
    ) -> Result<(), CardError> {
        self.send(
            "INSTALL [for install]",
            &super::install_for_install(package_aid, class_aid, instance_aid, privileges, params),
        )
        .map(|_| ())
    }

    /// PUT KEY: replaces the key set the session authenticated with
    /// (`replace = true`) or adds one, as version `new_kvn`. The card checks
    /// the key check values; the new keys are only proven by a new session.
    pub fn put_keys(&mut self, new_kvn: u8, keys: &StaticKeys, replace: bool) -> Result<(), CardError> {
        let data = scp03::put_key_data(new_kvn, keys, &self.keys.dek);
        let old = if replace { self.key_version } else { 0 };
        let resp = self.send("PUT KEY", &scp03::put_key(old, data))?;
        // The card answers the KVN and the three KCVs (GP §11.8.3); check them.
        let mut expected = vec![new_kvn];
        for k in [&keys.enc, &keys.mac, &keys.dek] {
            expected.extend_from_slice(&k.kcv());
        }
        if !resp.is_empty() && resp != expected {
            return Err(CardError::verification("PUT KEY response", "key check values differ from the keys sent"));
        }
        Ok(())
    }
}
