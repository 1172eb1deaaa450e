//! Which upstream a connection goes to: the listener's upstream, or by the
//! server name (SNI) of its ClientHello, through a table of routes, so one
//! fleet of proxies can front several clusters. Every target is resolved
//! again for each connection (see [`crate::dns`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

use crate::addr::{TargetParseError, UpstreamHost, UpstreamTarget, is_dns_name};

/// One `SNI=HOST:PORT` route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lowercase, no trailing dot.
    pub server_name: String,
    pub upstream: UpstreamTarget,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteParseError {
    #[error("expected SNI=HOST:PORT")]
    MissingEquals,
    #[error("server name {0:?} is not a DNS name")]
    BadName(String),
    #[error("upstream of {name}: {source}")]
    BadTarget { name: String, source: TargetParseError },
}

impl FromStr for Route {
    type Err = RouteParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, target) = s.split_once('=').ok_or(RouteParseError::MissingEquals)?;
        Self::new(name, target)
    }
}

impl Route {
    fn new(name: &str, target: &str) -> Result<Self, RouteParseError> {
        let server_name = normalize_name(name).ok_or_else(|| RouteParseError::BadName(name.into()))?;
        let upstream = target
            .parse()
            .map_err(|source| RouteParseError::BadTarget { name: server_name.clone(), source })?;
        Ok(Self { server_name, upstream })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.server_name, self.upstream)
    }
}

/// A server name as configured: a DNS name, lowercased, without a trailing dot.
#[must_use]
pub fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    is_dns_name(name).then(|| name.to_ascii_lowercase())
}

/// Reads `routes = { "name" = "HOST:PORT", … }` from the config file.
pub(crate) fn de_routes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Route>, D::Error> {
    let table = BTreeMap::<String, String>::deserialize(d)?;
    table.iter().map(|(name, target)| Route::new(name, target).map_err(serde::de::Error::custom)).collect()
}

/// [`de_routes`] for an optional table (per listener).
pub(crate) fn de_routes_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Route>>, D::Error> {
    de_routes(d).map(Some)
}

/// Why a connection's server name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniRefusal {
    /// The ClientHello has no server_name.
    Missing,
    /// The name is neither allowed nor routed.
    Denied(String),
}

/// The upstreams of one listener and, with the SNI check on, which names go where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstreams {
    default: Option<UpstreamTarget>,
    sni_check: bool,
    /// Names sent to `default`.
    allowed: BTreeSet<String>,
    /// Names with an upstream of their own.
    routes: BTreeMap<String, UpstreamTarget>,
}

/// An inconsistent upstream or SNI setting; [`UpstreamsError::key`] names the config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamsError {
    #[error("missing: set the upstream HOST:PORT in the config file or with --upstream")]
    MissingUpstream,
    #[error("{0:?} is not a DNS name")]
    BadAllowedName(String),
    #[error("{0} is routed twice")]
    DuplicateRoute(String),
    #[error("{0} is both allowed (to the default upstream) and routed")]
    AllowedAndRouted(String),
    #[error(
        "the SNI check is on and no name is allowed (the default is the upstream's host name, and \
         the upstream is an IP address): set allowed_sni (--allow-sni) or routes (--route), or turn \
         the check off (--no-sni-check)"
    )]
    NothingAllowed,
    #[error("{0} is allowed but there is no upstream for it: set upstream or a route")]
    AllowedWithoutUpstream(String),
    #[error("the SNI check is off, so server names cannot be allowed or routed")]
    CheckOff,
}

impl UpstreamsError {
    /// The config key and flag this error is about.
    #[must_use]
    pub fn key(&self) -> (&'static str, &'static str) {
        match self {
            Self::MissingUpstream => ("upstream", "upstream"),
            Self::BadAllowedName(_) | Self::NothingAllowed | Self::AllowedWithoutUpstream(_) => {
                ("allowed_sni", "allow-sni")
            }
            Self::DuplicateRoute(_) | Self::AllowedAndRouted(_) => ("routes", "route"),
            Self::CheckOff => ("sni_check", "no-sni-check"),
        }
    }
}

impl Upstreams {
    /// `allowed`: `None` = the default upstream's host name.
    pub fn new(
        default: Option<UpstreamTarget>,
        sni_check: bool,
        allowed: Option<Vec<String>>,
        routes: Vec<Route>,
    ) -> Result<Self, UpstreamsError> {
        if !sni_check {
            if allowed.is_some() || !routes.is_empty() {
                return Err(UpstreamsError::CheckOff);
            }
            let default = Some(default.ok_or(UpstreamsError::MissingUpstream)?);
            return Ok(Self { default, sni_check, allowed: BTreeSet::new(), routes: BTreeMap::new() });
        }
        if default.is_none() && routes.is_empty() {
            return Err(UpstreamsError::MissingUpstream);
        }
        let mut table = BTreeMap::new();
        for route in routes {
            if table.insert(route.server_name.clone(), route.upstream).is_some() {
                return Err(UpstreamsError::DuplicateRoute(route.server_name));
            }
        }
        let explicit = allowed.is_some();
        let names = allowed.unwrap_or_else(|| match &default {
            Some(UpstreamTarget { host: UpstreamHost::Name(name), .. }) => vec![name.clone()],
            _ => Vec::new(),
        });
        let mut set = BTreeSet::new();
        for name in names {
            let normal = normalize_name(&name).ok_or(UpstreamsError::BadAllowedName(name))?;
            match (table.contains_key(&normal), explicit) {
                (true, true) => return Err(UpstreamsError::AllowedAndRouted(normal)),
                // The upstream's own name, routed elsewhere: the route wins.
                (true, false) => {}
                (false, _) if default.is_none() => {
                    return Err(UpstreamsError::AllowedWithoutUpstream(normal));
                }
                (false, _) => _ = set.insert(normal),
            }
        }
        if set.is_empty() && table.is_empty() {
            return Err(UpstreamsError::NothingAllowed);
        }
        Ok(Self { default, sni_check, allowed: set, routes: table })
    }

    #[must_use]
    pub fn sni_check(&self) -> bool {
        self.sni_check
    }

    /// The upstream without the SNI check (validated to exist then).
    #[must_use]
    pub fn default_upstream(&self) -> Option<&UpstreamTarget> {
        self.default.as_ref()
    }

    /// The upstream for a ClientHello's server name.
    pub fn choose(&self, server_name: Option<&str>) -> Result<&UpstreamTarget, SniRefusal> {
        let name = server_name.ok_or(SniRefusal::Missing)?;
        if let Some(target) = self.routes.get(name) {
            return Ok(target);
        }
        match &self.default {
            Some(target) if self.allowed.contains(name) => Ok(target),
            _ => Err(SniRefusal::Denied(name.to_owned())),
        }
    }

    /// Every upstream target (for the start-up resolution check).
    pub fn targets(&self) -> impl Iterator<Item = &UpstreamTarget> {
        self.default.iter().chain(self.routes.values())
    }

    /// A one-line summary for the start-up log.
    #[must_use]
    pub fn describe(&self) -> String {
        let default = self.default.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string);
        if !self.sni_check {
            return format!("{default} (no SNI check)");
        }
        let allowed: Vec<&str> = self.allowed.iter().map(String::as_str).collect();
        let routes: Vec<String> = self.routes.iter().map(|(n, t)| format!("{n}={t}")).collect();
        format!("{default} for SNI {allowed:?}; routes {routes:?}")
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
