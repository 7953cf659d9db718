//! Reads a process's CPU time and resident memory from /proc (Linux), so the load
//! generator can report server CPU per delivered tick and memory per idle stream.

use std::fs;

/// Clock ticks per second of /proc/PID/stat times (USER_HZ: 100 on Linux).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds used so far by `pid` ("self" for this process).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The CPU seconds of several processes added up; `None` if there are none or one
/// cannot be read.
pub fn cpu_seconds_of(pids: &[String]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_seconds(p)).sum()
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        assert!(super::cpu_seconds("self").is_some());
        assert!(super::rss_bytes("self").unwrap() > 0);
    }
}
