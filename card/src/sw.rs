//! ISO 7816-4 / GlobalPlatform status words: a typed value with the meanings
//! the station reports to operators.

use std::fmt;

/// SW1 SW2 of a response APDU.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusWord(pub u16);

impl StatusWord {
    pub const OK: Self = Self(0x9000);
    pub const WRONG_LENGTH: Self = Self(0x6700);
    pub const SECURITY_STATUS: Self = Self(0x6982);
    pub const AUTH_METHOD_BLOCKED: Self = Self(0x6983);
    pub const REFERENCED_DATA_INVALID: Self = Self(0x6984);
    pub const CONDITIONS_NOT_SATISFIED: Self = Self(0x6985);
    pub const COMMAND_NOT_ALLOWED: Self = Self(0x6986);
    pub const SM_DATA_MISSING: Self = Self(0x6987);
    pub const SM_DATA_INCORRECT: Self = Self(0x6988);
    pub const WRONG_DATA: Self = Self(0x6A80);
    pub const FUNC_NOT_SUPPORTED: Self = Self(0x6A81);
    pub const FILE_NOT_FOUND: Self = Self(0x6A82);
    pub const RECORD_NOT_FOUND: Self = Self(0x6A83);
    pub const NOT_ENOUGH_MEMORY: Self = Self(0x6A84);
    pub const INCORRECT_P1P2: Self = Self(0x6A86);
    pub const REFERENCED_DATA_NOT_FOUND: Self = Self(0x6A88);
    pub const INS_NOT_SUPPORTED: Self = Self(0x6D00);
    pub const CLA_NOT_SUPPORTED: Self = Self(0x6E00);
    pub const UNKNOWN: Self = Self(0x6F00);
    pub const MEMORY_FAILURE: Self = Self(0x6581);
    pub const VERIFICATION_FAILED: Self = Self(0x6300);

    pub const fn new(sw1: u8, sw2: u8) -> Self {
        Self(((sw1 as u16) << 8) | sw2 as u16)
    }

    pub const fn sw1(self) -> u8 {
        (self.0 >> 8) as u8
    }

    pub const fn sw2(self) -> u8 {
        self.0 as u8
    }

    pub const fn to_bytes(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }

    /// 61xx: more response bytes wait for GET RESPONSE.
    pub const fn bytes_available(self) -> Option<usize> {
        if self.sw1() == 0x61 { Some(if self.sw2() == 0 { 256 } else { self.sw2() as usize }) } else { None }
    }

    /// 6Cxx: wrong Le, repeat with the given length.
    pub const fn correct_le(self) -> Option<usize> {
        if self.sw1() == 0x6C { Some(if self.sw2() == 0 { 256 } else { self.sw2() as usize }) } else { None }
    }

    /// A short human description for reports and operator screens.
    pub fn meaning(self) -> &'static str {
        match self.0 {
            0x9000 => "success",
            0x6283 => "selected file or application blocked",
            0x6700 => "wrong length",
            0x6982 => "security status not satisfied",
            0x6983 => "authentication method blocked",
            0x6984 => "referenced data invalidated",
            0x6985 => "conditions of use not satisfied",
            0x6986 => "command not allowed",
            0x6987 => "expected secure messaging data objects missing",
            0x6988 => "incorrect secure messaging data objects",
            0x6A80 => "incorrect data",
            0x6A81 => "function not supported",
            0x6A82 => "application or file not found",
            0x6A84 => "not enough memory",
            0x6A86 => "incorrect P1 P2",
            0x6A88 => "referenced data not found",
            0x6D00 => "instruction not supported",
            0x6E00 => "class not supported",
            0x6581 => "memory failure",
            0x6F00 => "no precise diagnosis",
            sw if sw & 0xFFF0 == 0x63C0 => "verification failed, retries left in SW2",
            sw if sw & 0xFF00 == 0x6100 => "more data available",
            sw if sw & 0xFF00 == 0x6C00 => "wrong Le",
            _ => "unknown status",
        }
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X} ({})", self.0, self.meaning())
    }
}

impl fmt::Debug for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SW {:04X}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chaining_status_words() {
        assert_eq!(StatusWord::new(0x61, 0x10).bytes_available(), Some(16));
        assert_eq!(StatusWord::new(0x61, 0x00).bytes_available(), Some(256));
        assert_eq!(StatusWord::new(0x6C, 0x08).correct_le(), Some(8));
        assert_eq!(StatusWord::OK.bytes_available(), None);
    }

    #[test]
    fn display_names_the_meaning() {
        assert_eq!(StatusWord::SECURITY_STATUS.to_string(), "6982 (security status not satisfied)");
        assert_eq!(StatusWord::new(0x63, 0xC2).meaning(), "verification failed, retries left in SW2");
    }
}
