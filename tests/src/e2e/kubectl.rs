//! kubectl (the machine's 1.32, `/usr/bin/kubectl`) in `control`, with a
//! kubeconfig whose server is the API host name (which `control`'s hosts
//! file points at the VPC endpoint) and whose CA is the fake API server's:
//! TLS is verified end to end. A loop of calls and a watch record what
//! happened, with times, for the scenarios to assert on.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::Command,
};
use tokio_util::sync::CancellationToken;

pub const KUBECTL: &str = "/usr/bin/kubectl";

/// How to run kubectl in `control`.
#[derive(Clone)]
pub struct Kubectl {
    netns: String,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    /// Writes the CA and the kubeconfig into `dir`.
    pub fn new(netns: &str, dir: &Path, ca_pem: &str) -> Result<Self> {
        if !Path::new(KUBECTL).is_file() {
            bail!("{KUBECTL} is missing: the end-to-end suite runs the machine's kubectl 1.32");
        }
        let ca = dir.join("cluster-ca.pem");
        std::fs::write(&ca, ca_pem)?;
        let kubeconfig = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://{host}\n    \
             certificate-authority: {ca}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\n    \
             namespace: default\ncurrent-context: e2e\nusers:\n- name: e2e\n  user:\n    token: e2e-token\n",
            host = super::API_HOST,
            ca = ca.display()
        );
        std::fs::write(&kubeconfig, text)?;
        let home = dir.join("kubectl-home");
        std::fs::create_dir_all(&home)?;
        Ok(Self { netns: netns.to_owned(), kubeconfig, home })
    }

    /// kubectl with `args`; `--request-timeout` bounds a call (a watch
    /// gets none: kubectl would end it at the timeout).
    fn command(&self, args: &[&str]) -> Command {
        let watch = args.contains(&"--watch");
        self.command_within(args, if watch { "0" } else { "20s" })
    }

    /// kubectl with `args` and `--request-timeout request_timeout`.
    fn command_within(&self, args: &[&str], request_timeout: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, KUBECTL])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.home.join("cache"))
            .args(["--request-timeout", request_timeout])
            .args(args)
            .env("HOME", &self.home)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl; its stdout, or an error with its stderr.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        Self::output(self.command(args), args).await
    }

    async fn output(mut command: Command, args: &[&str]) -> Result<String> {
        let out = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .with_context(|| format!("kubectl {args:?} did not finish in 60 s"))?
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get pods -o name`: the ENI that answered.
    pub async fn get_pods(&self) -> Result<IpAddr> {
        self.get_pods_within("20s").await
    }

    /// `kubectl get pods` bounded by `request_timeout` (kubectl retries a
    /// GET whose connection closes until its request timeout): for calls that
    /// are expected to fail, so each fails within that time.
    pub async fn get_pods_within(&self, request_timeout: &str) -> Result<IpAddr> {
        let args = ["get", "pods", "-o", "name"];
        let out = Self::output(self.command_within(&args, request_timeout), &args).await?;
        let line = out.lines().next().with_context(|| format!("no pod in {out:?}"))?;
        eni_of(line).with_context(|| format!("no ENI in {line:?}"))
    }

    /// Starts `kubectl get pods --watch -o name`.
    pub fn watch(&self) -> Result<Watch> {
        let mut child = self
            .command(&["get", "pods", "--watch", "-o", "name"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let state = Arc::new(Mutex::new(WatchState::default()));
        let sink = Arc::clone(&state);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let eni = eni_of(&line);
                lock(&sink).events.push((Instant::now(), eni));
            }
            let mut err = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut BufReader::new(stderr), &mut err).await;
            let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            lock(&sink).ended = Some((Instant::now(), format!("{status}: {}", err.trim())));
        });
        Ok(Watch { state })
    }

    /// Starts a loop of kubectl calls (`get pods`, `version`, `get --raw
    /// /version`, in turn, one at a time) until [`CallLoop::stop`].
    pub fn call_loop(&self) -> CallLoop {
        let kubectl = self.clone();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (sink, stopped) = (Arc::clone(&calls), stop.clone());
        let task = tokio::spawn(async move {
            for n in 0u64.. {
                if stopped.is_cancelled() {
                    return;
                }
                let started = Instant::now();
                let result = match n % 3 {
                    0 => kubectl.get_pods().await.map(Some),
                    1 => kubectl.version().await.map(|()| None),
                    _ => kubectl.raw_version().await.map(|()| None),
                };
                lock(&sink).push(Call {
                    started,
                    finished: Instant::now(),
                    result: result.map_err(|e| format!("{e:#}")),
                });
            }
        });
        CallLoop { calls, stop, task }
    }

    /// `kubectl version -o json`: the server's version must be the fake's.
    pub async fn version(&self) -> Result<()> {
        let out = self.run(&["version", "-o", "json"]).await?;
        let json: serde_json::Value = serde_json::from_str(&out).context("kubectl version output")?;
        let got = json["serverVersion"]["gitVersion"].as_str().unwrap_or_default();
        anyhow::ensure!(got == super::kube_api::GIT_VERSION, "server version {got:?} in {out}");
        Ok(())
    }

    /// `kubectl get --raw /version`.
    pub async fn raw_version(&self) -> Result<()> {
        let out = self.run(&["get", "--raw", "/version"]).await?;
        let json: serde_json::Value = serde_json::from_str(&out).context("/version body")?;
        anyhow::ensure!(json == super::kube_api::version(), "/version answered {out}");
        Ok(())
    }
}

