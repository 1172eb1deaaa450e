//! Which interfaces the packet-splicing program is attached to: those named
//! (`--packet-interface`), or else every interface that carries a route of
//! the main IPv4 table, so that both the clients' and the upstreams' packets
//! pass it, whichever way they come.

use std::{collections::BTreeSet, io};

/// The main table's routes, one line each after a header: the interface
/// name is the first field.
const ROUTES: &str = "/proc/net/route";

/// The interfaces with a route, loopback left out (loopback connections
/// are not spliced: nothing crosses an interface the program could see).
pub fn routed() -> io::Result<Vec<String>> {
    let table = std::fs::read_to_string(ROUTES)?;
    Ok(interfaces_in(&table))
}

fn interfaces_in(table: &str) -> Vec<String> {
    let names: BTreeSet<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .filter(|n| *n != "lo")
        .collect();
    names.into_iter().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_routed_interface_once_without_loopback() {
        let table = "Iface\tDestination\tGateway\tFlags\n\
                     eth0\t00000000\t0100000A\t0003\n\
                     eth0\t0000000A\t00000000\t0001\n\
                     ens6\t0002000A\t00000000\t0001\n\
                     lo\t0000007F\t00000000\t0001\n";
        assert_eq!(interfaces_in(table), ["ens6", "eth0"]);
        assert!(interfaces_in("Iface\tDestination\n").is_empty());
    }
}
