//! USB smart-card readers: `rig usb list` (CCID readers with their bus-port
//! path, matched to PC/SC reader names) and `rig usb cycle PORT` (hub port
//! power off and on, or a device reset where the hub cannot). The only
//! module that uses `rusb`; the decisions (is it a reader, which PC/SC
//! name, can the hub switch the port) are pure functions, tested here.

use std::time::Duration;

use card::transport::ReaderMonitor;
use card::transport::pcsc::{PcscMonitor, ReaderFilter, Sharing};
use serde::Serialize;

/// USB class code of smart-card (CCID) devices and interfaces.
pub const CLASS_CCID: u8 = 0x0B;

/// Readers known by VID:PID (some announce a vendor class, not CCID).
/// Product ids of `None` take the vendor's every device.
pub const KNOWN_READERS: &[(u16, Option<u16>, &str)] = &[
    (0x072f, Some(0x2200), "ACS ACR122U"),
    (0x072f, Some(0x223b), "ACS ACR1252U"),
    (0x072f, Some(0x2219), "ACS ACR1251U"),
    (0x072f, Some(0x90cc), "ACS ACR38U"),
    (0x04e6, Some(0x5116), "Identiv/SCM SCR3310"),
    (0x04e6, Some(0x5720), "Identiv/SCM SCL3711"),
    (0x04e6, Some(0x5591), "Identiv/SCM SCL01x"),
    (0x076b, None, "HID Omnikey"),
    (0x096e, None, "Feitian"),
];

/// Why a device counts as a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReaderKind {
    /// Device class 0x0B.
    CcidDevice,
    /// An interface of class 0x0B.
    CcidInterface,
    /// In the table of known readers.
    Known,
}

/// Is this a smart-card reader: by class (device or interface) or VID:PID.
pub fn reader_kind(device_class: u8, interface_classes: &[u8], vid: u16, pid: u16) -> Option<ReaderKind> {
    if device_class == CLASS_CCID {
        Some(ReaderKind::CcidDevice)
    } else if interface_classes.contains(&CLASS_CCID) {
        Some(ReaderKind::CcidInterface)
    } else {
        known_reader(vid, pid).map(|_| ReaderKind::Known)
    }
}

pub fn known_reader(vid: u16, pid: u16) -> Option<&'static str> {
    KNOWN_READERS.iter().find(|(v, p, _)| *v == vid && p.is_none_or(|p| p == pid)).map(|(_, _, name)| *name)
}

/// The bus-port path as Linux writes it: `1-1.4` (bus 1, root port 1,
/// hub port 4).
pub fn port_path(bus: u8, ports: &[u8]) -> String {
    let ports: Vec<String> = ports.iter().map(u8::to_string).collect();
    format!("{bus}-{}", ports.join("."))
}

/// Reads `1-1.4` back into (bus, ports).
pub fn parse_port_path(s: &str) -> Result<(u8, Vec<u8>), String> {
    let bad = || format!("{s:?}: expected a bus-port path like 1-1.4 (see `rig usb list`)");
    let (bus, ports) = s.split_once('-').ok_or_else(bad)?;
    let bus = bus.parse().map_err(|_| bad())?;
    let ports = ports.split('.').map(|p| p.parse::<u8>().ok().filter(|p| *p > 0)).collect::<Option<Vec<_>>>();
    match ports {
        Some(p) if !p.is_empty() && p.len() <= 7 => Ok((bus, p)),
        _ => Err(bad()),
    }
}

/// A hub's power switching, from wHubCharacteristics bits 1..0 (USB 2.0
/// 11.23.2.1): 00 ganged, 01 per port, 1x none (USB 1.0 hubs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerSwitching {
    Ganged,
    PerPort,
    None,
}

pub fn power_switching(hub_characteristics: u16) -> PowerSwitching {
    match hub_characteristics & 0b11 {
        0b00 => PowerSwitching::Ganged,
        0b01 => PowerSwitching::PerPort,
        _ => PowerSwitching::None,
    }
}

