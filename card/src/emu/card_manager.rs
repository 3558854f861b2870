//! The emulated GlobalPlatform card manager (issuer security domain): SCP03
//! card side, key sets and PUT KEY, GET DATA / GET STATUS, and the
//! load / install / delete life cycle of packages and instances.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::latency::Cost;
use super::memory::{Instance, KeySet, Package, PendingLoad};
use super::{AUTH_FAILURE_LIMIT, Chip, Ctx, Handled, status};
use crate::apdu::{Command, Response};
use crate::gp::scp03::{self, CardChannel};
use crate::gp::{ISD_AID, StatusEntry, app_state, card_state, ins};
use crate::sw::StatusWord;
use crate::tlv;

/// SCP03 "i" parameter this card reports (Amendment D §5.1): random card
/// challenge (bit 0x10 clear), R-MAC and R-ENCRYPTION supported (0x60).
const SCP03_I: u8 = 0x60;

pub(crate) fn select_response(_chip: &Chip, _mem: &super::memory::Persistent) -> Handled {
    let mut a5 = Vec::new();
    tlv::encode(0x9F6E, &[0x47, 0x90], &mut a5);
    tlv::encode(0x9F65, &[0xFF], &mut a5);
    let mut fci = tlv::tlv(0x84, &ISD_AID);
    tlv::encode(0xA5, &a5, &mut fci);
    (Response::ok(tlv::tlv(0x6F, &fci)), Cost::Small)
}

/// Card recognition data (GP §H.2): GP RID, GP 2.3.1, SCP03 with our "i".
fn card_data() -> Vec<u8> {
    let oid = |tail: &[u8]| {
        let mut v = vec![0x2A, 0x86, 0x48, 0x86, 0xFC, 0x6B];
        v.extend_from_slice(tail);
        tlv::tlv(0x06, &v)
    };
    let mut inner = oid(&[0x01]);
    inner.extend(tlv::tlv(0x60, &oid(&[0x02, 0x02, 0x03, 0x01])));
    inner.extend(tlv::tlv(0x63, &oid(&[0x03])));
    inner.extend(tlv::tlv(0x64, &oid(&[0x04, 0x03, SCP03_I])));
    tlv::tlv(0x66, &tlv::tlv(0x73, &inner))
}

fn key_information(ctx: &Ctx<'_>) -> Vec<u8> {
    let mut inner = Vec::new();
    for set in &ctx.mem.key_sets {
        for id in 1..=3u8 {
            tlv::encode(0xC0, &[id, set.version, 0x88, 0x10], &mut inner);
        }
    }
    tlv::tlv(0xE0, &inner)
}

pub(crate) fn handle(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    match (cmd.cla & !0x04 & 0xF0, cmd.ins) {
        (0x80, ins::GET_DATA) | (0x00, ins::GET_DATA) if ctx.ram.channel.is_none() => get_data(ctx, cmd),
        (0x80, ins::INITIALIZE_UPDATE) => initialize_update(ctx, cmd),
        (0x80, ins::EXTERNAL_AUTHENTICATE) => external_authenticate(ctx, cmd),
        _ => secured(ctx, cmd),
    }
}

fn get_data(ctx: &Ctx<'_>, cmd: &Command) -> Handled {
    match (cmd.p1, cmd.p2) {
        (0x9F, 0x7F) => (Response::ok(ctx.chip.cplc.encode()), Cost::Small),
        (0x00, 0x66) => (Response::ok(card_data()), Cost::Small),
        (0x00, 0xE0) => (Response::ok(key_information(ctx)), Cost::Small),
        // The chip's identity certificate, readable before any applet is
        // installed (a platform data object, like CPLC).
        (0x7F, 0x21) => (Response::ok(ctx.chip.certificate.clone()), Cost::Small),
        _ => status(StatusWord::REFERENCED_DATA_NOT_FOUND),
    }
}

