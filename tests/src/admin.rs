//! The proxy's admin endpoint from a test: a GET written by hand on a TCP
//! stream, and a parser of the Prometheus text format (independent of the
//! proxy's encoder).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// `GET path` on `addr` (HTTP/1.1, `Connection: close`); the status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    get_on(stream, path).await
}

/// [`get`] on a connection made elsewhere (in another network namespace, say).
pub async fn get_on(mut stream: TcpStream, path: &str) -> Result<(u16, String)> {
    let addr = stream.peer_addr()?;
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8(response).context("the response is not UTF-8")?)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("GET {path}: no response within 10 s"))??;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: the samples and each family's `# TYPE`.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text format; any line it cannot read is an error.
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').with_context(|| format!("bad TYPE line {line:?}"))?;
                out.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.samples.push(parse_sample(line).with_context(|| format!("bad sample line {line:?}"))?);
        }
        Ok(out)
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    #[must_use]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.samples.iter().find(|s| s.name == name && s.labels == wanted).map(|s| s.value)
    }

    /// [`Self::value`], 0 when the sample is absent (a counter never incremented).
    #[must_use]
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Every sample named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inside) = rest.strip_prefix('{') {
        let mut chars = inside.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().context("unterminated labels")?;
            match c {
                '}' if key.is_empty() => {
                    rest = &inside[i + 1..];
                    break;
                }
                ',' if key.is_empty() => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        bail!("label {key} has no quoted value");
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().context("unterminated label value")?.1 {
                            '"' => break,
                            '\\' => match chars.next().context("dangling escape")?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        }
    }
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_histograms() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total{reason=\"x\",path=\"q\\\"\\\\\"} 3\n\
                    b_bucket{le=\"+Inf\"} 2\nb_sum 0.5\nup 1\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.types["a_total"], "counter");
        assert_eq!(e.value("a_total", &[("reason", "x"), ("path", "q\"\\")]), Some(3.0));
        assert_eq!(e.value("b_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(e.value("b_sum", &[]), Some(0.5));
        assert_eq!(e.value("up", &[]), Some(1.0));
        assert_eq!(e.count("missing", &[]), 0.0);
        assert!(Exposition::parse("a{x=1} 2\n").is_err());
    }
}
