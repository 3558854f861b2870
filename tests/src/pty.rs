//! Pty pairs from socat, for tests that put the real `serialport` code on
//! one end and the emulated fixture on the other. socat must be installed
//! (scripts/lib.sh TEST_PACKAGES); a missing socat fails the test with a
//! message that says so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `socat -d -d pty,raw,echo=0 pty,raw,echo=0`: two ptys wired
/// together. Killed on drop.
pub struct PtyPair {
    child: Child,
    /// The two ends (the /dev/pts paths socat reported).
    pub a: PathBuf,
    pub b: PathBuf,
}

impl PtyPair {
    pub fn new() -> Self {
        Self::start(None)
    }

    /// A pair with stable names: symlinks `a` and `b` to the ptys, so a new
    /// pair after a kill has the same paths (a fixture that comes back).
    pub fn with_links(a: &Path, b: &Path) -> Self {
        Self::start(Some((a, b)))
    }

    fn start(links: Option<(&Path, &Path)>) -> Self {
        let end = |link: Option<&Path>| match link {
            Some(l) => format!("pty,raw,echo=0,link={}", l.display()),
            None => "pty,raw,echo=0".to_string(),
        };
        // A killed socat leaves its links behind, pointing at pty numbers
        // the new pair may reuse: remove them, so the wait below sees the
        // new links only.
        if let Some((la, lb)) = links {
            let _ = std::fs::remove_file(la);
            let _ = std::fs::remove_file(lb);
        }
        let mut child = Command::new("socat")
            .args(["-d", "-d", &end(links.map(|l| l.0)), &end(links.map(|l| l.1))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start socat ({e}): the serial fixture tests need it (Debian package socat; scripts/test.sh installs it)")
            });
        let stderr = child.stderr.take().expect("socat stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // socat logs "N PTY is /dev/pts/K" once per end; the rest of its
        // log is drained so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(p) = line.split("PTY is ").nth(1) {
                    let _ = tx.send(PathBuf::from(p.trim()));
                }
            }
        });
        let mut ends = Vec::new();
        while ends.len() < 2 {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(p) => ends.push(p),
                Err(_) => {
                    let _ = child.kill();
                    panic!("socat did not report two ptys within 5 s");
                }
            }
        }
        let b = ends.pop().expect("two ends");
        let a = ends.pop().expect("two ends");
        match links {
            Some((la, lb)) => {
                // socat reports a pty before it makes the link to it.
                let started = std::time::Instant::now();
                let linked = |l: &Path, end: &Path| std::fs::read_link(l).is_ok_and(|t| t == end);
                while !(linked(la, &a) && linked(lb, &b)) {
                    if started.elapsed() > Duration::from_secs(5) {
                        let _ = child.kill();
                        panic!("socat did not make the links {} and {} within 5 s", la.display(), lb.display());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Self { child, a: la.to_path_buf(), b: lb.to_path_buf() }
            }
            None => Self { child, a, b },
        }
    }

    /// Kills socat: both ends go away, as an unplugged USB serial adapter does.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Default for PtyPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.kill();
    }
}