fn initialize_update(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    ctx.ram.close_channel();
    if ctx.mem.card_state == card_state::CARD_LOCKED || ctx.mem.auth_failures >= AUTH_FAILURE_LIMIT {
        return status(StatusWord::AUTH_METHOD_BLOCKED);
    }
    let Ok(host_challenge) = <[u8; 8]>::try_from(cmd.data.as_slice()) else {
        return status(StatusWord::WRONG_LENGTH);
    };
    let set =
        if cmd.p1 == 0 { ctx.mem.key_sets.first() } else { ctx.mem.key_sets.iter().find(|k| k.version == cmd.p1) };
    let Some(set) = set else {
        return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
    };
    let mut card_challenge = [0u8; 8];
    ctx.rng.fill(&mut card_challenge);
    let kdd = *ctx.chip.id.as_bytes();
    let (channel, data) =
        CardChannel::initialize_update(&set.keys, kdd, set.version, SCP03_I, &host_challenge, card_challenge);
    ctx.ram.pending_auth = Some(channel);
    (Response::ok(data), Cost::SecureChannel)
}

fn external_authenticate(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Some(mut channel) = ctx.ram.pending_auth.take() else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    match channel.verify_external_authenticate(cmd) {
        Ok(_level) => {
            ctx.mem.auth_failures = 0;
            ctx.ram.channel = Some(channel);
            (Response::ok(Vec::new()), Cost::SecureChannel)
        }
        Err(_) => {
            ctx.mem.auth_failures = ctx.mem.auth_failures.saturating_add(1);
            if ctx.mem.auth_failures >= AUTH_FAILURE_LIMIT {
                ctx.mem.card_state = card_state::CARD_LOCKED;
            }
            (Response::status(StatusWord::VERIFICATION_FAILED), Cost::SecureChannel)
        }
    }
}

/// Commands that need the authenticated secure channel: unwrap, run, wrap.
fn secured(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Some(channel) = ctx.ram.channel.as_mut() else {
        return status(StatusWord::SECURITY_STATUS);
    };
    let plain = match channel.unwrap_command(cmd) {
        Ok(p) => p,
        Err(_) => {
            // A bad MAC ends the session (GP Amendment D §6.2.4).
            ctx.ram.close_channel();
            return status(StatusWord::SECURITY_STATUS);
        }
    };
    let (resp, cost) = match plain.ins {
        ins::GET_DATA => get_data(ctx, &plain),
        ins::GET_STATUS => get_status(ctx, &plain),
        ins::DELETE => delete(ctx, &plain),
        ins::INSTALL => install(ctx, &plain),
        ins::LOAD => load(ctx, &plain),
        ins::PUT_KEY => put_key(ctx, &plain),
        ins::SET_STATUS => set_status(ctx, &plain),
        _ => status(StatusWord::INS_NOT_SUPPORTED),
    };
    let resp = match ctx.ram.channel.as_mut() {
        Some(channel) => channel.wrap_response(resp),
        None => resp,
    };
    (resp, cost)
}

fn get_status(ctx: &Ctx<'_>, cmd: &Command) -> Handled {
    let entries: Vec<StatusEntry> = match cmd.p1 {
        0x80 => vec![StatusEntry {
            aid: ISD_AID.to_vec(),
            lifecycle: ctx.mem.card_state,
            privileges: vec![0x9E],
            version: None,
            modules: vec![],
        }],
        0x40 => ctx
            .mem
            .instances
            .iter()
            .map(|i| StatusEntry {
                aid: i.aid.clone(),
                lifecycle: i.state,
                privileges: vec![i.privileges],
                version: None,
                modules: vec![],
            })
            .collect(),
        0x20 | 0x10 => ctx
            .mem
            .packages
            .iter()
            .map(|p| StatusEntry {
                aid: p.aid.clone(),
                lifecycle: app_state::LOADED,
                privileges: vec![],
                version: Some(vec![p.version.0, p.version.1]),
                modules: if cmd.p1 == 0x10 { p.applet_classes.clone() } else { vec![] },
            })
            .collect(),
        _ => return status(StatusWord::INCORRECT_P1P2),
    };
    if entries.is_empty() {
        return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
    }
    let data: Vec<u8> = entries.iter().flat_map(StatusEntry::encode).collect();
    (Response::ok(data), Cost::Small)
}

