//! Command line and configuration errors: documented exit codes, and
//! messages that name the bad field or address.

use std::{io::Write as _, net::TcpListener, process::Command};

use anyhow::{Context as _, Result};
use splice_proxy_tests::process::{ProxyProcess, binary, listening_on};

fn run(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(binary()?).args(args).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code(), text))
}

fn config_file(text: &str) -> Result<tempfile::NamedTempFile> {
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(text.as_bytes())?;
    Ok(file)
}

#[test]
fn check_config_accepts_a_valid_file() -> Result<()> {
    let file = config_file(
        "listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com:443\"\ndns_max_ttl = \"0s\"\n",
    )?;
    let (code, text) = run(&["check-config", "--config", file.path().to_str().unwrap()])?;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("configuration is valid"), "{text}");
    Ok(())
}

#[test]
fn malformed_config_exits_2_naming_the_field() -> Result<()> {
    let cases = [
        (
            "listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com:443\"\nconect_timeout = \"1s\"\n",
            "conect_timeout",
        ),
        ("listen = [\"127.0.0.1:6443\"]\nupstream = \"api.example.com\"\n", "upstream"),
        (
            "listen = [\"127.0.0.1:6443\"]\nupstream = \"a.example.com:443\"\ndrain_timeout = 5\n",
            "drain_timeout",
        ),
        // One address is accepted as well as a list; a bad one names the key.
        ("listen = \"127.0.0.1\"\nupstream = \"a.example.com:443\"\n", "listen"),
    ];
    for (text, field) in cases {
        let file = config_file(text)?;
        let path = file.path().to_str().unwrap();
        for args in [vec!["check-config", "--config", path], vec!["--config", path]] {
            let (code, out) = run(&args)?;
            assert_eq!(code, Some(2), "{args:?} with {text:?}: {out}");
            assert!(out.contains(&format!("`{field}")), "{text:?}: message does not name {field}: {out}");
        }
    }
    Ok(())
}

#[test]
fn bad_flags_exit_2_naming_the_flag() -> Result<()> {
    let (code, out) = run(&["--listen", "127.0.0.1:0", "--upstream", "api.example.com"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--upstream"), "{out}");
    let (code, out) = run(&["--listen", "127.0.0.1:0"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("upstream"), "{out}");
    let (code, out) =
        run(&["--listen", "127.0.0.1:0", "--upstream", "10.0.0.1:443", "--dns-max-ttl", "soon"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--dns-max-ttl"), "{out}");
    Ok(())
}

#[test]
fn a_listen_address_in_use_exits_3_naming_it() -> Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let (code, out) = run(&["--listen", &addr, "--upstream", "127.0.0.2:443", "--no-sni-check"])?;
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&addr) && out.contains("in use"), "{out}");
    Ok(())
}

/// A plain TCP proxy's flags with `workers` workers and `--listen-sockets mode`.
fn with_sockets<'a>(workers: &'a str, mode: &'a str) -> [&'a str; 7] {
    ["--upstream", "127.0.0.2:443", "--no-sni-check", "--workers", workers, "--listen-sockets", mode]
}

#[test]
fn a_port_another_proxy_listens_on_exits_3_and_is_not_shared() -> Result<()> {
    // A running proxy's listener is an SO_REUSEPORT group: a second process
    // must not join it (it would take a share of the first one's connections).
    // The proxy counts the CPUs its affinity allows (a CPU quota aside).
    let cpus = splice_proxy::cpus::allowed()?.len();
    for (mode, sockets) in [("shared", 1), ("per-worker", 3), ("per-cpu", cpus)] {
        let workers = if mode == "per-cpu" { cpus } else { 3 }.to_string();
        let running = ProxyProcess::start(&with_sockets(&workers, mode))?;
        let addr = running.addr().to_string();
        let (code, out) = run(&["--listen", &addr, "--upstream", "127.0.0.2:443", "--no-sni-check"])?;
        assert_eq!(code, Some(3), "{mode}: {out}");
        assert!(out.contains(&addr) && out.contains("in use"), "{mode}: {out}");
        let listening = listening_on(running.addr())?;
        assert_eq!(
            listening.len(),
            sockets,
            "{mode}: the running proxy's sockets and no other:\n{listening:#?}"
        );
    }
    Ok(())
}

#[test]
fn per_cpu_with_more_workers_than_cpus_exits_2_naming_both() -> Result<()> {
    let cpus = splice_proxy::cpus::allowed()?.len();
    let workers = (cpus + 1).to_string();
    let args = with_sockets(&workers, "per-cpu");
    let (code, out) = run(&[&["--listen", "127.0.0.1:0"], &args[..]].concat())?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains(&format!("{workers} workers")) && out.contains("per-cpu"), "{out}");
    // Not asked for, it is not the default on a plane whose workers move
    // the bytes (the tests' default, splice), even with a worker per CPU.
    let running = ProxyProcess::start(&args[..3])?;
    assert_eq!(listening_on(running.addr())?.len(), 1, "shared by default on splice");
    Ok(())
}

#[test]
fn an_admin_or_health_address_in_use_exits_3_naming_it() -> Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let base = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.2:443", "--no-sni-check"];
    for (flag, key) in [("--admin-listen", "admin_listen"), ("--health-listen", "health_listen")] {
        let mut args = base.to_vec();
        if flag == "--health-listen" {
            args.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        args.extend([flag, addr.as_str()]);
        let (code, out) = run(&args)?;
        assert_eq!(code, Some(3), "{args:?}: {out}");
        assert!(out.contains(&addr) && out.contains("in use") && out.contains(key), "{args:?}: {out}");
    }
    Ok(())
}

