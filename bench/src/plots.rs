//! SVG plots of one run (plotters): throughput and CPU per GB by peer and
//! stream count, latency percentiles by peer. Bars are medians, the black
//! line on each bar the range (min–max) of the rounds.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::{report::summaries, results::Results, stats::Stat};

/// Bars of one series (one peer, or one percentile), one per group.
struct Series {
    name: String,
    values: Vec<Stat>,
}

/// Writes the plots next to `stem` (`stem`-throughput.svg and so on);
/// returns their paths.
pub fn write(results: &Results, stem: &Path) -> Result<Vec<PathBuf>> {
    let path = |name: &str| PathBuf::from(format!("{}-{name}.svg", stem.display()));
    let mut written = Vec::new();
    let full_speed: Vec<_> = results.throughput.iter().filter(|s| s.paced_gbit_per_s.is_none()).collect();
    if let Some(first) = full_speed.first() {
        let groups: Vec<String> = full_speed.iter().map(|s| s.scenario.clone()).collect();
        let by_peer = |value: fn(&crate::throughput::Sample) -> f64| -> Vec<Series> {
            (0..first.peers.len())
                .map(|peer| Series {
                    name: first.peers[peer].peer.clone(),
                    values: full_speed.iter().map(|s| summaries(&s.peers, value)[peer]).collect(),
                })
                .collect()
        };
        for (name, title, unit, value) in [
            (
                "throughput",
                "Throughput by peer and stream count",
                "Gbit/s",
                (|s: &crate::throughput::Sample| s.gbit_per_s) as fn(&_) -> f64,
            ),
            ("cpu-per-gb", "Whole-machine CPU per GB moved", "core-seconds per GB", |s| s.core_s_per_gb),
        ] {
            bars(&path(name), title, unit, &groups, &by_peer(value))?;
            written.push(path(name));
        }
    }
    for result in &results.latency {
        let size = crate::latency::size_name(result.request_bytes);
        let groups: Vec<String> = result
            .peers
            .iter()
            .map(|p| p.kind.map_or_else(|| p.peer.clone(), |k| k.short_name().into()))
            .collect();
        let series: Vec<Series> = [
            ("p50", (|s: &crate::latency::Sample| s.p50_us) as fn(&_) -> f64),
            ("p99", |s| s.p99_us),
            ("p99.9", |s| s.p999_us),
        ]
        .into_iter()
        .map(|(name, value)| Series { name: name.into(), values: summaries(&result.peers, value) })
        .collect();
        let name = format!("latency-{}", size.replace(' ', ""));
        // Groups are peers here (short names: sp = splice-proxy, HAP = HAProxy),
        // the series the three percentiles.
        bars(&path(&name), &format!("Round-trip latency, {size} ping-pong"), "µs", &groups, &series)?;
        written.push(path(&name));
    }
    Ok(written)
}

/// A grouped bar chart: one group per `groups` entry, one bar per series in
/// each, a legend of the series.
fn bars(path: &Path, title: &str, unit: &str, groups: &[String], series: &[Series]) -> Result<()> {
    let plot_error = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let top = series.iter().flat_map(|s| s.values.iter().map(|v| v.max)).fold(0.0, f64::max).max(1e-9) * 1.15;
    let root = SVGBackend::new(path, (1100, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(if groups.iter().any(|g| g.len() > 12) { 90 } else { 40 })
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top)
        .map_err(|e| plot_error(&e))?;
    let labels = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&move |x: &f64| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 12))
        .y_desc(unit)
        .draw()
        .map_err(|e| plot_error(&e))?;
    let width = 0.8 / series.len() as f64;
    for (index, one) in series.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let left = |group: usize| group as f64 + 0.1 + width * index as f64;
        chart
            .draw_series(one.values.iter().enumerate().map(|(group, stat)| {
                Rectangle::new([(left(group), 0.0), (left(group) + width * 0.9, stat.median)], color.filled())
            }))
            .map_err(|e| plot_error(&e))?
            .label(one.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(one.values.iter().enumerate().map(|(group, stat)| {
                let middle = left(group) + width * 0.45;
                PathElement::new(vec![(middle, stat.min), (middle, stat.max)], BLACK.stroke_width(1))
            }))
            .map_err(|e| plot_error(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_error(&e))?;
    root.present().map_err(|e| plot_error(&e))?;
    Ok(())
}
