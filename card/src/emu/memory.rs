//! The emulated card's memory: `Persistent` (EEPROM/flash, survives power
//! loss) and `Transient` (RAM, gone at power-off). Atomicity model: every
//! command runs against a copy of `Persistent` and the copy replaces the
//! committed state in one step when the command succeeds, the way a JavaCard
//! transaction commits; a power loss therefore leaves the state from before
//! or after a command, never a torn mix. Bulky data is behind `Arc`, so the
//! copy is cheap.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::cardid::CardId;
use crate::gp::keys::StaticKeys;
use crate::gp::scp03::CardChannel;
use crate::wallet::Lifecycle;

/// A key set in the card manager.
#[derive(Clone)]
pub struct KeySet {
    pub version: u8,
    pub keys: StaticKeys,
}

/// An executable load file (package) in the card's code memory.
#[derive(Clone, Debug)]
pub struct Package {
    pub aid: Vec<u8>,
    pub version: (u8, u8),
    /// SHA-256 of the load file as received.
    pub hash: [u8; 32],
    pub applet_classes: Vec<Vec<u8>>,
    pub code: Arc<Vec<u8>>,
}

/// An installed application instance.
#[derive(Clone, Debug)]
pub struct Instance {
    pub aid: Vec<u8>,
    pub class_aid: Vec<u8>,
    pub package_aid: Vec<u8>,
    pub state: u8,
    pub privileges: u8,
}

/// The wallet applet instance's persistent fields.
#[derive(Clone)]
pub struct WalletState {
    pub lifecycle: Lifecycle,
    pub wallet_key: Option<Zeroizing<[u8; 32]>>,
    /// Backup linking: set by LINK PRIMARY / LINK BACKUP, cleared by ABORT.
    pub bundle: Option<BundleState>,
    /// The owner access code of a sealed card (never the code itself).
    pub access_code: Option<AccessCode>,
}

impl WalletState {
    /// A freshly installed (or aborted) wallet: no key, no bundle.
    pub fn installed() -> Self {
        Self { lifecycle: Lifecycle::Installed, wallet_key: None, bundle: None, access_code: None }
    }
}

/// A card's membership in a bundle.
#[derive(Clone)]
pub struct BundleState {
    pub id: [u8; 16],
    pub link: Link,
}

/// What a card keeps about its bundle, by role.
#[derive(Clone)]
pub enum Link {
    Primary {
        /// Fresh from the card's RNG at LINK PRIMARY; every backup's link
        /// attestation must cover it.
        nonce: [u8; 32],
        /// The number of backups announced at LINK PRIMARY.
        announced: u8,
        backups: Vec<LinkedBackup>,
    },
    Backup {
        primary: CardId,
        /// The primary's card public key, from its verified certificate.
        primary_key: [u8; 33],
    },
}

/// A backup the primary verified (certificate and link attestation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedBackup {
    pub card_id: CardId,
    /// From the backup's verified certificate.
    pub card_key: [u8; 33],
    /// CONFIRM BACKUP seen: the backup holds the wallet key.
    pub confirmed: bool,
}

/// The owner access code as the card stores it: a salted SHA-256 and the
/// tries left.
#[derive(Clone)]
pub struct AccessCode {
    pub salt: [u8; 16],
    pub hash: [u8; 32],
    pub tries_left: u8,
}

/// Everything that survives power loss.
#[derive(Clone)]
pub struct Persistent {
    /// ISD card life cycle state (GP §5.1.1).
    pub card_state: u8,
    pub key_sets: Vec<KeySet>,
    /// Consecutive failed EXTERNAL AUTHENTICATE; the card locks at the limit.
    pub auth_failures: u8,
    pub packages: Vec<Package>,
    pub instances: Vec<Instance>,
    pub wallet: Option<WalletState>,
    /// Monotonic attestation counter: chip-level, survives applet deletion.
    pub attest_counter: u32,
    /// The self-test memory region.
    pub test_region: Arc<Vec<u8>>,
}

/// The application a session has selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    Nothing,
    CardManager,
    /// An application instance, by AID.
    Instance(Vec<u8>),
}

/// A load in progress: INSTALL [for load] seen, blocks arriving.
pub struct PendingLoad {
    pub package_aid: Vec<u8>,
    pub expected_hash: Option<[u8; 32]>,
    pub next_block: u16,
    pub data: Vec<u8>,
}

/// RAM: lost at power-off or reset.
pub struct Transient {
    pub selected: Selected,
    /// INITIALIZE UPDATE done, EXTERNAL AUTHENTICATE pending.
    pub pending_auth: Option<CardChannel>,
    /// Authenticated secure channel.
    pub channel: Option<CardChannel>,
    pub load: Option<PendingLoad>,
    /// The parts of a chained wallet command received so far.
    pub chain: Option<CommandChain>,
    /// VERIFY with the right access code succeeded since power-up: a sealed
    /// wallet may SIGN.
    pub wallet_unlocked: bool,
}

/// A chained command in progress (ISO 7816-4 §5.3.3): the header it
/// started with and the data of its parts.
pub struct CommandChain {
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
}

impl Transient {
    /// At power-up the issuer security domain is the default selected
    /// application, as on most GlobalPlatform cards.
    pub fn power_on() -> Self {
        Self {
            selected: Selected::CardManager,
            pending_auth: None,
            channel: None,
            load: None,
            chain: None,
            wallet_unlocked: false,
        }
    }

    pub fn close_channel(&mut self) {
        self.pending_auth = None;
        self.channel = None;
        self.load = None;
    }
}
