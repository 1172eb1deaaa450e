//! Which data plane runs: the one configured, or `auto`'s fallback when the
//! kernel programs did not load or the packet plane could not start.

use std::borrow::Cow;

use super::StartError;
use crate::{
    dataplane::{ChosenPlane, DataPlane, Plane, packet::PacketPlane, sockmap::SockmapPlane},
    kernel::{KernelError, KernelPrograms},
};

/// The plane started, why, and what it holds of the kernel programs.
pub struct StartedPlane {
    pub plane: Plane,
    /// Logged when the server starts serving.
    pub reason: Cow<'static, str>,
    /// On the other planes: the loaded programs, kept only for their logs.
    pub unused_kernel: Option<KernelPrograms>,
}

/// What the packet plane is started with.
#[derive(Debug, Clone, Copy)]
pub struct PacketSetup<'a> {
    /// Its flow map has room for this many connections.
    pub max_connections: usize,
    /// Where its program is attached (`None`: every routed interface).
    pub interfaces: Option<&'a [String]>,
    /// `--tcp-user-timeout` (how long a spliced connection's bytes may wait
    /// for an acknowledgement) and the keepalive times (its probes).
    pub tcp: crate::sockopt::TcpConfig,
    /// When a connection relayed by hand is joined in the program.
    pub switch_after: crate::dataplane::packet::SwitchAfter,
    /// How its reset helper logs.
    pub log_format: crate::config::LogFormat,
}

/// Starts `chosen.plane`, or its fallback when it needs the kernel programs
/// and `kernel` says why they did not load. An explicit kernel plane without
/// them is an error: the operator asked for the kernel path.
pub fn start(
    chosen: ChosenPlane,
    kernel: Result<KernelPrograms, KernelError>,
    packet: PacketSetup<'_>,
) -> Result<StartedPlane, StartError> {
    let started = |plane, reason, unused_kernel| StartedPlane { plane, reason, unused_kernel };
    match (chosen.plane, kernel) {
        (DataPlane::Packet { fallback_pipe_size }, Ok(kernel)) => {
            // Its own program and map; the sockmap programs stay loaded for their logs.
            match PacketPlane::start(
                packet.max_connections,
                packet.interfaces,
                fallback_pipe_size,
                packet.tcp,
                packet.switch_after,
                packet.log_format,
            ) {
                Ok(plane) => Ok(started(Plane::Packet(plane), chosen.reason.into(), Some(kernel))),
                Err(error) => match chosen.fallback {
                    Some(fallback) => Ok(started(
                        user_space(fallback)?,
                        format!(
                            "auto: {}, because the packet plane could not start: {error}",
                            fallback.label()
                        )
                        .into(),
                        Some(kernel),
                    )),
                    None => Err(error.into()),
                },
            }
        }
        (DataPlane::Sockmap { max_inflight, fallback_pipe_size }, Ok(kernel)) => {
            let sockmap = SockmapPlane::start(kernel, max_inflight, fallback_pipe_size)?;
            Ok(started(Plane::Sockmap(sockmap), chosen.reason.into(), None))
        }
        (DataPlane::Sockmap { .. }, Err(error)) => match chosen.fallback {
            Some(fallback) => {
                Ok(started(user_space(fallback)?, fallback_reason(fallback, &error).into(), None))
            }
            None => Err(StartError::NoKernel(error.to_string())),
        },
        (DataPlane::Packet { .. }, Err(error)) => match chosen.fallback {
            Some(fallback) => {
                Ok(started(user_space(fallback)?, fallback_reason(fallback, &error).into(), None))
            }
            None => Err(StartError::PacketPlane(error.into())),
        },
        (plane, kernel) => Ok(started(user_space(plane)?, chosen.reason.into(), kernel.ok())),
    }
}

/// A plane that needs nothing from the kernel.
fn user_space(plane: DataPlane) -> Result<Plane, StartError> {
    match plane {
        DataPlane::Splice { pipe_size } => Ok(Plane::Splice { pipe_size }),
        DataPlane::Copy { buffer_size } => Ok(Plane::Copy { buffer_size }),
        DataPlane::Sockmap { .. } | DataPlane::Packet { .. } => {
            Err(StartError::NoKernel(format!("{} cannot be the fallback of another plane", plane.label())))
        }
    }
}

