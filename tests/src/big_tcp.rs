//! IPv4 BIG TCP on a test's interfaces: GSO and GRO packets past 64 KiB,
//! whose IP total length is 0 (Linux 6.3 and later). Set over rtnetlink
//! (`IFLA_GSO_IPV4_MAX_SIZE`, `IFLA_GRO_IPV4_MAX_SIZE`), since Debian 12's
//! iproute2 (6.1) does not know them, and read back, so a test that relies
//! on it fails when the kernel did not take the setting.

use anyhow::{Context as _, Result, bail, ensure};
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::netns::in_netns;

/// Lets `interface` of `netns` send and build packets of up to `size`
/// bytes (more than 65,536 is BIG TCP); fails unless the kernel reports
/// both sizes back.
pub fn enable(netns: &str, interface: &str, size: u32) -> Result<()> {
    in_netns(netns, || set_and_check(interface, size))?
        .with_context(|| format!("BIG TCP of {size} bytes on {interface} in {netns}"))
}

fn set_and_check(interface: &str, size: u32) -> Result<()> {
    let index =
        nix::net::if_::if_nametoindex(interface).with_context(|| format!("no interface {interface}"))?;
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    socket.bind_auto().context("binding the rtnetlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting the rtnetlink socket")?;
    let mut set = LinkMessage::default();
    set.header.index = index;
    set.attributes = vec![LinkAttribute::GsoIpv4MaxSize(size), LinkAttribute::GroIpv4MaxSize(size)];
    match exchange(&socket, RouteNetlinkMessage::SetLink(set), NLM_F_ACK)? {
        NetlinkPayload::Error(error) => {
            if let Some(code) = error.code {
                bail!("RTM_SETLINK: error {code}");
            }
        }
        other => bail!("RTM_SETLINK: answered {other:?}"),
    }
    let mut get = LinkMessage::default();
    get.header.index = index;
    let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) =
        exchange(&socket, RouteNetlinkMessage::GetLink(get), 0)?
    else {
        bail!("RTM_GETLINK: no link in the answer");
    };
    let sizes = |wanted: fn(&LinkAttribute) -> Option<u32>| link.attributes.iter().find_map(wanted);
    let gso = sizes(|a| if let LinkAttribute::GsoIpv4MaxSize(s) = a { Some(*s) } else { None });
    let gro = sizes(|a| if let LinkAttribute::GroIpv4MaxSize(s) = a { Some(*s) } else { None });
    ensure!(
        (gso, gro) == (Some(size), Some(size)),
        "the kernel reports GSO {gso:?} and GRO {gro:?} bytes, not {size} (IPv4 BIG TCP needs Linux 6.3)"
    );
    Ok(())
}

/// Sends one request and returns the payload of the kernel's answer.
fn exchange(
    socket: &Socket,
    request: RouteNetlinkMessage,
    flags: u16,
) -> Result<NetlinkPayload<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut sent = vec![0; message.buffer_len()];
    message.serialize(&mut sent);
    socket.send(&sent, 0).context("sending to rtnetlink")?;
    let mut answer = Vec::with_capacity(64 << 10);
    socket.recv(&mut answer, 0).context("reading rtnetlink's answer")?;
    let answer =
        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer).context("decoding rtnetlink's answer")?;
    Ok(answer.payload)
}
