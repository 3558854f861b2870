//! `station doctor`: what real operation needs (the PC/SC service, readers
//! and what they report about extended-length APDUs, permissions, a profile
//! that loads with verified firmware, a writable ledger folder), each as a
//! [`Check`] with the fix for what is missing.
//!
//! Only looks: serial ports and USB devices are judged by their permission
//! bits, never opened (a port may be in use by something else).

use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use card::transport::pcsc::{ExtendedApdu, PcscMonitor, ReaderFilter, Sharing};
use card::transport::{CardReader, ReaderMonitor, SlotState};
use serde::Serialize;

use crate::firmware::Firmware;
use crate::profile::Profile;

/// The socket pcsc-lite's clients use unless `PCSCLITE_CSOCK_NAME` says otherwise.
pub const SYSTEM_PCSC_SOCKET: &str = "/run/pcscd/pcscd.comm";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Worth knowing, not in the way of operation: does not fail the report.
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Listed things (readers, ports), one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<String>,
}

impl Check {
    pub fn new(name: &str, status: Status, detail: impl Into<String>) -> Self {
        Self { name: name.into(), status, detail: detail.into(), fix: None, items: Vec::new() }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    pub fn items(mut self, items: Vec<String>) -> Self {
        self.items = items;
        self
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// True when nothing failed (warnings allowed).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The report for a terminal: one line per check, its items and fix
    /// indented, then a verdict line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let _ = writeln!(out, "[{:<4}] {:<width$}  {}", c.status.label(), c.name, c.detail);
            for item in &c.items {
                let _ = writeln!(out, "         - {item}");
            }
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "         fix: {fix}");
            }
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        let (fail, warn) = (count(Status::Fail), count(Status::Warn));
        if fail == 0 {
            let _ = writeln!(out, "ready ({warn} warning(s))");
        } else {
            let _ = writeln!(out, "not ready: {fail} check(s) failed, {warn} warning(s)");
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({ "ok": self.ok(), "checks": self.checks })
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub profile: Option<PathBuf>,
    /// The ledger file whose folder must be writable.
    pub ledger: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self { profile: None, ledger: PathBuf::from("tapline-ledger.db") }
    }
}

/// Runs every check.
pub fn run(opts: &Options) -> Report {
    let me = Identity::current();
    let mut checks = Vec::new();
    let csock = std::env::var("PCSCLITE_CSOCK_NAME").ok().filter(|s| !s.is_empty());
    checks.extend(pcsc_checks(csock.as_deref()));
    checks.push(socket_check(csock.as_deref(), me.as_ref()));
    checks.push(usb_check(Path::new("/dev/bus/usb"), me.as_ref()));
    checks.push(serial_check(Path::new("/dev"), me.as_ref()));
    if let Some(p) = &opts.profile {
        checks.extend(profile_checks(p));
    }
    checks.push(ledger_check(&opts.ledger));
    Report { checks }
}

// ---------------------------------------------------------------------------
// PC/SC