fn delete(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Ok(objs) = tlv::parse_all(&cmd.data) else {
        return status(StatusWord::WRONG_DATA);
    };
    let Some(aid) = tlv::find(&objs, 0x4F) else {
        return status(StatusWord::WRONG_DATA);
    };
    let related = cmd.p2 & 0x80 != 0;
    // A sealed wallet holds its owner's key: the card refuses to delete it
    // (and with it the key); rework is only possible before sealing.
    let sealed = ctx.mem.wallet.as_ref().is_some_and(|w| w.lifecycle == crate::wallet::Lifecycle::Sealed);
    let touches_wallet =
        ctx.mem.instances.iter().any(|i| {
            i.package_aid == crate::wallet::PACKAGE_AID && (i.aid == aid || (related && i.package_aid == aid))
        });
    if sealed && touches_wallet {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    if let Some(pos) = ctx.mem.instances.iter().position(|i| i.aid == aid) {
        let inst = ctx.mem.instances.remove(pos);
        if inst.package_aid == crate::wallet::PACKAGE_AID {
            ctx.mem.wallet = None;
        }
        return (Response::ok(vec![0x00]), Cost::Delete);
    }
    let Some(pos) = ctx.mem.packages.iter().position(|p| p.aid == aid) else {
        return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
    };
    let has_instances = ctx.mem.instances.iter().any(|i| i.package_aid == aid);
    if has_instances && !related {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    if ctx.mem.instances.iter().any(|i| i.package_aid == aid && i.package_aid == crate::wallet::PACKAGE_AID) {
        ctx.mem.wallet = None;
    }
    ctx.mem.instances.retain(|i| i.package_aid != aid);
    ctx.mem.packages.remove(pos);
    (Response::ok(vec![0x00]), Cost::Delete)
}

/// Reads the length-value fields of an INSTALL command.
fn lv_fields(data: &[u8], n: usize) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 0..n {
        let (&len, tail) = rest.split_first()?;
        let len = len as usize;
        if tail.len() < len {
            return None;
        }
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    rest.is_empty().then_some(out)
}

fn install(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    match cmd.p1 {
        crate::gp::install::FOR_LOAD => install_for_load(ctx, cmd),
        p1 if p1 & crate::gp::install::FOR_INSTALL != 0 => install_for_install(ctx, cmd),
        _ => status(StatusWord::INCORRECT_P1P2),
    }
}

fn install_for_load(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Some(f) = lv_fields(&cmd.data, 5) else {
        return status(StatusWord::WRONG_DATA);
    };
    let (aid, sd, hash) = (f[0], f[1], f[2]);
    if !(5..=16).contains(&aid.len()) || !(sd.is_empty() || sd == ISD_AID) {
        return status(StatusWord::WRONG_DATA);
    }
    if ctx.mem.packages.iter().any(|p| p.aid == aid) {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    let expected_hash = match hash.len() {
        0 => None,
        32 => hash.try_into().ok(),
        _ => return status(StatusWord::WRONG_DATA),
    };
    ctx.ram.load = Some(PendingLoad { package_aid: aid.to_vec(), expected_hash, next_block: 0, data: Vec::new() });
    (Response::ok(vec![0x00]), Cost::Small)
}

/// The biggest load file the emulated card has room for.
const CODE_MEMORY: usize = 200 * 1024;

fn load(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Some(pending) = ctx.ram.load.as_mut() else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    if u16::from(cmd.p2) != pending.next_block {
        ctx.ram.load = None;
        return status(StatusWord::WRONG_DATA);
    }
    if pending.data.len() + cmd.data.len() > CODE_MEMORY + 8 {
        ctx.ram.load = None;
        return status(StatusWord::NOT_ENOUGH_MEMORY);
    }
    pending.data.extend_from_slice(&cmd.data);
    pending.next_block += 1;
    if cmd.p1 & 0x80 == 0 {
        return (Response::ok(vec![0x00]), Cost::LoadBlock);
    }
    let Some(pending) = ctx.ram.load.take() else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    match link(&pending) {
        Ok(pkg) => {
            ctx.mem.packages.push(pkg);
            (Response::ok(vec![0x00]), Cost::LoadFinal)
        }
        Err(sw) => (Response::status(sw), Cost::LoadFinal),
    }
}

/// Checks and "links" a complete load file: the C4 wrapper, the hash
/// announced in INSTALL [for load], and the Header and Applet components.
fn link(pending: &PendingLoad) -> Result<Package, StatusWord> {
    let (c4, rest) = tlv::parse_one(&pending.data).map_err(|_| StatusWord::WRONG_DATA)?;
    if c4.tag != 0xC4 || !rest.is_empty() {
        return Err(StatusWord::WRONG_DATA);
    }
    let hash: [u8; 32] = Sha256::digest(c4.value).into();
    if pending.expected_hash.is_some_and(|h| h != hash) {
        return Err(StatusWord::SECURITY_STATUS);
    }
    let components = crate::cap::components_of_load_file(c4.value).map_err(|_| StatusWord::WRONG_DATA)?;
    let header = components.header().map_err(|_| StatusWord::WRONG_DATA)?;
    if header.package_aid != pending.package_aid {
        return Err(StatusWord::WRONG_DATA);
    }
    Ok(Package {
        aid: header.package_aid,
        version: header.package_version,
        hash,
        applet_classes: components.applet_aids().map_err(|_| StatusWord::WRONG_DATA)?,
        code: Arc::new(c4.value.to_vec()),
    })
}

fn install_for_install(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    let Some(f) = lv_fields(&cmd.data, 6) else {
        return status(StatusWord::WRONG_DATA);
    };
    let (pkg_aid, class_aid, inst_aid, privs) = (f[0], f[1], f[2], f[3]);
    let Some(pkg) = ctx.mem.packages.iter().find(|p| p.aid == pkg_aid) else {
        return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
    };
    if !pkg.applet_classes.iter().any(|c| c == class_aid) {
        return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
    }
    if ctx.mem.instances.iter().any(|i| i.aid == inst_aid) || inst_aid == ISD_AID {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    let is_wallet = pkg_aid == crate::wallet::PACKAGE_AID;
    if is_wallet && ctx.mem.wallet.is_some() {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    ctx.mem.instances.push(Instance {
        aid: inst_aid.to_vec(),
        class_aid: class_aid.to_vec(),
        package_aid: pkg_aid.to_vec(),
        // INSTALL [for install] alone leaves the application INSTALLED; only
        // "and make selectable" makes it SELECTABLE (GP Card Spec v2.3 §5.3.1).
        state: if cmd.p1 & crate::gp::install::FOR_MAKE_SELECTABLE != 0 {
            app_state::SELECTABLE
        } else {
            app_state::INSTALLED
        },
        privileges: privs.first().copied().unwrap_or(0),
    });
    if is_wallet {
        ctx.mem.wallet = Some(super::memory::WalletState::installed());
    }
    (Response::ok(vec![0x00]), Cost::Install)
}

fn put_key(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    if cmd.p2 & 0x80 == 0 || cmd.p2 & 0x7F != 0x01 {
        // Only "multiple keys from key id 1" (a whole SCP03 key set) is supported.
        return status(StatusWord::INCORRECT_P1P2);
    }
    let Some(channel) = ctx.ram.channel.as_ref() else {
        return status(StatusWord::SECURITY_STATUS);
    };
    let Some(current) = ctx.mem.key_sets.iter().find(|k| k.version == channel.key_version()) else {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    };
    let (new_kvn, keys) = match scp03::parse_put_key_data(&cmd.data, &current.keys.dek) {
        Ok(v) => v,
        Err(_) => return status(StatusWord::WRONG_DATA),
    };
    if new_kvn == 0 || new_kvn == 0xFF {
        return status(StatusWord::WRONG_DATA);
    }
    let mut answer = vec![new_kvn];
    for k in [&keys.enc, &keys.mac, &keys.dek] {
        answer.extend_from_slice(&k.kcv());
    }
    if cmd.p1 == 0 {
        if ctx.mem.key_sets.iter().any(|k| k.version == new_kvn) {
            return status(StatusWord::CONDITIONS_NOT_SATISFIED);
        }
        ctx.mem.key_sets.push(KeySet { version: new_kvn, keys });
    } else {
        let Some(slot) = ctx.mem.key_sets.iter_mut().find(|k| k.version == cmd.p1) else {
            return status(StatusWord::REFERENCED_DATA_NOT_FOUND);
        };
        *slot = KeySet { version: new_kvn, keys };
    }
    (Response::ok(answer), Cost::PutKey)
}

fn set_status(ctx: &mut Ctx<'_>, cmd: &Command) -> Handled {
    if cmd.p1 != 0x80 {
        return status(StatusWord::INCORRECT_P1P2);
    }
    let allowed = matches!(
        (ctx.mem.card_state, cmd.p2),
        (card_state::OP_READY, card_state::INITIALIZED | card_state::SECURED)
            | (card_state::INITIALIZED, card_state::SECURED)
            | (card_state::SECURED, card_state::CARD_LOCKED)
    );
    if !allowed {
        return status(StatusWord::CONDITIONS_NOT_SATISFIED);
    }
    ctx.mem.card_state = cmd.p2;
    (Response::ok(Vec::new()), Cost::Small)
}
