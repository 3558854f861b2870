//! The emulated line: `--sim-faults` parsing and the mix of cards the
//! emulated chip factory makes for a batch (genuine by default; faulty ones
//! at the requested rates, drawn from a seeded generator so a run can be
//! repeated exactly).

use std::fmt;
use std::str::FromStr;

use card::emu::factory::{ChipFactory, ChipKind};
use card::emu::latency::LatencyModel;
use card::emu::{CardFaults, Drbg, EmuCard, TearPoint};
use card::sw::StatusWord;

/// One kind of faulty card the factory can mix in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimFault {
    /// Identity signed by an unpinned CA.
    Counterfeit,
    /// Certificate expired.
    Expired,
    /// Vendor shipped other default GP keys.
    WrongKeys,
    /// Pulled from the reader at a random APDU.
    Tear,
    /// A known-answer self-test fails.
    SelfTest,
    /// The card stops answering.
    Mute,
    /// The card browns out and resets once (retried on its reader).
    Reset,
    /// Stuck random number generator.
    Rng,
    /// Card-key signatures are corrupted.
    BadSignature,
    /// Memory test reads back wrong data.
    Memory,
    /// A slow card model (125 ms a LOAD block, INSTALL 250 ms).
    Slow,
    /// LOAD answers "not enough memory".
    FullMemory,
}

impl SimFault {
    pub const ALL: [SimFault; 12] = [
        SimFault::Counterfeit,
        SimFault::Expired,
        SimFault::WrongKeys,
        SimFault::Tear,
        SimFault::SelfTest,
        SimFault::Mute,
        SimFault::Reset,
        SimFault::Rng,
        SimFault::BadSignature,
        SimFault::Memory,
        SimFault::Slow,
        SimFault::FullMemory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Counterfeit => "counterfeit",
            Self::Expired => "expired",
            Self::WrongKeys => "wrongkeys",
            Self::Tear => "tear",
            Self::SelfTest => "selftest",
            Self::Mute => "mute",
            Self::Reset => "reset",
            Self::Rng => "rng",
            Self::BadSignature => "badsig",
            Self::Memory => "memory",
            Self::Slow => "slow",
            Self::FullMemory => "fullmemory",
        }
    }
}

/// Fault rates, e.g. `counterfeit=0.05,tear=0.05,selftest=0.02`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimFaults {
    pub rates: Vec<(SimFault, f64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimFaultsError {
    #[error("--sim-faults: {item:?}: expected NAME=RATE")]
    Syntax { item: String },
    #[error("--sim-faults: unknown fault {name:?}; known: {known}")]
    Unknown { name: String, known: String },
    #[error("--sim-faults: {name}: rate {rate:?} is not a number between 0 and 1")]
    Rate { name: String, rate: String },
    #[error("--sim-faults: rates add up to {0}, more than 1")]
    Total(String),
    #[error("--sim-faults: {0} given twice")]
    Twice(String),
}

impl FromStr for SimFaults {
    type Err = SimFaultsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut rates: Vec<(SimFault, f64)> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, rate) = item.split_once('=').ok_or_else(|| SimFaultsError::Syntax { item: item.into() })?;
            let name = name.trim();
            let fault =
                SimFault::ALL.iter().copied().find(|f| f.name() == name).ok_or_else(|| SimFaultsError::Unknown {
                    name: name.into(),
                    known: SimFault::ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
                })?;
            let r: f64 = rate
                .trim()
                .parse()
                .ok()
                .filter(|r: &f64| (0.0..=1.0).contains(r))
                .ok_or_else(|| SimFaultsError::Rate { name: name.into(), rate: rate.into() })?;
            if rates.iter().any(|(f, _)| *f == fault) {
                return Err(SimFaultsError::Twice(name.into()));
            }
            rates.push((fault, r));
        }
        let total: f64 = rates.iter().map(|(_, r)| r).sum();
        if total > 1.0 + 1e-9 {
            return Err(SimFaultsError::Total(format!("{total:.3}")));
        }
        Ok(Self { rates })
    }
}

impl fmt::Display for SimFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.rates.iter().map(|(k, r)| format!("{}={r}", k.name())).collect();
        f.write_str(&parts.join(","))
    }
}

