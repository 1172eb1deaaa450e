use std::{io::Write as _, time::Duration};

use super::*;
use crate::{
    config::{Config, ListenerSettings},
    edge::ProxyProtocolMode,
};

fn load(text: &str, mut flags: Options) -> Result<Config, ConfigError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    flags.config = Some(f.path().into());
    Config::load(&flags)
}

const TWO_LISTENERS: &str = r#"
upstream = "api.example.com:443"
listen = ["127.0.0.1:6443"]
proxy_header_timeout = "2s"

[[listeners]]
listen = "127.0.0.1:7443"
proxy_protocol = "required"
allowed_vpce_ids = ["vpce-0123456789abcdef0"]
routes = { "b.example.com" = "b.internal:6443" }

[[listeners]]
listen = "127.0.0.1:8443"
upstream = "10.0.0.1:443"
sni_check = false
"#;

#[test]
fn listeners_take_their_own_keys_and_inherit_the_rest() {
    let c = load(TWO_LISTENERS, Options::default()).unwrap();
    assert_eq!(c.listeners.len(), 3);
    let (top, pp, plain) = (&c.listeners[0].edge, &c.listeners[1].edge, &c.listeners[2].edge);
    assert_eq!(top.proxy_protocol.mode, ProxyProtocolMode::Off);
    assert!(top.upstreams.sni_check());
    assert_eq!(pp.proxy_protocol.mode, ProxyProtocolMode::Required);
    assert_eq!(pp.proxy_protocol.header_timeout, Duration::from_secs(2));
    assert!(pp.proxy_protocol.allowed_vpce_ids.contains("vpce-0123456789abcdef0"));
    assert_eq!(pp.upstreams.choose(Some("b.example.com")).unwrap().to_string(), "b.internal:6443");
    assert_eq!(pp.upstreams.choose(Some("api.example.com")).unwrap().to_string(), "api.example.com:443");
    assert!(!plain.upstreams.sni_check());
    assert_eq!(plain.upstreams.default_upstream().unwrap().to_string(), "10.0.0.1:443");
    assert_eq!(plain.client_hello_timeout, Duration::from_secs(10));
}

#[test]
fn flags_set_the_top_level_and_listen_replaces_every_listener() {
    let flags = Options {
        listen: vec!["127.0.0.1:9443".parse().unwrap()],
        listener: ListenerSettings {
            proxy_protocol: Some(ProxyProtocolMode::Optional),
            allowed_vpce_ids: Some(vec!["vpce-0123abcd".into()]),
            ..ListenerSettings::default()
        },
        ..Options::default()
    };
    let c = load(TWO_LISTENERS, flags).unwrap();
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(c.listeners[0].edge.proxy_protocol.mode, ProxyProtocolMode::Optional);
}

#[test]
fn errors_name_the_key_and_the_listener() {
    let base = "upstream = \"api.example.com:443\"\nlisten = [\"127.0.0.1:1\"]\n";
    let cases = [
        ("proxy_protocol = \"required\"\nallowed_vpce_ids = [\"vpce-XYZ\"]\n", "`allowed_vpce_ids`"),
        ("allowed_vpce_ids = [\"vpce-0123abcd\"]\n", "`allowed_vpce_ids`"),
        ("proxy_protocol = \"sometimes\"\n", "`proxy_protocol`"),
        ("proxy_protocol_v1 = true\n", "`proxy_protocol_v1`"),
        ("proxy_protocol = \"optional\"\nproxy_header_timeout = \"0s\"\n", "`proxy_header_timeout`"),
        ("routes = { \"a b\" = \"x:1\" }\n", "`routes"),
        ("routes = { \"a.com\" = \"x\" }\n", "`routes"),
        ("allowed_sni = [\"a.com\"]\nroutes = { \"a.com\" = \"x:1\" }\n", "`routes`"),
        ("allowed_sni = [\"not a name\"]\n", "`allowed_sni`"),
        ("sni_check = false\nallowed_sni = [\"a.com\"]\n", "`sni_check`"),
        ("client_hello_timeout = \"0s\"\n", "`client_hello_timeout`"),
        ("[[listeners]]\nlisten = \"127.0.0.1:1\"\n", "listeners[0] (127.0.0.1:1): field `listen`"),
        ("[[listeners]]\nlisten = \"127.0.0.1:2\"\nbogus = 1\n", "`listeners[0].bogus"),
        (
            "[[listeners]]\nlisten = \"127.0.0.1:2\"\nupstream = \"10.0.0.1:443\"\n",
            "listeners[0] (127.0.0.1:2): field `allowed_sni` (--allow-sni)",
        ),
    ];
    for (extra, needle) in cases {
        let text = format!("{base}{extra}");
        let err = load(&text, Options::default()).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} gave {err:?}, not naming {needle}");
    }
}

