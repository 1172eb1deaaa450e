//! End to end (issue 14): kubectl in `control` → WireGuard → the VPC
//! endpoint + NLB stand-in in `proxyacct` (PROXY v2 with the endpoint's
//! TLV) → the built splice-proxy on `asg-a` and `asg-b` with the deployed
//! configuration → fake API servers on the ENIs in `eks`, named by DNS.
//! Each scenario builds its own world (splice_proxy_tests::e2e::World) and tears it
//! down; on failure it prints the proxies' logs and metrics. The scenarios
//! run one at a time. `cargo xtask e2e` runs them (`--long` for the soak).

use std::{
    future::Future,
    pin::Pin,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::Result;
use splice_proxy_tests::e2e::World;

mod bad_input;
mod basic;
mod eni_rotation;
mod faults;
mod load;
mod scale_in;

type Scenario = for<'a> fn(&'a World) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// Builds the world, runs `scenario`, prints the report on failure, tears
/// everything down (also when building failed half way).
fn run(name: &str, scenario: Scenario) -> Result<()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    splice_proxy_tests::netns::require_root("the end-to-end suite")?;
    splice_proxy_tests::raise_fd_limit()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = Instant::now();
    let (world, result) = runtime.block_on(async {
        let world = match World::build(name).await {
            Ok(world) => world,
            Err(error) => return (None, Err(error.context(format!("building the world for {name}")))),
        };
        let result = scenario(&world).await.and_then(|()| {
            let panics = world.proxy_panics();
            anyhow::ensure!(panics.is_empty(), "a proxy panicked: {panics:?}");
            Ok(())
        });
        if let Err(error) = &result {
            // The error first and last: a log viewer that cuts the middle
            // of a long report still shows it.
            eprintln!("scenario {name} failed: {error:#}");
            eprintln!("{}\nerror: {error:#}", world.report().await);
        }
        (Some(world), result)
    });
    drop(world);
    runtime.shutdown_timeout(Duration::from_secs(5));
    eprintln!("scenario {name}: {:.1} s", started.elapsed().as_secs_f64());
    result
}
