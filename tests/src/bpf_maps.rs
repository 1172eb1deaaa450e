//! Reads the BPF maps a running proxy holds, from outside the process: its
//! map descriptors are found in `/proc/<pid>/fdinfo` (`map_id:`), each map is
//! opened by id and its entries are counted; the source filter's counters
//! (totals and per port) are found through the program attached to the interface.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuHashMap, SockHash};
use proxy_common::{Flow, PacketFlowKey, PacketRewrite, PortFilterStats, SourceFilterStats, map};

/// Entries in the proxy's socket map and flow map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceEntries {
    pub sockets: usize,
    pub flows: usize,
}

/// Counts the entries of `pid`'s [`map::SPLICE_SOCKETS`] and [`map::SPLICE_FLOWS`].
pub fn splice_entries(pid: i32) -> Result<SpliceEntries> {
    Ok(SpliceEntries {
        sockets: count_keys(map_id(pid, map::SPLICE_SOCKETS)?)?,
        flows: count_keys(map_id(pid, map::SPLICE_FLOWS)?)?,
    })
}

/// Entries in the packet plane's flow map of `pid`.
pub fn packet_flow_entries(pid: i32) -> Result<usize> {
    Ok(packet_flow_map(pid)?.keys().collect::<Result<Vec<_>, _>>()?.len())
}

/// Every entry of the packet plane's flow map of `pid`, for a failing test
/// to print.
pub fn packet_flows(pid: i32) -> Result<Vec<(PacketFlowKey, PacketRewrite)>> {
    Ok(packet_flow_map(pid)?.iter().collect::<Result<_, _>>()?)
}

/// The packet plane's flow map of `pid` (the object of the other planes,
/// loaded too, holds a one-entry map of the same name).
fn packet_flow_map(pid: i32) -> Result<HashMap<MapData, PacketFlowKey, PacketRewrite>> {
    let largest = map_ids(pid, map::PACKET_FLOWS)?
        .into_iter()
        .max_by_key(|&id| MapInfo::from_id(id).map_or(0, |info| info.max_entries()))
        .with_context(|| format!("process {pid} holds no map named {}", map::PACKET_FLOWS))?;
    open(largest)
}

/// The id of the map called `name` among `pid`'s descriptors.
fn map_id(pid: i32, name: &str) -> Result<u32> {
    map_ids(pid, name)?
        .into_iter()
        .next()
        .with_context(|| format!("process {pid} holds no BPF map named {name}"))
}

/// The ids of the maps called `name` among `pid`'s descriptors.
fn map_ids(pid: i32, name: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // Descriptors come and go while the proxy runs: skip the ones that vanished.
        let Ok(info) = std::fs::read_to_string(entry?.path()) else { continue };
        let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) else { continue };
        let id: u32 = id.trim().parse().with_context(|| format!("map_id {id:?} in {dir}"))?;
        let info = MapInfo::from_id(id).with_context(|| format!("map id {id}"))?;
        // The kernel keeps the first 15 bytes of a map's name.
        let short = &name.as_bytes()[..name.len().min(15)];
        if info.name() == short && !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Every flow in `pid`'s [`map::SPLICE_FLOWS`] with the bytes user space
/// published for it ([`map::SPLICE_USER_BYTES`]), for a failing test to print.
pub fn flows(pid: i32) -> Result<Vec<(u64, Flow, Option<u64>)>> {
    let flows: HashMap<MapData, u64, Flow> = open(map_id(pid, map::SPLICE_FLOWS)?)?;
    let user: HashMap<MapData, u64, u64> = open(map_id(pid, map::SPLICE_USER_BYTES)?)?;
    flows
        .iter()
        .map(|entry| {
            let (cookie, flow) = entry?;
            Ok((cookie, flow, user.get(&cookie, 0).ok()))
        })
        .collect()
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(id: u32) -> Result<T> {
    let data = MapData::from_id(id).with_context(|| format!("opening map id {id}"))?;
    Ok(Map::from_map_data(data).with_context(|| format!("map id {id}"))?.try_into()?)
}

fn count_keys(id: u32) -> Result<usize> {
    let data = MapData::from_id(id).with_context(|| format!("opening map id {id}"))?;
    match Map::from_map_data(data).with_context(|| format!("map id {id}"))? {
        map @ Map::SockHash(_) => {
            let sockets: SockHash<MapData, u64> = map.try_into()?;
            Ok(sockets.keys().collect::<Result<Vec<_>, _>>()?.len())
        }
        map @ Map::HashMap(_) => {
            let flows: HashMap<MapData, u64, Flow> = map.try_into()?;
            Ok(flows.keys().collect::<Result<Vec<_>, _>>()?.len())
        }
        other => bail!("map id {id} has an unexpected type: {other:?}"),
    }
}

/// The map named `name` (as the kernel shortens it) of program `prog_id`.
fn program_map(prog_id: u32, name: &str) -> Result<Map> {
    let program = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .with_context(|| format!("no loaded program with id {prog_id}"))?;
    let short = &name.as_bytes()[..name.len().min(15)];
    for id in program.map_ids()?.context("the kernel does not report a program's maps")? {
        if MapInfo::from_id(id)?.name() == short {
            let data = MapData::from_id(id).with_context(|| format!("opening map id {id}"))?;
            return Ok(Map::from_map_data(data)?);
        }
    }
    bail!("program {prog_id} uses no map named {name}")
}

/// The counters of the source filter program `prog_id` (read from its
/// [`map::SOURCE_STATS`]), summed over the CPUs.
pub fn source_filter_stats(prog_id: u32) -> Result<SourceFilterStats> {
    let stats: PerCpuArray<MapData, SourceFilterStats> =
        program_map(prog_id, map::SOURCE_STATS)?.try_into()?;
    let per_cpu = stats.get(&0, 0)?;
    Ok(per_cpu.iter().fold(SourceFilterStats::default(), |sum, cpu| sum.add(*cpu)))
}

/// Each guarded port's counters of the source filter program `prog_id`
/// (its [`map::GUARDED_PORTS`]), summed over the CPUs.
pub fn source_filter_port_stats(prog_id: u32) -> Result<BTreeMap<u16, PortFilterStats>> {
    let ports: PerCpuHashMap<MapData, u16, PortFilterStats> =
        program_map(prog_id, map::GUARDED_PORTS)?.try_into()?;
    let mut out = BTreeMap::new();
    for entry in ports.iter() {
        let (port, per_cpu) = entry?;
        out.insert(port, per_cpu.iter().fold(PortFilterStats::default(), |sum, cpu| sum.add(*cpu)));
    }
    Ok(out)
}
