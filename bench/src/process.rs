//! Child processes the bench starts (killed by their PID and reaped on drop),
//! their temporary directories, and program look-up.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

/// How long a started proxy may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process, killed (SIGKILL to its PID) and reaped on drop. A
/// process that forks (nginx's workers, socat's per-connection children)
/// gets its children killed by their PIDs too: found by parent PID.
pub struct Process {
    pub name: String,
    pub child: Child,
    /// Where its output goes, quoted when it fails.
    pub log: Option<PathBuf>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = self.log.as_ref().and_then(|path| std::fs::read_to_string(path).ok());
            bail!(
                "{} (PID {}) exited: {status}{}",
                self.name,
                self.child.id(),
                log.map(|text| format!("; its output:\n{text}")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stops it and its children (SIGSTOP), or lets them go on (SIGCONT).
    /// A peer not being measured is stopped, so that what wakes it when
    /// idle (HAProxy's resolvers, every millisecond) does not take the CPU
    /// from the peer that is.
    pub fn set_stopped(&self, stopped: bool) -> Result<()> {
        let signal = if stopped { Signal::SIGSTOP } else { Signal::SIGCONT };
        let root = self.child.id();
        for pid in std::iter::once(root).chain(crate::cpu::descendants(root)) {
            let raw = i32::try_from(pid).with_context(|| format!("PID {pid} of {}", self.name))?;
            signal::kill(Pid::from_raw(raw), signal)
                .with_context(|| format!("sending {signal} to {} (PID {pid})", self.name))?;
        }
        Ok(())
    }

    pub fn wait_until_accepting(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} does not accept on {addr} after {START_TIMEOUT:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Its children are found first, while they are still its children;
        // it is killed next, so it cannot start new ones (nginx's master
        // replaces a killed worker at once); then they are.
        let children = crate::cpu::descendants(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A directory of our own under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn create() -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("splice-proxy-bench-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `name` is a path, or a command looked up on PATH, then in /usr/sbin and
/// /usr/local/sbin (Debian installs HAProxy and nginx in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Effective UID 0, from /proc/self/status ("Uid: real effective saved fs").
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .is_some_and(|euid| euid == "0")
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        process::Command,
        thread,
        time::{Duration, Instant},
    };

    use super::Process;

    /// The state letter of `pid` (`T`: stopped, `Z`: exited, not yet
    /// reaped) from /proc/PID/stat; `None` once it is gone.
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 2..].chars().next()
    }

    /// Waits (at most 5 s) until every one of `pids` is stopped or not.
    pub(crate) fn wait_for(pids: &[u32], stopped: bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&pid| (state(pid) == Some('T')) != stopped) {
            assert!(
                Instant::now() < deadline,
                "{pids:?} not {} after 5 s",
                if stopped { "stopped" } else { "running" }
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stopped_process_and_its_children_go_on_when_continued() {
        let child = Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        let process = Process { name: "sh".into(), child, log: None };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut children = crate::cpu::descendants(process.pid());
        while children.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
            children = crate::cpu::descendants(process.pid());
        }
        assert_eq!(children.len(), 1, "sh started one sleep");
        let pids = [process.pid(), children[0]];
        process.set_stopped(true).unwrap();
        wait_for(&pids, true);
        process.set_stopped(false).unwrap();
        wait_for(&pids, false);
        // Dropped stopped or not, it is killed with its children.
        process.set_stopped(true).unwrap();
        drop(process);
        wait_for_gone(children[0]);
    }

    /// Waits (at most 5 s) until `pid` has exited (gone, or a zombie).
    fn wait_for_gone(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while state(pid).is_some_and(|state| state != 'Z') {
            assert!(Instant::now() < deadline, "PID {pid} still runs 5 s after it was killed");
            thread::sleep(Duration::from_millis(5));
        }
    }
}
