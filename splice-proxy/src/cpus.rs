//! The CPUs this process may run on, and pinning a thread to one of them
//! (`listen_sockets = "per-cpu"`).

use std::io;

use nix::{sched::CpuSet, unistd::Pid};

/// The CPUs the calling thread's affinity allows, in ascending order: the
/// process's (a container's cpuset, `taskset`, systemd's `CPUAffinity=`)
/// when called from a thread that was not pinned.
pub fn allowed() -> io::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(0)).map_err(io::Error::from)?;
    Ok((0..CpuSet::count()).filter(|&cpu| set.is_set(cpu).unwrap_or(false)).collect())
}

/// Pins the calling thread to `cpu`.
pub fn pin_this_thread(cpu: usize) -> io::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// The CPU the calling thread may run on, if only one.
#[cfg(test)]
pub(crate) fn pinned_to() -> io::Result<Option<usize>> {
    Ok(match allowed()?.as_slice() {
        [one] => Some(*one),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_pinned_to_an_allowed_cpu_runs_only_there() {
        let cpus = allowed().unwrap();
        assert!(!cpus.is_empty(), "a process may run on some CPU");
        let last = *cpus.last().unwrap();
        let pinned = std::thread::spawn(move || {
            pin_this_thread(last).unwrap();
            pinned_to().unwrap()
        });
        assert_eq!(pinned.join().unwrap(), Some(last));
        assert_eq!(allowed().unwrap(), cpus, "only the pinned thread changed");
    }
}