/// The PC/SC reader that is this USB device: pcsc-lite's CCID driver names
/// readers after the product string and adds the serial number in
/// parentheses when the device has one. A name with the serial wins; a
/// product match alone counts only when it is unambiguous.
pub fn match_pcsc<'a>(product: Option<&str>, serial: Option<&str>, names: &'a [String]) -> Option<&'a str> {
    let product = product.map(str::trim).filter(|p| !p.is_empty())?.to_ascii_lowercase();
    let by_product: Vec<&String> = names.iter().filter(|n| n.to_ascii_lowercase().contains(&product)).collect();
    if let Some(serial) = serial.map(str::trim).filter(|s| !s.is_empty())
        && let Some(n) = by_product.iter().find(|n| n.contains(&format!("({serial})")) || n.contains(serial))
    {
        return Some(n.as_str());
    }
    match by_product.as_slice() {
        [one] => Some(one.as_str()),
        _ => None,
    }
}

/// One reader as `rig usb list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct UsbReader {
    pub path: String,
    pub vid: u16,
    pub pid: u16,
    pub kind: ReaderKind,
    pub product: Option<String>,
    pub serial: Option<String>,
    /// Why the strings are missing (typically permissions).
    pub note: Option<String>,
    pub pcsc: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum UsbCommand {
    /// CCID readers (class 0x0B, or known VID:PID) with bus-port path,
    /// product, serial and the PC/SC reader name where one matches.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Power-cycle the hub port a reader is on (per-port power switching),
    /// or reset the device where the hub cannot switch the port.
    Cycle {
        /// The bus-port path from `rig usb list`, e.g. 1-1.4.
        port: String,
        /// How long the port stays off.
        #[arg(long, default_value_t = 1000, value_name = "MS")]
        off_ms: u64,
    },
}

/// Why there is no USB here, or `None` when there is.
fn no_usb_access() -> Option<String> {
    let dev = std::path::Path::new("/dev/bus/usb");
    (cfg!(target_os = "linux") && !dev.exists()).then(|| {
        "no USB access on this machine: /dev/bus/usb does not exist (a container or VM without USB passthrough?)".into()
    })
}

/// Runs a `rig usb` command; the process exit code.
pub fn run(cmd: UsbCommand) -> i32 {
    match cmd {
        UsbCommand::List { json } => list(json),
        UsbCommand::Cycle { port, off_ms } => match cycle(&port, Duration::from_millis(off_ms)) {
            Ok(msg) => {
                println!("{msg}");
                0
            }
            Err(msg) => {
                eprintln!("rig usb cycle: {msg}");
                1
            }
        },
    }
}

fn list(json: bool) -> i32 {
    let readers = match enumerate() {
        Ok(r) => r,
        Err(msg) => {
            // No USB is a fact about this machine, not a failure of the command.
            if json {
                println!("{}", serde_json::json!({ "readers": [], "note": msg }));
            } else {
                println!("{msg}");
            }
            return 0;
        }
    };
    if json {
        println!("{}", serde_json::json!({ "readers": readers }));
        return 0;
    }
    if readers.is_empty() {
        println!("no USB smart-card readers found");
    }
    for r in &readers {
        println!(
            "{:<10} {:04x}:{:04x}  {}  serial {}{}{}",
            r.path,
            r.vid,
            r.pid,
            r.product.as_deref().unwrap_or("(product unreadable)"),
            r.serial.as_deref().unwrap_or("-"),
            r.pcsc.as_deref().map(|p| format!("  pcsc \"{p}\"")).unwrap_or_default(),
            r.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default(),
        );
    }
    0
}

fn pcsc_names() -> Vec<String> {
    let Ok(mut m) = PcscMonitor::new(ReaderFilter::new([""; 0], [""; 0]), Sharing::Shared) else {
        return Vec::new();
    };
    m.readers().map(|ids| ids.into_iter().map(|id| id.0).collect()).unwrap_or_default()
}