fn pcsc_checks(csock: Option<&str>) -> Vec<Check> {
    let socket = csock.unwrap_or(SYSTEM_PCSC_SOCKET);
    let mut monitor = match PcscMonitor::new(ReaderFilter::all(), Sharing::Shared) {
        Ok(m) => m,
        Err(e) => {
            let mut fix = String::from(
                "install and start pcscd (apt-get install pcscd; systemctl start pcscd.socket), \
                 or for emulated readers: scripts/pcscd-vpcd.sh start N",
            );
            if let Some(s) = csock {
                let _ = write!(
                    fix,
                    "; PCSCLITE_CSOCK_NAME={s} is set: the pcscd must serve that socket \
                     (scripts/pcscd-vpcd.sh's private mode with the same variable), or unset it"
                );
            }
            return vec![Check::new("pcsc service", Status::Fail, format!("not reachable at {socket}: {e}")).fix(fix)];
        }
    };
    let mut checks = vec![Check::new("pcsc service", Status::Ok, format!("reachable at {socket}"))];
    let ids = match monitor.readers() {
        Ok(ids) => ids,
        Err(e) => {
            checks.push(
                Check::new("readers", Status::Fail, format!("listing readers failed: {e}"))
                    .fix("restart pcscd (systemctl restart pcscd, or scripts/pcscd-vpcd.sh stop; start N)"),
            );
            return checks;
        }
    };
    let mut items = Vec::new();
    let mut extended = Vec::new();
    for id in &ids {
        let name = id.as_str();
        let kind = if name.starts_with("Tapline vpcd ") { " — vpcd (emulated)" } else { "" };
        let (card, apdu) = match monitor.open_reader(id) {
            Ok(mut r) => {
                let card = match r.wait_change(&SlotState::Empty, Duration::from_millis(100)) {
                    Ok(SlotState::Present { .. }) => "card present",
                    Ok(SlotState::Empty) => "no card",
                    Err(_) => "card unknown",
                };
                let apdu = r.extended_apdu().unwrap_or_else(|e| ExtendedApdu::Unknown {
                    reason: format!("cannot ask the reader: {}", error_chain(&e)),
                });
                (card, apdu)
            }
            Err(e) => ("card unknown", ExtendedApdu::Unknown { reason: format!("cannot open the reader: {e}") }),
        };
        items.push(format!("{name}{kind}; {card}"));
        extended.push((name.to_string(), apdu));
    }
    if ids.is_empty() {
        checks.push(Check::new("readers", Status::Fail, "pcscd lists no readers").fix(
            "plug in a PC/SC reader (and check `pcsc_scan`), or for emulated readers: scripts/pcscd-vpcd.sh start N",
        ));
    } else {
        checks.push(Check::new("readers", Status::Ok, format!("{} reader(s)", ids.len())).items(items));
        checks.push(extended_apdu_check(&extended));
    }
    checks
}

/// One check over every reader's answer about extended-length APDUs:
/// ok when each reader told (supported or short only: the recipe needs
/// neither), a warning naming why for readers that did not.
pub fn extended_apdu_check(readers: &[(String, ExtendedApdu)]) -> Check {
    let name = "extended apdu";
    let items = readers.iter().map(|(reader, a)| format!("{reader}: {a}")).collect();
    let unknown = readers.iter().filter(|(_, a)| !a.is_known()).count();
    let supported = readers.iter().filter(|(_, a)| matches!(a, ExtendedApdu::Supported { .. })).count();
    if unknown == 0 {
        return Check::new(
            name,
            Status::Ok,
            format!("{supported} of {} reader(s) carry extended APDUs, the others short ones only", readers.len()),
        )
        .items(items);
    }
    Check::new(name, Status::Warn, format!("unknown for {unknown} of {} reader(s)", readers.len())).items(items).fix(
        "nothing needed for the recipe (LOAD blocks fit short APDUs); \
             check the reader's datasheet for extended-length support if a profile needs it",
    )
}

/// An error with its sources, for a report line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn socket_check(csock: Option<&str>, me: Option<&Identity>) -> Check {
    let path = Path::new(csock.unwrap_or(SYSTEM_PCSC_SOCKET));
    let name = "pcscd socket";
    let shown = path.display();
    let md = match std::fs::metadata(path) {
        Ok(md) => md,
        Err(e) => {
            return Check::new(name, Status::Fail, format!("{shown}: {e}"))
                .fix("start pcscd (systemctl start pcscd.socket, or scripts/pcscd-vpcd.sh start N)");
        }
    };
    if !md.file_type().is_socket() {
        return Check::new(name, Status::Fail, format!("{shown} is not a socket"))
            .fix("remove the stale file and restart pcscd");
    }
    let Some(me) = me else {
        return Check::new(
            name,
            Status::Warn,
            format!("{shown}: cannot tell who this process is (no /proc/self/status)"),
        );
    };
    let a = access(md.mode(), md.uid(), md.gid(), me);
    if a.read && a.write {
        Check::new(name, Status::Ok, format!("{shown} is readable and writable ({})", mode_string(md.mode())))
    } else {
        Check::new(name, Status::Fail, format!("{shown} is not read/write for this user ({})", mode_string(md.mode())))
            .fix(format!(
                "make the socket accessible (pcscd normally creates it 0777), or add the user to group {}",
                group_label(md.gid())
            ))
    }
}

// ---------------------------------------------------------------------------
// Devices

