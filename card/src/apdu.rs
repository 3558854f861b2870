//! ISO 7816-4 command and response APDUs: typed builders and the short/extended
//! encodings. Owns byte layout only; it knows nothing of transports or cards.

use std::fmt;

use crate::sw::StatusWord;

/// The largest `Nc` a short APDU can carry (ISO 7816-4 §5.1).
pub const SHORT_MAX_DATA: usize = 255;
/// The largest `Ne` a short APDU can ask for (`Le = 00` means 256).
pub const SHORT_MAX_LE: usize = 256;
/// The largest `Nc`/`Ne` of an extended APDU.
pub const EXTENDED_MAX: usize = 65_535;

/// A command APDU. `le` is `Ne`, the number of response bytes expected
/// (`None` = no Le field, i.e. case 1 or 3).
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    pub le: Option<usize>,
}

/// Why bytes could not be read as an APDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApduError {
    #[error("APDU too short: {0} bytes")]
    TooShort(usize),
    #[error("APDU length fields inconsistent with its {0} bytes")]
    BadLength(usize),
    #[error("command data of {0} bytes exceeds the extended APDU limit")]
    TooLong(usize),
}

impl Command {
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8) -> Self {
        Self { cla, ins, p1, p2, data: Vec::new(), le: None }
    }

    #[must_use]
    pub fn with_data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = data.into();
        self
    }

    #[must_use]
    pub fn with_le(mut self, le: usize) -> Self {
        self.le = Some(le);
        self
    }

    /// True when the command needs the extended encoding.
    pub fn is_extended(&self) -> bool {
        self.data.len() > SHORT_MAX_DATA || self.le.is_some_and(|le| le > SHORT_MAX_LE)
    }

    /// Encodes the command, short when it fits, extended otherwise.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ApduError> {
        if self.data.len() > EXTENDED_MAX {
            return Err(ApduError::TooLong(self.data.len()));
        }
        let mut out = Vec::with_capacity(self.data.len() + 9);
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        let nc = self.data.len();
        if self.is_extended() {
            if nc > 0 {
                out.push(0);
                out.extend_from_slice(&(nc as u16).to_be_bytes());
                out.extend_from_slice(&self.data);
            }
            if let Some(ne) = self.le {
                // Ne = 65536 is encoded as 0000.
                let le = if ne >= 65_536 { 0 } else { ne as u16 };
                if nc == 0 {
                    out.push(0);
                }
                out.extend_from_slice(&le.to_be_bytes());
            }
        } else {
            if nc > 0 {
                out.push(nc as u8);
                out.extend_from_slice(&self.data);
            }
            if let Some(ne) = self.le {
                out.push(if ne >= 256 { 0 } else { ne as u8 });
            }
        }
        Ok(out)
    }

    /// Parses a command APDU in any of the seven ISO cases (short and extended).
    pub fn parse(raw: &[u8]) -> Result<Self, ApduError> {
        if raw.len() < 4 {
            return Err(ApduError::TooShort(raw.len()));
        }
        let mut cmd = Command::new(raw[0], raw[1], raw[2], raw[3]);
        let body = &raw[4..];
        match body.len() {
            0 => {}
            1 => cmd.le = Some(if body[0] == 0 { 256 } else { body[0] as usize }),
            _ if body[0] != 0 => {
                let nc = body[0] as usize;
                match body.len() - 1 {
                    n if n == nc => cmd.data = body[1..].to_vec(),
                    n if n == nc + 1 => {
                        cmd.data = body[1..=nc].to_vec();
                        let le = body[nc + 1];
                        cmd.le = Some(if le == 0 { 256 } else { le as usize });
                    }
                    _ => return Err(ApduError::BadLength(raw.len())),
                }
            }
            3 => {
                let ne = u16::from_be_bytes([body[1], body[2]]) as usize;
                cmd.le = Some(if ne == 0 { 65_536 } else { ne });
            }
            n if n > 3 => {
                let nc = u16::from_be_bytes([body[1], body[2]]) as usize;
                let rest = &body[3..];
                if rest.len() == nc {
                    cmd.data = rest.to_vec();
                } else if rest.len() == nc + 2 {
                    cmd.data = rest[..nc].to_vec();
                    let ne = u16::from_be_bytes([rest[nc], rest[nc + 1]]) as usize;
                    cmd.le = Some(if ne == 0 { 65_536 } else { ne });
                } else {
                    return Err(ApduError::BadLength(raw.len()));
                }
            }
            _ => return Err(ApduError::BadLength(raw.len())),
        }
        Ok(cmd)
    }
}

impl fmt::Debug for Command {
    /// Header and length only: command data may carry keys or secrets, and
    /// `Debug` output ends up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Command({:02X} {:02X} {:02X} {:02X}, Nc={}, Ne={:?})",
            self.cla,
            self.ins,
            self.p1,
            self.p2,
            self.data.len(),
            self.le
        )
    }
}

/// A raw command APDU as an APDU trace shows it: the header, the data
/// length, and the data itself only for commands whose data is public
/// (SELECT by AID, GET DATA, GET STATUS with CLA 00/80, unsecured).
/// Anything else (keys in PUT KEY, wrapped secure-channel data, wallet
/// transfers, access codes) shows as its length only.
pub fn trace_command(raw: &[u8]) -> String {
    if raw.len() < 4 {
        return format!("<{} bytes, too short>", raw.len());
    }
    let (cla, ins) = (raw[0], raw[1]);
    let header = format!("{:02X} {:02X} {:02X} {:02X}", cla, ins, raw[2], raw[3]);
    let body = &raw[4..];
    let public = matches!(cla, 0x00 | 0x80) && matches!(ins, 0xA4 | 0xCA | 0xF2);
    if body.is_empty() {
        header
    } else if public {
        format!("{header} | {}", hex::encode_upper(body))
    } else {
        format!("{header} | <{} bytes redacted>", body.len())
    }
}