#[test]
fn duplicate_routes_from_flags_are_refused() {
    let mut flags = Options::listening("127.0.0.1:1", "api.example.com:443");
    flags.listener.routes = Some(vec!["a.com=x:1".parse().unwrap(), "A.com.=y:1".parse().unwrap()]);
    let err = Config::from_options(flags).unwrap_err().to_string();
    assert!(err.contains("`routes` (--route): a.com is routed twice"), "{err}");
}

#[test]
fn an_ip_upstream_needs_names_or_no_check() {
    let flags = |no_sni_check: bool| {
        let mut flags = Options::listening("127.0.0.1:1", "10.0.0.1:443");
        flags.listener.sni_check = no_sni_check.then_some(false);
        flags
    };
    let err = Config::from_options(flags(false)).unwrap_err().to_string();
    assert!(err.contains("--no-sni-check"), "{err}");
    assert!(Config::from_options(flags(true)).is_ok());
}

fn prefixes(list: &[&str]) -> Option<BTreeSet<SourcePrefix>> {
    Some(list.iter().map(|p| p.parse().unwrap()).collect())
}

const SOURCE_LISTS: &str = r#"
upstream = "api.example.com:443"
xdp_interface = "lo"
listen = ["127.0.0.1:6443"]
allowed_source_cidrs = ["10.0.0.0/8"]

[[listeners]]
listen = "127.0.0.1:7443"
allowed_source_cidrs = ["192.0.2.0/24", "2001:db8::/32"]

[[listeners]]
listen = "127.0.0.1:8443"
"#;

#[test]
fn source_lists_per_listener_inherit_the_top_level_one() {
    let c = load(SOURCE_LISTS, Options::default()).unwrap();
    assert_eq!(c.source_filter.unwrap().interfaces, BTreeSet::from(["lo".to_owned()]));
    let lists: Vec<_> = c.listeners.iter().map(|l| l.allowed_sources.clone()).collect();
    assert_eq!(
        lists,
        vec![
            prefixes(&["10.0.0.0/8"]),
            prefixes(&["192.0.2.0/24", "2001:db8::/32"]),
            prefixes(&["10.0.0.0/8"])
        ]
    );
    // Without a top-level list, an entry without the key is not filtered.
    let text = SOURCE_LISTS.replace("allowed_source_cidrs = [\"10.0.0.0/8\"]\n", "");
    let c = load(&text, Options::default()).unwrap();
    let lists: Vec<_> = c.listeners.iter().map(|l| l.allowed_sources.clone()).collect();
    assert_eq!(lists, vec![None, prefixes(&["192.0.2.0/24", "2001:db8::/32"]), None]);
    // Two listeners on one port (other addresses) with the same list are fine.
    let same = "upstream = \"a.example.com:443\"\nxdp_interface = \"lo\"\nallowed_source_cidrs = \
                [\"10.0.0.0/8\"]\nlisten = [\"127.0.0.1:6443\", \"127.0.0.2:6443\"]\n";
    assert!(load(same, Options::default()).is_ok());
}

#[test]
fn source_list_errors_name_the_listener_and_key() {
    let entry = |extra: &str, list: &str| {
        format!(
            "upstream = \"a.example.com:443\"\n{extra}listen = [\"127.0.0.1:6443\"]\n\
             [[listeners]]\nlisten = \"127.0.0.2:7443\"\nallowed_source_cidrs = {list}\n"
        )
    };
    let lo = "xdp_interface = \"lo\"\n";
    let cases = [
        (
            entry("", "[\"192.0.2.0/24\"]"),
            "listeners[0] (127.0.0.2:7443): field `allowed_source_cidrs` (--allow-source): needs xdp_interface",
        ),
        (
            entry(lo, "[]"),
            "listeners[0] (127.0.0.2:7443): field `allowed_source_cidrs` (--allow-source): empty",
        ),
        (
            entry(lo, "[\"192.0.2.0/24\", \"192.0.2.0/24\"]"),
            "listeners[0] (127.0.0.2:7443): field `allowed_source_cidrs` (--allow-source): 192.0.2.0/24 \
             is listed twice",
        ),
        (entry(lo, "[\"192.0.2.1/24\"]"), "`listeners[0].allowed_source_cidrs[0]`"),
        (
            entry(&format!("{lo}allowed_source_cidrs = [\"10.0.0.0/8\"]\n"), "[\"192.0.2.0/24\"]")
                .replace("127.0.0.2:7443", "127.0.0.2:6443"),
            "field `allowed_source_cidrs` (--allow-source): the listeners on 127.0.0.1:6443 and \
             127.0.0.2:6443 share port 6443 but not their list",
        ),
        (
            entry(lo, "[\"192.0.2.0/24\"]").replace("127.0.0.2:7443", "127.0.0.2:6443"),
            "share port 6443 but not their list",
        ),
    ];
    for (text, needle) in cases {
        let err = load(&text, Options::default()).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} gave {err:?}, not {needle:?}");
    }
}