#[test]
fn help_lists_the_flags_and_exit_codes() -> Result<()> {
    let (code, out) = run(&["--help"])?;
    assert_eq!(code, Some(0));
    for needle in [
        "--listen",
        "--upstream",
        "--dns-server",
        "--dns-max-ttl",
        "--connect-timeout",
        "--config",
        "--log-format",
        "--xdp-interface",
        "--allow-source",
        "--proxy-protocol",
        "--proxy-protocol-v1",
        "--chained-proxy-headers",
        "--proxy-header-timeout",
        "--allow-vpce",
        "--allow-sni",
        "--no-sni-check",
        "--route",
        "--client-hello-timeout",
        "--admin-listen",
        "--health-listen",
        "--drain-delay",
        "--probe-interval",
        "Exit codes",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}");
    }
    Ok(())
}

#[test]
fn the_example_config_in_the_repository_is_valid() -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/splice-proxy.example.toml");
    let (code, text) = run(&["check-config", "--config", path])?;
    assert_eq!(code, Some(0), "{text}");
    Ok(())
}

#[test]
fn bad_edge_settings_exit_2_naming_the_key_and_flag() -> Result<()> {
    let base = ["--listen", "127.0.0.1:0", "--upstream", "api.example.com:443"];
    let cases: [(&[&str], &str); 5] = [
        (
            &["--proxy-protocol", "required", "--allow-vpce", "vpce-nothex!"],
            "`allowed_vpce_ids` (--allow-vpce)",
        ),
        (&["--allow-vpce", "vpce-0123abcd"], "`allowed_vpce_ids` (--allow-vpce)"),
        (
            &["--route", "a.example.com=b.example.com:1", "--route", "a.example.com=c.example.com:1"],
            "`routes` (--route)",
        ),
        (&["--no-sni-check", "--allow-sni", "a.example.com"], "`sni_check` (--no-sni-check)"),
        (&["--proxy-protocol-v1"], "`proxy_protocol_v1` (--proxy-protocol-v1)"),
    ];
    for (extra, needle) in cases {
        let args = [&base[..], extra].concat();
        let (code, out) = run(&args)?;
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(out.contains(needle), "{args:?}: message does not name {needle}: {out}");
    }
    // The default allowlist is the upstream's host name: an IP address has none.
    let (code, out) = run(&["--listen", "127.0.0.1:0", "--upstream", "10.0.0.1:443"])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("`allowed_sni` (--allow-sni)") && out.contains("--no-sni-check"), "{out}");
    let (code, out) = run(&[&base[..], &["--route", "no-equals-sign"]].concat())?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--route") && out.contains("SNI=HOST:PORT"), "{out}");
    Ok(())
}

#[test]
fn the_edge_example_in_the_docs_is_valid() -> Result<()> {
    let page = repo_file("docs/edge-guard.md")?;
    let section = page.split("## Edge guard").nth(1).expect("an Edge guard section");
    let example =
        section.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).expect("a toml block");
    let file = config_file(example)?;
    let (code, text) = run(&["check-config", "--config", file.path().to_str().unwrap()])?;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("0.0.0.0:8443"), "{text}");
    Ok(())
}

#[test]
fn the_xdp_example_in_the_docs_is_valid() -> Result<()> {
    let page = repo_file("docs/edge-guard.md")?;
    let section = page.split("**XDP source filter**").nth(1).expect("an XDP source filter paragraph");
    let example =
        section.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).expect("a toml block");
    // The example's interface does not exist here; loopback does.
    assert!(example.contains("xdp_interface = \"ens5\""), "{example}");
    assert!(example.contains("xdp_interface = \"ens6\""), "{example}");
    let file = config_file(&example.replace("\"ens5\"", "\"lo\"").replace("\"ens6\"", "\"lo\""))?;
    let (code, text) = run(&["check-config", "--config", file.path().to_str().unwrap()])?;
    assert_eq!(code, Some(0), "{text}");
    for (listen, sources) in [
        ("listen 0.0.0.0:443 ", "; sources 10.20.0.0/24, 10.20.1.0/24, 2600:1f18:abcd:ef00::/56 (XDP on lo)"),
        ("listen 0.0.0.0:8443 ", "; sources 10.99.0.0/16 (XDP on lo)"),
        ("listen 127.0.0.1:6443 ", "; sources any (not filtered)"),
    ] {
        let line = text.lines().find(|l| l.trim_start().starts_with(listen));
        assert!(line.is_some_and(|l| l.ends_with(sources)), "{listen:?} with {sources:?}: {text}");
    }
    Ok(())
}

/// A file of the repository, by its path from the root.
fn repo_file(path: &str) -> Result<String> {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
}

#[test]
fn the_flag_table_names_every_flag_of_help_and_no_other() -> Result<()> {
    let (code, help) = run(&["--help"])?;
    assert_eq!(code, Some(0), "{help}");
    let flag = |token: &str| -> Option<String> {
        let name: String = token.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        (name.starts_with("--") && name.len() > 2).then_some(name)
    };
    let in_help: std::collections::BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| line.split([' ', ',']).find_map(flag))
        .filter(|name| name != "--help" && name != "--version")
        .collect();
    let page = repo_file("docs/configuration.md")?;
    let in_table: std::collections::BTreeSet<String> =
        page.lines().filter_map(|line| line.strip_prefix("| `")).filter_map(flag).collect();
    assert!(in_help.len() > 20, "too few flags found in --help: {in_help:?}");
    assert_eq!(
        in_table, in_help,
        "docs/configuration.md's flag table (left) and splice-proxy --help (right) name different flags"
    );
    Ok(())
}
