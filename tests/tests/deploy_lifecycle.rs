//! deploy/systemd/splice-proxy-lifecycle, the drain watcher on Auto Scaling
//! instances, against a fake instance metadata service (IMDSv2, on
//! 169.254.169.254 inside the test's own network namespace) and fake
//! `systemctl` and `aws` commands that record their arguments: it polls the
//! target lifecycle state through a missing path and `InService`, and only
//! once the state is `Terminated` stops splice-proxy, then completes the
//! lifecycle action of its group, hook and instance with CONTINUE.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use splice_proxy_tests::netns::NetNs;

const SCRIPT: &str = "deploy/systemd/splice-proxy-lifecycle";
const TOKEN: &str = "test-token-0123";
const INSTANCE: &str = "i-0123456789abcdef0";

/// The answers for the lifecycle state, in order (`None`: 404); the last repeats.
const STATES: [Option<&str>; 4] = [None, Some("InService"), Some("InService"), Some("Terminated")];

/// Appends one line to the shared record of what happened, in order.
fn record(log: &Path, line: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(file, "{line}")?;
    Ok(())
}

/// Answers one IMDSv2 request: PUT /latest/api/token hands out the token; a
/// GET without it is refused with 401.
fn answer(stream: TcpStream, log: &Path, polls: &Mutex<usize>) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut token = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("x-aws-ec2-metadata-token")
        {
            token = Some(value.trim().to_owned());
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let body = match (method, path) {
        ("PUT", "/latest/api/token") => Some(TOKEN.to_owned()),
        ("GET", _) if token.as_deref() != Some(TOKEN) => return respond(stream, 401, ""),
        ("GET", "/latest/meta-data/instance-id") => Some(INSTANCE.to_owned()),
        ("GET", "/latest/meta-data/placement/region") => Some("eu-west-1".to_owned()),
        ("GET", "/latest/meta-data/autoscaling/target-lifecycle-state") => {
            let mut polls = polls.lock().unwrap_or_else(|p| p.into_inner());
            let state = STATES[(*polls).min(STATES.len() - 1)];
            *polls += 1;
            record(log, &format!("imds target-lifecycle-state {}", state.unwrap_or("404")))?;
            state.map(str::to_owned)
        }
        _ => None,
    };
    match body {
        Some(body) => respond(stream, 200, &body),
        None => respond(stream, 404, ""),
    }
}

fn respond(mut stream: TcpStream, status: u16, body: &str) -> Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// A command on PATH that records its name and arguments and succeeds.
fn fake_command(dir: &Path, name: &str, log: &Path) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\necho \"{name} $*\" >> '{}'\n", log.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(SCRIPT)
}

#[test]
fn drains_only_once_terminating_then_completes_the_lifecycle_action() -> Result<()> {
    let _ns = NetNs::enter()?;
    let ip = Command::new("ip").args(["addr", "add", "169.254.169.254/32", "dev", "lo"]).status()?;
    ensure!(ip.success(), "adding 169.254.169.254 to lo: {ip}");
    let imds = TcpListener::bind("169.254.169.254:80")?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let polls = Arc::new(Mutex::new(0));
    {
        let (log, polls) = (log.clone(), Arc::clone(&polls));
        std::thread::spawn(move || {
            for stream in imds.incoming().map_while(Result::ok) {
                let _ = answer(stream, &log, &polls);
            }
        });
    }
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin)?;
    fake_command(&bin, "systemctl", &log)?;
    fake_command(&bin, "aws", &log)?;
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let mut watcher = Command::new(script())
        .env("PATH", path)
        .env("SPLICE_PROXY_ASG", "stack-splice-proxy")
        .env("SPLICE_PROXY_LIFECYCLE_HOOK", "splice-proxy-drain")
        .env("SPLICE_PROXY_LIFECYCLE_POLL", "0.05")
        .spawn()
        .with_context(|| format!("starting {SCRIPT}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watcher.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = watcher.kill();
            let _ = watcher.wait();
            bail!("{SCRIPT} still running after 20 s: {:?}", std::fs::read_to_string(&log));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ensure!(status.success(), "{SCRIPT} exited with {status}");

    let lines: Vec<String> = std::fs::read_to_string(&log)?.lines().map(str::to_owned).collect();
    let expected = [
        "imds target-lifecycle-state 404",
        "imds target-lifecycle-state InService",
        "imds target-lifecycle-state InService",
        "imds target-lifecycle-state Terminated",
        "systemctl stop splice-proxy.service",
        "aws autoscaling complete-lifecycle-action --region eu-west-1 --auto-scaling-group-name \
         stack-splice-proxy --lifecycle-hook-name splice-proxy-drain --instance-id i-0123456789abcdef0 \
         --lifecycle-action-result CONTINUE",
    ];
    assert_eq!(lines, expected);
    Ok(())
}

#[test]
fn refuses_to_start_without_its_settings() -> Result<()> {
    let out = Command::new(script()).env_remove("SPLICE_PROXY_ASG").output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "started without SPLICE_PROXY_ASG");
    ensure!(stderr.contains("SPLICE_PROXY_ASG is not set"), "{stderr}");
    Ok(())
}