fn usb_check(dir: &Path, me: Option<&Identity>) -> Check {
    let name = "usb devices";
    let shown = dir.display();
    let buses = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) => {
            return Check::new(name, Status::Warn, format!("{shown}: {e} (only needed for USB fixtures)"))
                .fix("mount /dev from the host (containers: --device or -v /dev/bus/usb:/dev/bus/usb)");
        }
    };
    let (mut total, mut writable) = (0, 0);
    for bus in buses {
        let Ok(rd) = std::fs::read_dir(&bus) else { continue };
        for dev in rd.filter_map(Result::ok) {
            let Ok(md) = dev.metadata() else { continue };
            total += 1;
            if me.is_some_and(|me| access(md.mode(), md.uid(), md.gid(), me).write) {
                writable += 1;
            }
        }
    }
    let detail = format!(
        "{shown} readable; {total} device(s), {writable} writable by this user (by mode bits; udev ACLs not read)"
    );
    if total > 0 && writable == 0 {
        Check::new(name, Status::Warn, detail).fix(
            "for USB fixtures: a udev rule giving the device to the user's group (MODE=\"0660\", GROUP=\"plugdev\")",
        )
    } else {
        Check::new(name, Status::Ok, detail)
    }
}

/// Whether a `/dev` entry name is a serial port this checks.
pub fn is_serial_name(name: &str) -> bool {
    ["ttyUSB", "ttyACM", "ttyS"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

fn serial_check(dev: &Path, me: Option<&Identity>) -> Check {
    let name = "serial ports";
    let mut ports: Vec<(String, std::fs::Metadata)> = std::fs::read_dir(dev)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            if !is_serial_name(&n) {
                return None;
            }
            Some((n, e.metadata().ok()?))
        })
        .collect();
    ports.sort_by(|a, b| a.0.cmp(&b.0));
    if ports.is_empty() {
        return Check::new(name, Status::Ok, "none (only needed for serial fixtures)");
    }
    let mut denied_groups: Vec<u32> = Vec::new();
    let mut items = Vec::new();
    let mut open = 0;
    for (n, md) in &ports {
        let ok = me.is_some_and(|me| {
            let a = access(md.mode(), md.uid(), md.gid(), me);
            a.read && a.write
        });
        if ok {
            open += 1;
        } else if !denied_groups.contains(&md.gid()) {
            denied_groups.push(md.gid());
        }
        // ttyS* are many and mostly legacy: list only the USB ones.
        if !n.starts_with("ttyS") {
            let verdict = if ok { "can open" } else { "no access" };
            items.push(format!("/dev/{n} ({}, group {}): {verdict}", mode_string(md.mode()), group_label(md.gid())));
        }
    }
    let detail = format!("{} port(s), {open} usable by this user (by mode bits; not opened)", ports.len());
    let check = Check::new(name, if denied_groups.is_empty() { Status::Ok } else { Status::Warn }, detail).items(items);
    if denied_groups.is_empty() {
        check
    } else {
        let groups: Vec<String> = denied_groups.iter().map(|g| group_label(*g)).collect();
        check.fix(format!("for serial fixtures: sudo usermod -aG {} \"$USER\" and log in again", groups.join(",")))
    }
}

// ---------------------------------------------------------------------------
// Profile and ledger

fn profile_checks(path: &Path) -> Vec<Check> {
    let profile = match Profile::load(path) {
        Ok(p) => p,
        Err(e) => {
            return vec![
                Check::new("profile", Status::Fail, format!("{e:#}"))
                    .fix(format!("correct {} (station profile check {0})", path.display())),
            ];
        }
    };
    let mut checks = vec![Check::new("profile", Status::Ok, format!("{}: {}", path.display(), profile.product))];
    checks.push(match Firmware::load(&profile.firmware_dir, &profile.release_keys) {
        Ok(fw) => Check::new(
            "firmware",
            Status::Ok,
            format!("{} {} verified ({})", fw.manifest.name, fw.manifest.version, profile.firmware_dir.display()),
        ),
        Err(e) => Check::new("firmware", Status::Fail, format!("{}: {e:#}", profile.firmware_dir.display())).fix(
            "point the profile's firmware at a release signed by a pinned key \
             (station firmware verify DIR --profile FILE)",
        ),
    });
    checks
}

fn ledger_check(ledger: &Path) -> Check {
    let name = "ledger folder";
    let dir = match ledger.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match probe_writable(&dir) {
        Ok(()) => Check::new(name, Status::Ok, format!("{} is writable (ledger {})", dir.display(), ledger.display())),
        Err(e) => Check::new(name, Status::Fail, format!("{} is not writable: {e}", dir.display()))
            .fix("run from a writable folder, or pass --ledger PATH in a writable folder to `station run`"),
    }
}