/// The ENI named by a line like `pod/eni-10-2-0-11`.
#[must_use]
pub fn eni_of(line: &str) -> Option<IpAddr> {
    line.trim().strip_prefix("pod/eni-")?.replace('-', ".").parse().ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct WatchState {
    events: Vec<(Instant, Option<IpAddr>)>,
    ended: Option<(Instant, String)>,
}

/// A running `kubectl get pods --watch`; killed (its PID) on drop.
pub struct Watch {
    state: Arc<Mutex<WatchState>>,
}

impl Watch {
    /// Lines received: when, and the ENI each names.
    #[must_use]
    pub fn events(&self) -> Vec<(Instant, Option<IpAddr>)> {
        lock(&self.state).events.clone()
    }

    /// When kubectl exited, and how.
    #[must_use]
    pub fn ended(&self) -> Option<(Instant, String)> {
        lock(&self.state).ended.clone()
    }

    /// The ENI of the last event.
    #[must_use]
    pub fn eni(&self) -> Option<IpAddr> {
        self.events().last().and_then(|(_, eni)| *eni)
    }

    /// Waits until `n` events have arrived.
    pub async fn wait_events(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.events().len() < n {
            if let Some((_, how)) = self.ended() {
                bail!("the watch ended after {} events: {how}", self.events().len());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {n} watch events in {timeout:?}",
                self.events().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until kubectl exits.
    pub async fn wait_ended(&self, timeout: Duration) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ended) = self.ended() {
                return Ok(ended);
            }
            anyhow::ensure!(Instant::now() < deadline, "the watch still runs after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One kubectl call of a [`CallLoop`]: the ENI for `get pods`.
#[derive(Debug, Clone)]
pub struct Call {
    pub started: Instant,
    pub finished: Instant,
    pub result: Result<Option<IpAddr>, String>,
}

pub struct CallLoop {
    calls: Arc<Mutex<Vec<Call>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl CallLoop {
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// Waits until `n` more calls have finished.
    pub async fn wait_more(&self, n: usize, timeout: Duration) -> Result<()> {
        let target = self.calls().len() + n;
        let deadline = Instant::now() + timeout;
        while self.calls().len() < target {
            anyhow::ensure!(Instant::now() < deadline, "kubectl calls stalled: {:?}", self.calls().last());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Lets the call in progress finish; returns every call.
    pub async fn stop(self) -> Vec<Call> {
        self.stop.cancel();
        let calls = Arc::clone(&self.calls);
        let _ = self.task.await;
        lock(&calls).clone()
    }
}

/// Fails with every failed call listed.
pub fn ensure_no_failure(calls: &[Call]) -> Result<()> {
    let failed: Vec<&Call> = calls.iter().filter(|c| c.result.is_err()).collect();
    anyhow::ensure!(!calls.is_empty(), "no kubectl call was made");
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} kubectl calls failed: {failed:#?}",
        failed.len(),
        calls.len()
    );
    Ok(())
}
