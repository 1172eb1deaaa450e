//! A tokio runtime whose threads all live in one network namespace: every
//! socket its tasks create (listeners, connects, UDP) belongs to that
//! namespace, whichever runtime awaits the result.

use std::{fs::File, future::Future};

use anyhow::{Context as _, Result};
use nix::sched::{CloneFlags, setns};
use tokio::runtime::Runtime;

/// The runtime of one namespace ("node"); shut down on drop.
pub struct Node {
    pub netns: String,
    runtime: Option<Runtime>,
}

impl Node {
    pub fn start(netns: &str, threads: usize) -> Result<Self> {
        let path = format!("/run/netns/{netns}");
        File::open(&path).with_context(|| format!("namespace {netns}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(format!("e2e-{netns}"))
            .enable_all()
            .on_thread_start(move || {
                let target = File::open(&path).expect("the node's namespace exists");
                setns(&target, CloneFlags::CLONE_NEWNET).expect("setns into the node's namespace");
            })
            .build()
            .with_context(|| format!("runtime for {netns}"))?;
        Ok(Self { netns: netns.to_owned(), runtime: Some(runtime) })
    }

    /// Runs `future` on this node and waits for it from any runtime.
    pub async fn run<F>(&self, future: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(future).await.with_context(|| format!("a task on {} panicked", self.netns))
    }

    /// Starts `future` on this node.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().expect("running until dropped").spawn(future)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
