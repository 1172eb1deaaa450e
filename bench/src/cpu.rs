//! CPU and memory as the kernel reports them: whole-machine idle time
//! (/proc/uptime), and a process tree's CPU ticks and resident memory
//! (/proc/PID/stat, /proc/PID/status).
//!
//! Busy time of the machine is ncpu × wall − Δidle. The user/system tick
//! counters are not used for the machine: on virtual machines they alias with
//! paced traffic. A process's own utime + stime are such tick counters
//! (sampled at each timer tick, `CLK_TCK` per second), so its share is coarse.

use std::{thread, time::Duration, time::Instant};

use anyhow::{Context as _, Result};

/// Whole-machine busy % over `duration` with nothing sent: how quiet the machine is.
pub fn background_busy_percent(duration: Duration) -> Result<f64> {
    let idle_before = idle_seconds()?;
    let started = Instant::now();
    thread::sleep(duration);
    let capacity = ncpu() as f64 * started.elapsed().as_secs_f64();
    Ok(100.0 * (capacity - (idle_seconds()? - idle_before)).max(0.0) / capacity)
}

/// Online CPUs: the `cpuN` lines of /proc/stat, the CPUs whose idle time
/// /proc/uptime sums (whatever this process's affinity).
pub fn ncpu() -> usize {
    let per_cpu_lines = std::fs::read_to_string("/proc/stat").map_or(0, |stat| {
        stat.lines()
            .filter(|line| {
                line.strip_prefix("cpu").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count()
    });
    if per_cpu_lines > 0 {
        per_cpu_lines
    } else {
        thread::available_parallelism().map_or(1, std::num::NonZero::get)
    }
}

/// Idle time of all CPUs together, in seconds (second field of /proc/uptime).
pub fn idle_seconds() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    text.split_whitespace().nth(1).context("/proc/uptime has no idle field")?.parse().context("/proc/uptime")
}

/// Clock ticks per second of /proc/PID/stat's time fields (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/PID/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; it ends at the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    Some(rest.split_whitespace().skip(1).map(|field| field.parse().unwrap_or(0)).collect())
}

/// The live descendants of `root` (children, their children, ...), from the
/// parent PID of every process in /proc.
pub fn descendants(root: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(u32, u32)> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, *stat_fields(pid)?.first()? as u32)))
        .collect();
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        next += 1;
    }
    found.remove(0);
    found
}

/// CPU ticks used by `root` and its descendants so far: utime + stime of the
/// root and of every live descendant, plus the root's cutime + cstime (its
/// children that have exited and been reaped, such as socat's per-connection
/// processes). Differences of two readings are what the tree used in between.
pub fn tree_ticks(root: u32) -> u64 {
    // Fields 14-17 (utime, stime, cutime, cstime) are at indexes 11-14 here.
    let own = |pid: u32| stat_fields(pid).map_or(0, |f| f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0));
    let reaped = stat_fields(root).map_or(0, |f| f.get(13).unwrap_or(&0) + f.get(14).unwrap_or(&0));
    own(root) + reaped + descendants(root).into_iter().map(own).sum::<u64>()
}

/// Resident memory of `root` and its live descendants, in bytes (VmRSS of
/// each; pages shared between them are counted once per process).
pub fn tree_rss_bytes(root: u32) -> u64 {
    std::iter::once(root).chain(descendants(root)).map(rss_bytes).sum()
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok().map_or(0, |status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    })
}

/// Kernel memory the TCP stack holds for socket buffers (the `mem` pages of
/// the TCP line of /proc/net/sockstat), in bytes; and the kernel's slab
/// memory (`Slab` of /proc/meminfo, whole machine), in bytes.
pub fn kernel_socket_memory() -> (u64, u64) {
    let page = 4096;
    let tcp_pages = std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|text| {
        let line = text.lines().find(|line| line.starts_with("TCP:"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "mem")?;
        fields.get(at + 1)?.parse::<u64>().ok()
    });
    let slab_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find_map(|line| line.strip_prefix("Slab:"))?;
        line.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
    });
    (tcp_pages.unwrap_or(0) * page, slab_kb.unwrap_or(0) * 1024)
}
