//! Reads a process's CPU time, context switches and resident memory from /proc (Linux),
//! so the load generator can report server CPU per delivered tick, how often the
//! server's threads were preempted, and memory per idle stream.

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

/// Context switches of all of `pid`'s threads so far: (voluntary, involuntary). A
/// voluntary one is a thread going to sleep (nothing to do); an involuntary one is a
/// thread preempted while it had work, by another thread wanting its core.
pub fn context_switches(pid: &str) -> Option<(u64, u64)> {
    let mut total = (0, 0);
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that ended since the listing has nothing left to count.
        let Ok(status) = fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let count = |prefix: &str| {
                line.strip_prefix(prefix)
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let Some(n) = count("voluntary_ctxt_switches:") {
                total.0 += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                total.1 += n;
            }
        }
    }
    Some(total)
}

/// The context switches of several processes added up; `None` if there are none or
/// one cannot be read.
pub fn context_switches_of(pids: &[String]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|p| context_switches(p))
        .try_fold((0, 0), |a, b| b.map(|b| (a.0 + b.0, a.1 + b.1)))
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
        let (voluntary, involuntary) = super::context_switches("self").unwrap();
        assert!(voluntary + involuntary > 0);
        assert_eq!(super::context_switches_of(&[]), None);
        assert_eq!(
            super::context_switches_of(&["no-such-process".to_string()]),
            None
        );
    }
}