fn enumerate() -> Result<Vec<UsbReader>, String> {
    if let Some(msg) = no_usb_access() {
        return Err(msg);
    }
    let devices = rusb::devices().map_err(|e| format!("no USB access on this machine: {e}"))?;
    let names = pcsc_names();
    let mut out = Vec::new();
    for dev in devices.iter() {
        let Ok(desc) = dev.device_descriptor() else { continue };
        let mut ifaces = Vec::new();
        for i in 0..desc.num_configurations() {
            if let Ok(cfg) = dev.config_descriptor(i) {
                for iface in cfg.interfaces() {
                    ifaces.extend(iface.descriptors().map(|d| d.class_code()));
                }
            }
        }
        let Some(kind) = reader_kind(desc.class_code(), &ifaces, desc.vendor_id(), desc.product_id()) else {
            continue;
        };
        let path = port_path(dev.bus_number(), &dev.port_numbers().unwrap_or_default());
        let (product, serial, note) = match dev.open() {
            Ok(h) => (h.read_product_string_ascii(&desc).ok(), h.read_serial_number_string_ascii(&desc).ok(), None),
            Err(rusb::Error::Access) => (
                known_reader(desc.vendor_id(), desc.product_id()).map(str::to_string),
                None,
                Some("permission denied reading its strings: a udev rule for the plugdev group, or root".to_string()),
            ),
            Err(e) => {
                (known_reader(desc.vendor_id(), desc.product_id()).map(str::to_string), None, Some(e.to_string()))
            }
        };
        let pcsc = match_pcsc(product.as_deref(), serial.as_deref(), &names).map(str::to_string);
        out.push(UsbReader { path, vid: desc.vendor_id(), pid: desc.product_id(), kind, product, serial, note, pcsc });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

const TIMEOUT: Duration = Duration::from_secs(1);
/// Hub class requests (USB 2.0 11.24.2).
const CLEAR_FEATURE: u8 = 0x01;
const SET_FEATURE: u8 = 0x03;
const GET_DESCRIPTOR: u8 = 0x06;
const PORT_POWER: u16 = 8;
const HUB_DESCRIPTOR: u16 = 0x29;
const SUPERSPEED_HUB_DESCRIPTOR: u16 = 0x2A;

fn denied(what: &str) -> String {
    format!("permission denied opening {what}: run as root, or give the plugdev group access with a udev rule")
}

fn cycle(path: &str, off: Duration) -> Result<String, String> {
    let (bus, ports) = parse_port_path(path)?;
    if let Some(msg) = no_usb_access() {
        return Err(msg);
    }
    let devices = rusb::devices().map_err(|e| format!("no USB access on this machine: {e}"))?;
    let dev = devices
        .iter()
        .find(|d| d.bus_number() == bus && d.port_numbers().is_ok_and(|p| p == ports))
        .ok_or_else(|| format!("no USB device at {path} (see `rig usb list`)"))?;
    let port = *ports.last().ok_or("empty port path")?;
    let hub_path = port_path(bus, &ports[..ports.len() - 1]);
    let reset = |why: String| -> Result<String, String> {
        let h = dev.open().map_err(|e| match e {
            rusb::Error::Access => denied(&format!("the device at {path}")),
            e => format!("cannot open the device at {path}: {e}"),
        })?;
        h.reset().map_err(|e| format!("{why}; resetting the device at {path} failed too: {e}"))?;
        Ok(format!("{why}; reset the device at {path} instead (a USB reset, not a power cycle)"))
    };
    let Some(hub) = dev.get_parent() else {
        return reset(format!("{path} hangs off the root hub, whose ports are not switched here"));
    };
    let h = match hub.open() {
        Ok(h) => h,
        Err(rusb::Error::Access) => return Err(denied(&format!("hub {hub_path}"))),
        Err(e) => return Err(format!("cannot open hub {hub_path}: {e}")),
    };
    let in_class_device = rusb::request_type(rusb::Direction::In, rusb::RequestType::Class, rusb::Recipient::Device);
    let mut d = [0u8; 16];
    let n = h
        .read_control(in_class_device, GET_DESCRIPTOR, HUB_DESCRIPTOR << 8, 0, &mut d, TIMEOUT)
        .or_else(|_| {
            h.read_control(in_class_device, GET_DESCRIPTOR, SUPERSPEED_HUB_DESCRIPTOR << 8, 0, &mut d, TIMEOUT)
        })
        .map_err(|e| format!("cannot read hub {hub_path}'s descriptor: {e}"))?;
    if n < 5 {
        return reset(format!("hub {hub_path} returned a short hub descriptor"));
    }
    let characteristics = u16::from_le_bytes([d[3], d[4]]);
    match power_switching(characteristics) {
        PowerSwitching::PerPort => {}
        other => {
            return reset(format!(
                "hub {hub_path} does not switch port power per port ({other:?}, wHubCharacteristics {characteristics:#06x})"
            ));
        }
    }
    let out_class_other = rusb::request_type(rusb::Direction::Out, rusb::RequestType::Class, rusb::Recipient::Other);
    h.write_control(out_class_other, CLEAR_FEATURE, PORT_POWER, u16::from(port), &[], TIMEOUT)
        .map_err(|e| format!("hub {hub_path} refused to switch port {port} off: {e}"))?;
    std::thread::sleep(off);
    h.write_control(out_class_other, SET_FEATURE, PORT_POWER, u16::from(port), &[], TIMEOUT).map_err(|e| {
        format!("hub {hub_path} switched port {port} off but refused to switch it on again: {e} (replug the reader)")
    })?;
    Ok(format!("power-cycled port {port} of hub {hub_path} ({} ms off)", off.as_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_by_class_or_table() {
        assert_eq!(reader_kind(0x0B, &[], 0x1234, 1), Some(ReaderKind::CcidDevice));
        assert_eq!(reader_kind(0x00, &[0x03, 0x0B], 0x1234, 1), Some(ReaderKind::CcidInterface));
        assert_eq!(reader_kind(0xFF, &[0xFF], 0x072f, 0x2200), Some(ReaderKind::Known));
        assert_eq!(reader_kind(0x00, &[], 0x076b, 0x5427), Some(ReaderKind::Known), "every Omnikey");
        assert_eq!(reader_kind(0x09, &[0x09], 0x1d6b, 0x0002), None, "a hub");
        assert_eq!(known_reader(0x072f, 0x223b), Some("ACS ACR1252U"));
        assert_eq!(known_reader(0x072f, 0x0001), None);
    }

    #[test]
    fn port_paths_round_trip() {
        assert_eq!(port_path(1, &[1, 4]), "1-1.4");
        assert_eq!(port_path(3, &[2]), "3-2");
        assert_eq!(parse_port_path("1-1.4"), Ok((1, vec![1, 4])));
        for bad in ["1", "1-", "x-1", "1-1..2", "1-0", "1-1.4:1.0"] {
            assert!(parse_port_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_power_switching_from_characteristics() {
        assert_eq!(power_switching(0x0000), PowerSwitching::Ganged);
        assert_eq!(power_switching(0x00A9), PowerSwitching::PerPort);
        assert_eq!(power_switching(0x0002), PowerSwitching::None);
        assert_eq!(power_switching(0x0003), PowerSwitching::None);
    }

    #[test]
    fn pcsc_names_match_by_product_and_serial() {
        let names = vec![
            "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] (1E0A77C2) 00 00".to_string(),
            "ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] (1E0A9911) 01 00".to_string(),
            "HID Global OMNIKEY 5022 Smart Card Reader 02 00".to_string(),
        ];
        assert_eq!(match_pcsc(Some("ACR1252 Dual Reader"), Some("1E0A9911"), &names), Some(names[1].as_str()));
        assert_eq!(match_pcsc(Some("ACR1252 Dual Reader"), None, &names), None, "two candidates: no guess");
        assert_eq!(
            match_pcsc(Some("OMNIKEY 5022 Smart Card Reader"), None, &names),
            Some(names[2].as_str()),
            "one candidate"
        );
        assert_eq!(match_pcsc(None, Some("1E0A9911"), &names), None);
        assert_eq!(match_pcsc(Some("SCR3310"), None, &names), None);
    }
}
