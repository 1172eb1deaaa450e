use super::*;

fn target(s: &str) -> UpstreamTarget {
    s.parse().unwrap()
}

fn route(s: &str) -> Route {
    s.parse().unwrap()
}

#[test]
fn routes_parse() {
    let r = route("A.Example.com.=b.internal:6443");
    assert_eq!(r.server_name, "a.example.com");
    assert_eq!(r.upstream, target("b.internal:6443"));
    assert_eq!("a.example.com".parse::<Route>(), Err(RouteParseError::MissingEquals));
    assert!(matches!("a b=c:1".parse::<Route>(), Err(RouteParseError::BadName(_))));
    assert!(matches!("a.com=c".parse::<Route>(), Err(RouteParseError::BadTarget { .. })));
}

#[test]
fn the_default_allowlist_is_the_upstreams_name() {
    let u = Upstreams::new(Some(target("api.example.com:443")), true, None, vec![]).unwrap();
    assert_eq!(u.choose(Some("api.example.com")), Ok(&target("api.example.com:443")));
    assert_eq!(u.choose(Some("other.example.com")), Err(SniRefusal::Denied("other.example.com".into())));
    assert_eq!(u.choose(None), Err(SniRefusal::Missing));
}

#[test]
fn routes_pick_their_own_upstream() {
    let u = Upstreams::new(
        Some(target("api.example.com:443")),
        true,
        None,
        vec![route("a.example.com=10.0.0.1:443"), route("b.example.com=b.internal:6443")],
    )
    .unwrap();
    assert_eq!(u.choose(Some("a.example.com")), Ok(&target("10.0.0.1:443")));
    assert_eq!(u.choose(Some("b.example.com")), Ok(&target("b.internal:6443")));
    assert_eq!(u.choose(Some("api.example.com")), Ok(&target("api.example.com:443")));
    assert_eq!(u.targets().count(), 3);
}

#[test]
fn inconsistent_settings_are_refused() {
    let ip = || Some(target("10.0.0.1:443"));
    let cases = [
        (Upstreams::new(ip(), true, None, vec![]), UpstreamsError::NothingAllowed),
        (Upstreams::new(ip(), true, Some(vec![]), vec![]), UpstreamsError::NothingAllowed),
        (Upstreams::new(None, true, None, vec![]), UpstreamsError::MissingUpstream),
        (Upstreams::new(None, false, None, vec![]), UpstreamsError::MissingUpstream),
        (Upstreams::new(ip(), false, Some(vec!["a.com".into()]), vec![]), UpstreamsError::CheckOff),
        (Upstreams::new(ip(), false, None, vec![route("a.com=b:1")]), UpstreamsError::CheckOff),
        (
            Upstreams::new(ip(), true, None, vec![route("a.com=b:1"), route("A.com=c:1")]),
            UpstreamsError::DuplicateRoute("a.com".into()),
        ),
        (
            Upstreams::new(ip(), true, Some(vec!["a.com".into()]), vec![route("a.com=b:1")]),
            UpstreamsError::AllowedAndRouted("a.com".into()),
        ),
        (
            Upstreams::new(None, true, Some(vec!["a.com".into()]), vec![route("b.com=b:1")]),
            UpstreamsError::AllowedWithoutUpstream("a.com".into()),
        ),
        (
            Upstreams::new(ip(), true, Some(vec!["a..com".into()]), vec![]),
            UpstreamsError::BadAllowedName("a..com".into()),
        ),
    ];
    for (result, expected) in cases {
        assert_eq!(result, Err(expected));
    }
}

#[test]
fn without_the_check_only_the_default_counts() {
    let u = Upstreams::new(Some(target("10.0.0.1:443")), false, None, vec![]).unwrap();
    assert!(!u.sni_check());
    assert_eq!(u.default_upstream(), Some(&target("10.0.0.1:443")));
}
