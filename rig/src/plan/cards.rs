//! Makes the emulated cards a scenario asks for: the chip factory's kinds,
//! the fault script of each card, and the two kinds that need a card
//! prepared by an earlier "line" (an older wallet package loaded and
//! installed; a card manager locked). The preparation goes through real GP
//! commands on the card in an emulated reader of its own, so the card's
//! state is what a real earlier line would have left.

use std::sync::Arc;
use std::time::Duration;

use card::emu::factory::{ChipFactory, ChipKind, DEFAULT_KEY_VERSION};
use card::emu::latency::LatencyModel;
use card::emu::{CardFaults, EmuCard};
use card::gp::scp03::SecurityLevel;
use card::gp::session::{GpSession, KeyRing, KeySource};
use card::transport::CardReader;
use card::transport::emu::EmuBank;
use station::firmware::Firmware;

use super::run::Calibration;
use super::{At, CardKind, CardSpec};

/// The version the "wrong firmware" card carries (the demo firmware is 1.0).
pub const OLD_FIRMWARE_VERSION: (u8, u8) = (0, 9);

/// Where a scripted APDU number lands, counted from the station's first
/// APDU to the card (the card's own counter includes any preparation).
pub fn resolve(at: At, cal: &Calibration) -> u64 {
    match at {
        At::Apdu(n) => n,
        At::Step { step, offset } => cal.first_apdu(step) + offset,
    }
}

/// Makes the cards of one scenario, in order; `seed` makes them repeatable.
pub fn make(specs: &[CardSpec], seed: u64, firmware: &Firmware, cal: &Calibration) -> Result<Vec<EmuCard>, String> {
    let mut factory = ChipFactory::new(seed);
    let mut first = None;
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let kind = match spec.kind {
            CardKind::Counterfeit => ChipKind::Counterfeit,
            CardKind::Expired => ChipKind::Expired,
            CardKind::WrongKeys => ChipKind::WrongDefaultKeys,
            CardKind::Clone => ChipKind::Clone(first.ok_or("a clone needs a card before it")?),
            _ => ChipKind::Genuine,
        };
        let mut card = factory.make(kind, CardFaults::default());
        first.get_or_insert(card.id());
        match spec.kind {
            CardKind::WrongFirmware => prepare(&mut card, |gp| install_old_firmware(gp, firmware))?,
            CardKind::Locked => prepare(&mut card, |gp| {
                gp.send("SET STATUS", &card::gp::set_card_status(card::gp::card_state::CARD_LOCKED)).map(|_| ())
            })?,
            CardKind::Slow => card.set_latency(LatencyModel::SLOW),
            _ => {}
        }
        // Scripted APDU numbers count from the station's first APDU.
        let base = card.view().apdus;
        let mut f = CardFaults::default();
        match spec.kind {
            CardKind::StuckRng => f.stuck_rng = true,
            CardKind::FailingKat => f.failing_kat = true,
            CardKind::BadSignature => f.bad_signature = true,
            CardKind::BadMemory => f.bad_memory = true,
            CardKind::FullMemory => {
                f.wrong_sw = Some((card::gp::ins::LOAD, card::sw::StatusWord::NOT_ENOUGH_MEMORY));
            }
            CardKind::Mute => f.mute_from = Some(base + 3),
            _ => {}
        }
        if let Some((at, point)) = spec.remove {
            f.remove_at = Some((base + resolve(at, cal), point));
        }
        if let Some(at) = spec.reset {
            f.reset_at = Some(base + resolve(at, cal));
        }
        if let Some(at) = spec.mute {
            f.mute_from = Some(base + resolve(at, cal));
        }
        card.set_faults(f);
        out.push(card);
    }
    Ok(out)
}

/// Runs `work` in a GP session (factory keys) on the card, in an emulated
/// reader of its own.
fn prepare(
    card: &mut EmuCard,
    work: impl FnOnce(&mut GpSession<'_>) -> Result<(), card::CardError>,
) -> Result<(), String> {
    let bank = EmuBank::new(1, 0.0, Duration::from_millis(50));
    let slot = Arc::clone(&bank.slots()[0]);
    let taken = std::mem::replace(card, ChipFactory::new(0).make(ChipKind::Genuine, CardFaults::default()));
    slot.insert(taken).map_err(|_| "preparation reader busy".to_string())?;
    let result = (|| {
        let mut reader = bank.reader(0).ok_or("no preparation reader")?;
        let mut t = reader.connect().map_err(|e| e.to_string())?;
        let ring =
            KeyRing::new().with(DEFAULT_KEY_VERSION, KeySource::Static(card::gp::keys::StaticKeys::gp_default()));
        let mut gp = GpSession::open(&mut *t, &ring, 0, SecurityLevel::CMac).map_err(|e| e.to_string())?;
        work(&mut gp).map_err(|e| e.to_string())
    })();
    *card = slot.remove().ok_or("the card left the preparation reader")?;
    result.map_err(|e| format!("preparing the card: {e}"))
}

/// Loads an older build of the wallet package (same AIDs, version 0.9,
/// other code) and installs its applet, as an earlier line would have.
fn install_old_firmware(gp: &mut GpSession<'_>, fw: &Firmware) -> Result<(), card::CardError> {
    let cap = crate::demo_wallet_cap(OLD_FIRMWARE_VERSION, 2048)
        .map_err(|e| card::CardError::verification("old firmware", e.to_string()))?;
    let parsed = card::cap::CapFile::from_bytes(&cap)
        .map_err(|e| card::CardError::verification("old firmware", e.to_string()))?;
    let hash = parsed.load_file_sha256(false);
    gp.load(&fw.package_aid, &hash, &parsed.load_file_data_block(false), 231, &mut |_, _| {})?;
    for a in &fw.applets {
        gp.install_for_install(&fw.package_aid, &a.class_aid, &a.instance_aid, a.privileges, &a.params)?;
    }
    Ok(())
}