/// A uniform number in [0, 1) from the generator.
fn uniform(rng: &mut Drbg) -> f64 {
    let mut b = [0u8; 8];
    rng.fill(&mut b);
    (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Makes the cards of an emulated batch: each card gets at most one fault,
/// chosen with the given rates.
pub fn make_cards(count: usize, seed: u64, faults: &SimFaults) -> Vec<EmuCard> {
    CardSupply::new(seed, faults.clone()).take(count).collect()
}

/// An endless hopper of emulated cards (the daemon's emulated feeder):
/// the same cards `make_cards` makes, one at a time.
pub struct CardSupply {
    factory: ChipFactory,
    rng: Drbg,
    faults: SimFaults,
}

impl CardSupply {
    pub fn new(seed: u64, faults: SimFaults) -> Self {
        let factory = ChipFactory::new(seed);
        let rng = Drbg::new({
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&seed.to_be_bytes());
            s[8..].copy_from_slice(b"tapline sim fault mix v1");
            s
        });
        Self { factory, rng, faults }
    }
}

impl Iterator for CardSupply {
    type Item = EmuCard;

    fn next(&mut self) -> Option<EmuCard> {
        let (factory, rng, faults) = (&mut self.factory, &mut self.rng, &self.faults);
        let u = uniform(rng);
        let mut acc = 0.0;
        let chosen = faults.rates.iter().find(|(_, r)| {
            acc += r;
            u < acc
        });
        let mut f = CardFaults::default();
        let mut kind = ChipKind::Genuine;
        let mut latency = LatencyModel::JCOP4;
        match chosen.map(|(k, _)| *k) {
            None => {}
            Some(SimFault::Counterfeit) => kind = ChipKind::Counterfeit,
            Some(SimFault::Expired) => kind = ChipKind::Expired,
            Some(SimFault::WrongKeys) => kind = ChipKind::WrongDefaultKeys,
            Some(SimFault::Tear) => {
                // Somewhere in the recipe's first hundred APDUs: mostly
                // inside LOAD, where a real operator most often yanks.
                let at = 3 + (uniform(rng) * 97.0) as u64;
                let point = if uniform(rng) < 0.5 { TearPoint::Before } else { TearPoint::After };
                f.remove_at = Some((at, point));
            }
            Some(SimFault::SelfTest) => f.failing_kat = true,
            Some(SimFault::Mute) => f.mute_from = Some(3 + (uniform(rng) * 60.0) as u64),
            Some(SimFault::Reset) => f.reset_at = Some(3 + (uniform(rng) * 97.0) as u64),
            Some(SimFault::Rng) => f.stuck_rng = true,
            Some(SimFault::BadSignature) => f.bad_signature = true,
            Some(SimFault::Memory) => f.bad_memory = true,
            Some(SimFault::Slow) => latency = LatencyModel::SLOW,
            Some(SimFault::FullMemory) => f.wrong_sw = Some((card::gp::ins::LOAD, StatusWord::NOT_ENOUGH_MEMORY)),
        }
        let mut card = factory.make(kind, f);
        card.set_latency(latency);
        Some(card)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_clear_errors() {
        let f: SimFaults = "counterfeit=0.05, tear=0.05,selftest=0.02".parse().expect("parses");
        assert_eq!(f.rates.len(), 3);
        assert!(matches!("bogus=0.1".parse::<SimFaults>(), Err(SimFaultsError::Unknown { .. })));
        assert!(matches!("tear".parse::<SimFaults>(), Err(SimFaultsError::Syntax { .. })));
        assert!(matches!("tear=2".parse::<SimFaults>(), Err(SimFaultsError::Rate { .. })));
        assert!(matches!("tear=0.6,mute=0.6".parse::<SimFaults>(), Err(SimFaultsError::Total(_))));
        assert!(matches!("tear=0.1,tear=0.1".parse::<SimFaults>(), Err(SimFaultsError::Twice(_))));
        assert_eq!("".parse::<SimFaults>(), Ok(SimFaults::default()));
    }

    #[test]
    fn rates_are_honoured_and_deterministic() {
        let f: SimFaults = "counterfeit=0.25".parse().expect("parses");
        let cards = make_cards(400, 9, &f);
        let fakes = cards.iter().filter(|c| c.label() == "counterfeit").count();
        assert!((70..=130).contains(&fakes), "{fakes} counterfeit of 400 at 25%");
        let again = make_cards(400, 9, &f);
        assert!(cards.iter().zip(&again).all(|(a, b)| a.id() == b.id() && a.label() == b.label()));
        assert!(
            make_cards(50, 9, &SimFaults::default()).iter().all(|c| c.label() == "genuine" && c.faults().is_clean())
        );
    }
}