/// Creates and removes a probe file in `dir` (SQLite needs to create its
/// journal files next to the ledger, so the folder must be writable).
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".tapline-doctor-{}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe)?;
    std::fs::remove_file(&probe)
}

// ---------------------------------------------------------------------------
// Permission helpers

/// The process's filesystem identity: user and every group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl Identity {
    pub fn current() -> Option<Self> {
        parse_proc_status(&std::fs::read_to_string("/proc/self/status").ok()?)
    }
}

/// Reads the filesystem uid, gid and supplementary groups from the text
/// of `/proc/self/status`.
pub fn parse_proc_status(text: &str) -> Option<Identity> {
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::split_whitespace);
    // Uid:/Gid: list real, effective, saved, filesystem: access uses the last.
    let uid = field("Uid:")?.nth(3)?.parse().ok()?;
    let mut gids: Vec<u32> = vec![field("Gid:")?.nth(3)?.parse().ok()?];
    if let Some(groups) = field("Groups:") {
        gids.extend(groups.filter_map(|g| g.parse::<u32>().ok()));
    }
    gids.sort_unstable();
    gids.dedup();
    Some(Identity { uid, gids })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
}

/// What the permission bits give `who` on a file with this mode and owner
/// (root gets everything; ACLs are not considered).
pub fn access(mode: u32, owner: u32, group: u32, who: &Identity) -> Access {
    if who.uid == 0 {
        return Access { read: true, write: true };
    }
    let shift = if who.uid == owner {
        6
    } else if who.gids.contains(&group) {
        3
    } else {
        0
    };
    let bits = (mode >> shift) & 0o7;
    Access { read: bits & 0o4 != 0, write: bits & 0o2 != 0 }
}

/// `rwxr-x---` for the permission bits of a mode.
pub fn mode_string(mode: u32) -> String {
    (0..9).rev().map(|i| if mode & (1 << i) != 0 { ['x', 'w', 'r'][i % 3] } else { '-' }).collect()
}

