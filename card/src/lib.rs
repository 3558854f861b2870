//! Everything ISO 7816 / GlobalPlatform / Tapline wallet protocol, host side
//! and card side: APDU and TLV codecs, status words, the `Transport` and
//! reader seams with their implementations, the SCP03 host, the CAP parser
//! and the card emulator. No async runtime and no SQL live here.

pub mod apdu;
pub mod cap;
pub mod cardid;
pub mod emu;
pub mod error;
pub mod gp;
pub mod sw;
pub mod tlv;
pub mod transport;
pub mod wallet;

pub use apdu::{Command, Response};
pub use cardid::CardId;
pub use error::CardError;
pub use sw::StatusWord;
