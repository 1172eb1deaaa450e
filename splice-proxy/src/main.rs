//! `splice-proxy` binary: parse, validate, run, map the outcome to an exit code.

use std::process::ExitCode;

use splice_proxy::{
    cli::{Cli, Command},
    config::{Config, Options},
    dataplane::packet::reset_helper,
    exit,
    kernel::{KernelError, KernelPrograms},
    logging,
    server::{Server, upgrade},
};

fn main() -> ExitCode {
    let cli = Cli::from_args();
    let (options, check_only) = match cli.command {
        Some(Command::CheckConfig(options)) => (*options, true),
        Some(Command::PacketResetHelper { log_format }) => return reset_helper::run(log_format),
        None => (cli.options, false),
    };
    let config = match Config::load(&options) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("splice-proxy: invalid configuration: {error}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    if check_only {
        println!("configuration is valid");
        for listener in &config.listeners {
            let edge = &listener.edge;
            let sources = match (&listener.allowed_sources, &listener.xdp_interface) {
                (Some(list), Some(interface)) => format!(
                    "{} (XDP on {interface})",
                    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                ),
                _ => "any (not filtered)".to_owned(),
            };
            println!(
                "  listen {} -> {}; proxy protocol {:?}; sources {sources}",
                listener.addr,
                edge.upstreams.describe(),
                edge.proxy_protocol.mode
            );
        }
        return ExitCode::from(exit::OK);
    }
    logging::init(config.log_format);
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    runtime.block_on(run(config, options))
}

async fn run(config: Config, flags: Options) -> ExitCode {
    let handover = match config.upgrade_socket.as_deref().map(upgrade::take_over).transpose() {
        Ok(handover) => handover.flatten(),
        Err(error) => {
            tracing::error!(%error, "start-up failed");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    if let Some(handover) = &handover {
        let listeners: Vec<String> = handover.listeners.iter().map(|h| h.bound.to_string()).collect();
        tracing::info!(?listeners, "upgrade: got the running process's sockets");
    }
    let kernel = load_kernel_programs(config.max_connections);
    let server = match Server::start(&config, kernel, &flags, handover) {
        Ok(server) => server,
        Err(error) if error.is_bind() => {
            tracing::error!(%error, "start-up failed");
            return ExitCode::from(exit::BIND);
        }
        Err(error) => {
            tracing::error!(%error, "start-up failed");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    let mut server = server;
    let stopped = server.run().await;
    server.log_totals();
    tracing::info!(?stopped, "exiting");
    ExitCode::from(exit::OK)
}

/// Every connection holds two sockets (and two pipes on the splice plane), so
/// the usual soft limit of 1,024 descriptors is raised to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard))
    {
        Ok(limit) => tracing::debug!(limit, "descriptor limit"),
        Err(error) => tracing::warn!(%error, "cannot raise the descriptor limit"),
    }
}

/// Loads the embedded kernel programs. Only the sockmap data plane needs
/// them; the others run without (the server decides).
fn load_kernel_programs(max_connections: usize) -> Result<KernelPrograms, KernelError> {
    let loaded = KernelPrograms::load(logging::kernel_log_level(), max_connections);
    match &loaded {
        Ok(_) => tracing::info!("kernel programs loaded and attached"),
        Err(error) => tracing::warn!(%error, "kernel programs unavailable on this host"),
    }
    loaded.map(|mut kernel| {
        if let Err(error) = kernel.spawn_log_forwarder() {
            tracing::warn!(%error, "kernel log records will not be shown");
        }
        kernel
    })
}