/// A group's name from `/etc/group` text.
pub fn group_name_in(etc_group: &str, gid: u32) -> Option<String> {
    etc_group.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

fn group_label(gid: u32) -> String {
    std::fs::read_to_string("/etc/group").ok().and_then(|t| group_name_in(&t, gid)).unwrap_or_else(|| gid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, gids: &[u32]) -> Identity {
        Identity { uid, gids: gids.to_vec() }
    }

    #[test]
    fn access_follows_owner_group_other_bits() {
        let alice = user(1000, &[1000, 20]);
        // crw-rw---- root:dialout
        assert_eq!(access(0o20660, 0, 20, &alice), Access { read: true, write: true });
        assert_eq!(access(0o20660, 0, 21, &alice), Access { read: false, write: false });
        // The owner class applies to the owner even if group would allow more.
        assert_eq!(access(0o0460, 1000, 1000, &alice), Access { read: true, write: false });
        // Other.
        assert_eq!(access(0o140777, 0, 0, &alice), Access { read: true, write: true });
        assert_eq!(access(0o0664, 0, 0, &alice), Access { read: true, write: false });
        // Root.
        assert_eq!(access(0o0000, 5, 5, &user(0, &[0])), Access { read: true, write: true });
    }

    #[test]
    fn proc_status_gives_fs_ids_and_groups() {
        let text = "Name:\tstation\nUid:\t1000\t1000\t1000\t1001\nGid:\t100\t100\t100\t101\nGroups:\t20 27 101 \n";
        assert_eq!(parse_proc_status(text), Some(user(1001, &[20, 27, 101])));
        let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n";
        assert_eq!(parse_proc_status(no_groups), Some(user(0, &[0])));
        assert_eq!(parse_proc_status("Name:\tx\n"), None);
        assert!(Identity::current().is_some(), "Linux has /proc/self/status");
    }

    #[test]
    fn mode_strings_and_group_names() {
        assert_eq!(mode_string(0o140777), "rwxrwxrwx");
        assert_eq!(mode_string(0o20660), "rw-rw----");
        assert_eq!(mode_string(0o0754), "rwxr-xr--");
        let etc = "root:x:0:\ndialout:x:20:alice\nbad line\nplugdev:x:46:\n";
        assert_eq!(group_name_in(etc, 20).as_deref(), Some("dialout"));
        assert_eq!(group_name_in(etc, 46).as_deref(), Some("plugdev"));
        assert_eq!(group_name_in(etc, 7), None);
    }

    #[test]
    fn serial_names() {
        for n in ["ttyUSB0", "ttyACM12", "ttyS3"] {
            assert!(is_serial_name(n), "{n}");
        }
        for n in ["ttyUSB", "ttyS", "tty0", "ttySAC0", "ttyUSB0x", "console"] {
            assert!(!is_serial_name(n), "{n}");
        }
    }

    #[test]
    fn probe_writable_leaves_nothing_and_reports_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        probe_writable(dir.path()).expect("writable");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read").count(), 0);
        assert!(probe_writable(&dir.path().join("missing")).is_err());
        assert_eq!(ledger_check(&dir.path().join("l.db")).status, Status::Ok);
        assert_eq!(ledger_check(&dir.path().join("missing/l.db")).status, Status::Fail);
    }

    #[test]
    fn extended_apdu_check_is_ok_only_when_every_reader_told() {
        use card::transport::pcsc::ApduSizeSource;
        let yes = ExtendedApdu::Supported { limit: 65_536, source: ApduSizeSource::Part10MaxApduDataSize };
        let short = ExtendedApdu::ShortOnly { source: ApduSizeSource::Part10MaxApduDataSize };
        let unknown = ExtendedApdu::Unknown { reason: "the reader reports no APDU size".into() };
        let all_told = extended_apdu_check(&[("A 00 00".into(), yes.clone()), ("B 00 00".into(), short)]);
        assert_eq!(all_told.status, Status::Ok);
        assert_eq!(all_told.detail, "1 of 2 reader(s) carry extended APDUs, the others short ones only");
        assert_eq!(
            all_told.items,
            [
                "A 00 00: extended APDUs, up to 65536 data bytes (PC/SC part 10 dwMaxAPDUDataSize)",
                "B 00 00: short APDUs only (PC/SC part 10 dwMaxAPDUDataSize)"
            ]
        );
        assert!(all_told.fix.is_none());
        let one_silent = extended_apdu_check(&[("A 00 00".into(), yes), ("C 00 00".into(), unknown)]);
        assert_eq!((one_silent.status, one_silent.detail.as_str()), (Status::Warn, "unknown for 1 of 2 reader(s)"));
        assert_eq!(one_silent.items[1], "C 00 00: unknown: the reader reports no APDU size");
        assert!(one_silent.fix.is_some());
    }

    #[test]
    fn report_renders_statuses_items_fixes_and_verdict() {
        let report = Report {
            checks: vec![
                Check::new("pcsc service", Status::Ok, "reachable at /run/pcscd/pcscd.comm"),
                Check::new("readers", Status::Ok, "1 reader(s)")
                    .items(vec!["Tapline vpcd 35963 00 00 — vpcd (emulated); no card".into()]),
                Check::new("extended apdu", Status::Warn, "unknown").fix("datasheet"),
            ],
        };
        assert!(report.ok());
        let text = report.render();
        assert_eq!(
            text,
            "[ok  ] pcsc service   reachable at /run/pcscd/pcscd.comm\n\
             [ok  ] readers        1 reader(s)\n\
             \x20        - Tapline vpcd 35963 00 00 — vpcd (emulated); no card\n\
             [warn] extended apdu  unknown\n\
             \x20        fix: datasheet\n\
             ready (1 warning(s))\n"
        );
        let mut failing = report.clone();
        failing.checks.push(Check::new("firmware", Status::Fail, "bad signature").fix("re-pack"));
        assert!(!failing.ok());
        assert!(failing.render().contains("[FAIL] firmware"));
        assert!(failing.render().ends_with("not ready: 1 check(s) failed, 1 warning(s)\n"));
        let json = failing.json();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["status"], "ok");
        assert!(json["checks"][0].get("fix").is_none());
        assert_eq!(json["checks"][2]["status"], "warn");
        assert_eq!(json["checks"][3]["fix"], "re-pack");
        assert_eq!(json["checks"][1]["items"][0], "Tapline vpcd 35963 00 00 — vpcd (emulated); no card");
    }
}
