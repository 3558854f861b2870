//! The Tapline rig: lab tooling around the station. It makes the demo
//! firmware's CAP file, prints the demo vendor CA, and puts emulated cards
//! behind a real pcscd (`vpcd`), emulates the serial card fixture
//! (`fixture`) and finds and power-cycles USB readers (`usb`).

pub mod bench;
pub mod fixture;
pub mod plan;
pub mod usb;
pub mod vpcd;

use card::cap::{CapBuilder, CapError};

/// Package name of the demo wallet firmware.
pub const DEMO_PACKAGE_NAME: &str = "tapline/wallet";
/// Load file size of the demo firmware: the brief's 20 KB applet.
pub const DEMO_CODE_SIZE: usize = 20 * 1024;

/// Builds the demo wallet CAP: a structurally valid CAP 2.2 file with the
/// wallet package and applet AIDs (the emulator models the applet; the
/// bytecode is filler).
pub fn demo_wallet_cap(version: (u8, u8), code_size: usize) -> Result<Vec<u8>, CapError> {
    CapBuilder::new(&card::wallet::PACKAGE_AID, DEMO_PACKAGE_NAME)
        .package_version(version.0, version.1)
        .applet(&card::wallet::APPLET_AID)
        .code_size(code_size)
        .build()
}