fn fallback_reason(fallback: DataPlane, error: &KernelError) -> String {
    format!(
        "auto: {}, because the kernel programs did not load ({error}); the kernel planes need root \
         (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) and a kernel with BTF",
        fallback.label()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::DataPlaneChoice;

    const NO_PACKET: PacketSetup<'static> = PacketSetup {
        max_connections: 1,
        interfaces: None,
        tcp: crate::sockopt::TcpConfig {
            keepalive_idle: crate::config::defaults::TCP_KEEPALIVE_IDLE,
            keepalive_interval: crate::config::defaults::TCP_KEEPALIVE_INTERVAL,
            keepalive_count: crate::config::defaults::TCP_KEEPALIVE_COUNT,
            user_timeout: std::time::Duration::ZERO,
        },
        switch_after: crate::dataplane::packet::SwitchAfter {
            time: crate::config::defaults::PACKET_SWITCH_AFTER,
            bytes: crate::config::defaults::PACKET_SWITCH_AFTER_BYTES,
            reads: crate::config::defaults::PACKET_SWITCH_AFTER_READS,
        },
        log_format: crate::config::LogFormat::Text,
    };

    fn no_kernel() -> Result<KernelPrograms, KernelError> {
        Err(KernelError::Missing { kind: "program", name: "splice_verdict" })
    }

    fn chosen(choice: DataPlaneChoice) -> ChosenPlane {
        DataPlane::choose(choice, 1 << 20, 64 << 10, 4 << 20)
    }

    #[test]
    fn auto_runs_packet_else_splice_and_says_why() {
        let auto = chosen(DataPlaneChoice::Auto);
        assert_eq!(auto.plane, DataPlane::Packet { fallback_pipe_size: 1 << 20 });
        assert_eq!(auto.fallback, Some(DataPlane::Splice { pipe_size: 1 << 20 }));
        assert!(auto.reason.starts_with("auto: packet") && auto.reason.contains("--dataplane sockmap"));
        for kernel in [no_kernel(), Err(KernelError::Missing { kind: "map", name: "x" })] {
            let started = start(auto, kernel, NO_PACKET).expect("auto runs without the kernel programs");
            assert_eq!(started.plane.settings(), DataPlane::Splice { pipe_size: 1 << 20 });
            assert!(
                started.reason.starts_with("auto: splice, because the kernel programs did not load"),
                "{}",
                started.reason
            );
        }
    }

    #[test]
    fn a_plane_with_a_fallback_runs_it_without_the_kernel_programs() {
        let sockmap = chosen(DataPlaneChoice::Sockmap);
        let with_fallback =
            ChosenPlane { fallback: Some(DataPlane::Splice { pipe_size: 1 << 20 }), ..sockmap };
        let started = start(with_fallback, no_kernel(), NO_PACKET).expect("the fallback runs");
        assert_eq!(started.plane.settings(), DataPlane::Splice { pipe_size: 1 << 20 });
        assert!(
            started.reason.starts_with("auto: splice, because the kernel programs did not load")
                && started.reason.contains("no program named splice_verdict")
                && started.reason.contains("CAP_BPF"),
            "{}",
            started.reason
        );
    }

    #[test]
    fn an_explicit_kernel_plane_without_the_kernel_programs_is_refused() {
        let error = start(chosen(DataPlaneChoice::Sockmap), no_kernel(), NO_PACKET).err().expect("started");
        assert!(matches!(error, StartError::NoKernel(_)), "{error}");
        assert!(error.to_string().contains("no program named splice_verdict"), "{error}");
        let error = start(chosen(DataPlaneChoice::Packet), no_kernel(), NO_PACKET).err().expect("started");
        assert!(matches!(error, StartError::PacketPlane(_)), "{error}");
    }

    #[test]
    fn the_other_planes_run_without_the_kernel_programs() {
        for (choice, label) in [(DataPlaneChoice::Splice, "splice"), (DataPlaneChoice::Copy, "copy")] {
            let started = start(chosen(choice), no_kernel(), NO_PACKET).expect("started");
            assert_eq!((started.plane.label(), started.reason.as_ref()), (label, chosen(choice).reason));
        }
    }
}
