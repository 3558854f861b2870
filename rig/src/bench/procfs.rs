//! What the bench reads about its own process from /proc (no unsafe code,
//! no libc): CPU time (utime + stime of /proc/self/stat), peak and current
//! resident set (VmHWM, VmRSS of /proc/self/status), open file descriptors
//! (entries of /proc/self/fd), and CPU time per live thread by thread name
//! (/proc/self/task/*/stat).

use std::collections::BTreeMap;

/// Clock ticks per second of /proc's utime and stime (USER_HZ: 100 on
/// every Linux architecture that matters here).
const TICKS: f64 = 100.0;

/// utime + stime in seconds from a /proc stat line (fields after the
/// parenthesised command name, which may itself hold spaces).
fn stat_cpu(line: &str) -> Option<f64> {
    let rest = &line[line.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// CPU seconds used by the whole process so far (every thread, exited
/// ones included).
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(stat_cpu).unwrap_or(0.0)
}

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// Peak resident set size in KiB (VmHWM).
pub fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:")
}

/// Current resident set size in KiB (VmRSS).
pub fn rss_kb() -> u64 {
    status_kb("VmRSS:")
}

/// Open file descriptors.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// CPU seconds of each live thread, summed by a category derived from the
/// thread's name (`name_of` maps a thread name to its category).
pub fn thread_cpu(name_of: impl Fn(&str) -> &'static str) -> BTreeMap<&'static str, f64> {
    let mut m = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return m;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let Some(cpu) = std::fs::read_to_string(p.join("stat")).ok().as_deref().and_then(stat_cpu) else {
            continue;
        };
        *m.entry(name_of(comm.trim())).or_insert(0.0) += cpu;
    }
    m
}

/// The machine's load averages (1, 5, 15 minutes) and its core count.
pub fn load() -> (String, usize) {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three: Vec<&str> = l.split_whitespace().take(3).collect();
    (three.join(" "), std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "123 (reader emu) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(stat_cpu(line), Some(3.0));
    }

    #[test]
    fn reads_its_own_process() {
        assert!(peak_rss_kb() > 0);
        assert!(open_fds() >= 3);
        assert!(!thread_cpu(|_| "all").is_empty());
    }
}