/// A raw response as an APDU trace shows it: its length and status word,
/// never its data (it may carry wallet or key material).
pub fn trace_response(raw: &[u8]) -> String {
    match raw.len() {
        0 | 1 => format!("<{} bytes, too short>", raw.len()),
        n => format!("<{} bytes> {:02X}{:02X}", n - 2, raw[n - 2], raw[n - 1]),
    }
}

/// A response APDU: body plus status word.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub sw: StatusWord,
}

impl Response {
    pub fn new(data: impl Into<Vec<u8>>, sw: StatusWord) -> Self {
        Self { data: data.into(), sw }
    }

    pub fn ok(data: impl Into<Vec<u8>>) -> Self {
        Self::new(data, StatusWord::OK)
    }

    pub fn status(sw: StatusWord) -> Self {
        Self::new(Vec::new(), sw)
    }

    pub fn parse(raw: &[u8]) -> Result<Self, ApduError> {
        if raw.len() < 2 {
            return Err(ApduError::TooShort(raw.len()));
        }
        let (data, sw) = raw.split_at(raw.len() - 2);
        Ok(Self { data: data.to_vec(), sw: StatusWord::new(sw[0], sw[1]) })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_bytes());
        out
    }

    pub fn is_ok(&self) -> bool {
        self.sw == StatusWord::OK
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Response({} bytes, {})", self.data.len(), self.sw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_cases_round_trip() {
        let cases = [
            Command::new(0x00, 0xA4, 0x04, 0x00),
            Command::new(0x00, 0xA4, 0x04, 0x00).with_le(256),
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(vec![1, 2, 3]),
            Command::new(0x00, 0xA4, 0x04, 0x00).with_data(vec![0xA0; 8]).with_le(0x10),
        ];
        for c in cases {
            let bytes = c.to_bytes().expect("encodes");
            assert!(!c.is_extended());
            assert_eq!(Command::parse(&bytes).expect("parses"), c, "{bytes:02X?}");
        }
    }

    #[test]
    fn short_encoding_is_iso_layout() {
        let c = Command::new(0x00, 0xA4, 0x04, 0x00).with_data(vec![0xA0, 0x00]).with_le(256);
        assert_eq!(c.to_bytes().expect("encodes"), [0x00, 0xA4, 0x04, 0x00, 0x02, 0xA0, 0x00, 0x00]);
    }

    #[test]
    fn extended_cases_round_trip() {
        let big = vec![0x5A; 300];
        let cases = [
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(big.clone()),
            Command::new(0x80, 0xE8, 0x00, 0x00).with_data(big.clone()).with_le(65_536),
            Command::new(0x80, 0xCA, 0x9F, 0x7F).with_le(1000),
        ];
        for c in cases {
            let bytes = c.to_bytes().expect("encodes");
            assert!(c.is_extended());
            assert_eq!(bytes[4], 0, "extended marker");
            assert_eq!(Command::parse(&bytes).expect("parses"), c);
        }
    }

    #[test]
    fn malformed_commands_are_rejected() {
        assert_eq!(Command::parse(&[0, 1, 2]), Err(ApduError::TooShort(3)));
        assert!(Command::parse(&[0, 1, 2, 3, 5, 1, 2]).is_err());
        assert!(Command::parse(&[0, 1, 2, 3, 0, 0]).is_err());
        assert!(Command::new(0, 0, 0, 0).with_data(vec![0; 70_000]).to_bytes().is_err());
    }

    #[test]
    fn debug_output_hides_command_data() {
        let c = Command::new(0x80, 0xD8, 0x01, 0x81).with_data(vec![0x42; 16]);
        let s = format!("{c:?}");
        assert!(!s.contains("42"), "{s}");
        assert!(s.contains("Nc=16"));
    }

    #[test]
    fn response_split() {
        let r = Response::parse(&[1, 2, 0x90, 0x00]).expect("parses");
        assert_eq!(r.data, [1, 2]);
        assert!(r.is_ok());
        assert_eq!(r.to_bytes(), [1, 2, 0x90, 0x00]);
        assert!(Response::parse(&[0x90]).is_err());
    }

    #[test]
    fn traces_show_public_data_and_redact_the_rest() {
        let select = [0x00, 0xA4, 0x04, 0x00, 0x03, 0xA0, 0x00, 0x01, 0x00];
        assert_eq!(trace_command(&select), "00 A4 04 00 | 03A0000100");
        // PUT KEY carrying a key: the bytes never show.
        let mut put_key = vec![0x84, 0xD8, 0x01, 0x81, 0x10];
        put_key.extend([0x40; 16]);
        let t = trace_command(&put_key);
        assert_eq!(t, "84 D8 01 81 | <17 bytes redacted>");
        assert!(!t.contains("4040"));
        // A secured SELECT (CLA 84) is wrapped: redacted too.
        assert!(trace_command(&[0x84, 0xA4, 0x04, 0x00, 0x01, 0xAA]).contains("redacted"));
        assert_eq!(trace_command(&[0x80, 0xCA, 0x9F, 0x7F]), "80 CA 9F 7F");
        assert_eq!(trace_response(&[0xDE, 0xAD, 0x90, 0x00]), "<2 bytes> 9000");
        assert_eq!(trace_response(&[0x6A]), "<1 bytes, too short>");
    }
}