#[test]
fn xdp_interface_per_listener_inherits_the_top_level_one() {
    let own = SOURCE_LISTS
        .replace("listen = \"127.0.0.1:7443\"\n", "listen = \"127.0.0.1:7443\"\nxdp_interface = \"lo\"\n");
    let c = load(&own, Options::default()).unwrap();
    let interfaces: Vec<_> = c.listeners.iter().map(|l| l.xdp_interface.as_deref()).collect();
    assert_eq!(interfaces, [Some("lo"), Some("lo"), Some("lo")]);
    assert_eq!(c.source_filter.unwrap().interfaces, BTreeSet::from(["lo".to_owned()]));
    // No top-level interface: only the entry that sets one (with its list) is filtered.
    let only_entry = own
        .replace("xdp_interface = \"lo\"\nlisten", "listen")
        .replace("allowed_source_cidrs = [\"10.0.0.0/8\"]\n", "");
    let c = load(&only_entry, Options::default()).unwrap();
    let interfaces: Vec<_> = c.listeners.iter().map(|l| l.xdp_interface.as_deref()).collect();
    assert_eq!(interfaces, [None, Some("lo"), None]);
    let lists: Vec<_> = c.listeners.iter().map(|l| l.allowed_sources.is_some()).collect();
    assert_eq!(lists, [false, true, false]);
    assert_eq!(c.source_filter.unwrap().interfaces, BTreeSet::from(["lo".to_owned()]));
    // The flag is the top-level key: it replaces the file's and the entries without one take it.
    let flags = Options {
        listener: ListenerSettings { xdp_interface: Some("lo".into()), ..ListenerSettings::default() },
        ..Options::default()
    };
    let c = load(&only_entry.replace("xdp_interface = \"lo\"\n", ""), flags).unwrap();
    assert!(c.listeners.iter().all(|l| l.xdp_interface.as_deref() == Some("lo")));
}

#[test]
fn xdp_interface_errors_name_the_key_the_listener_and_the_interface() {
    let file = |top: &str, entry: &str| {
        format!(
            "upstream = \"a.example.com:443\"\n{top}listen = [\"127.0.0.1:6443\"]\n\
             [[listeners]]\nlisten = \"127.0.0.2:7443\"\n{entry}"
        )
    };
    let list = "allowed_source_cidrs = [\"192.0.2.0/24\"]\n";
    let cases = [
        (
            file("", &format!("xdp_interface = \"nosuch0\"\n{list}")),
            "listeners[0] (127.0.0.2:7443): field `xdp_interface` (--xdp-interface): no network \
             interface \"nosuch0\"",
        ),
        (
            file(&format!("xdp_interface = \"nosuch1\"\n{list}"), "xdp_interface = \"lo\"\n"),
            "field `xdp_interface` (--xdp-interface): no network interface \"nosuch1\"",
        ),
        // A list with no interface, own or inherited, as before.
        (
            file("", list),
            "listeners[0] (127.0.0.2:7443): field `allowed_source_cidrs` (--allow-source): needs xdp_interface",
        ),
        // An interface but no list anywhere: nothing would be filtered.
        (file("", "xdp_interface = \"lo\"\n"), "`allowed_source_cidrs` (--allow-source): missing"),
    ];
    for (text, needle) in cases {
        let err = load(&text, Options::default()).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} gave {err:?}, not {needle:?}");
    }
    // An entry naming the top-level interface again is fine.
    let text = "upstream = \"a.example.com:443\"\nxdp_interface = \"lo\"\n[[listeners]]\n\
                listen = \"127.0.0.2:7443\"\nxdp_interface = \"lo\"\nallowed_source_cidrs = [\"192.0.2.0/24\"]\n";
    assert!(load(text, Options::default()).is_ok(), "the same interface is used");
}
