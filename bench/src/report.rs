//! Medians with their ranges, and one markdown table per scenario with each
//! peer's ratios to the best HAProxy configuration and to direct.

use crate::{
    measure::{Sample, Scenario, ncpu},
    peers::PeerKind,
};

/// `[before, after]`: busy % with nothing sent, before and after the run.
pub fn print_header(run: &str, haproxy_version: Option<&str>, [before, after]: [f64; 2]) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let haproxy = haproxy_version.map(|version| format!(", HAProxy {version}")).unwrap_or_default();
    println!("## Loopback throughput: {} CPUs, kernel {}{haproxy}", ncpu(), kernel.trim());
    println!();
    println!(
        "{run}. Rounds alternate across peers; each value is the median (min–max) of the rounds. \
         busy % = whole-machine busy time (ncpu × wall − Δidle, idle from /proc/uptime) over ncpu × wall; \
         core-s per GB = busy core-seconds per 10^9 bytes carried."
    );
    println!();
    println!(
        "Background load, nothing sent, proxies idle: busy {before:.1} % before the run, {after:.1} % after \
         (near 0 on a quiet machine; more means other work shares the CPUs and skews every figure)."
    );
}

/// `samples[peer][round]`, peers in the order of `kinds`; direct comes first.
pub fn print_scenario(scenario: Scenario, kinds: &[PeerKind], samples: &[Vec<Sample>]) {
    let summaries: Vec<Summary> = samples.iter().map(|rounds| Summary::of(rounds)).collect();
    let direct = &summaries[0];
    let haproxies = || (0..kinds.len()).filter(|&i| kinds[i].is_haproxy());
    // The strongest HAProxy: the fastest at full speed, the cheapest when paced.
    let best_haproxy = if scenario.is_paced() {
        haproxies().min_by(|&a, &b| summaries[a].busy.median.total_cmp(&summaries[b].busy.median))
    } else {
        haproxies().max_by(|&a, &b| summaries[a].gbit.median.total_cmp(&summaries[b].gbit.median))
    };
    println!();
    println!("### {}", scenario.title());
    println!();
    match best_haproxy {
        Some(best) => println!("Best HAProxy here: {}.", kinds[best].name()),
        None => println!("No HAProxy configuration was measured, so its ratios are left blank."),
    }
    println!();
    let best = best_haproxy.map(|i| &summaries[i]);
    if scenario.is_paced() {
        // Busy points each peer adds to direct, paired round by round.
        let added: Vec<Stat> = samples
            .iter()
            .map(|rounds| {
                Stat::of(rounds.iter().zip(&samples[0]).map(|(s, d)| s.busy_percent - d.busy_percent))
            })
            .collect();
        let best_added = best_haproxy.map(|i| added[i].median);
        println!(
            "| peer | Gbit/s achieved | busy % | core-s per GB | CPU added over direct (busy points) \
             | added ÷ best HAProxy's added | busy ÷ best HAProxy | busy ÷ direct |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for ((kind, s), added) in kinds.iter().zip(&summaries).zip(&added) {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                kind.name(),
                s.gbit.show(2),
                s.busy.show(1),
                s.cost.show(2),
                added.show(1),
                ratio_above(added.median, best_added, ADDED_NOISE_FLOOR),
                ratio(s.busy.median, best.map(|b| b.busy.median)),
                ratio(s.busy.median, Some(direct.busy.median)),
            );
        }
    } else {
        println!(
            "| peer | Gbit/s | busy % | core-s per GB | Gbit/s ÷ best HAProxy | core-s/GB ÷ best HAProxy \
             | Gbit/s ÷ direct | core-s/GB ÷ direct |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (kind, s) in kinds.iter().zip(&summaries) {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                kind.name(),
                s.gbit.show(1),
                s.busy.show(1),
                s.cost.show(2),
                ratio(s.gbit.median, best.map(|b| b.gbit.median)),
                ratio(s.cost.median, best.map(|b| b.cost.median)),
                ratio(s.gbit.median, Some(direct.gbit.median)),
                ratio(s.cost.median, Some(direct.cost.median)),
            );
        }
    }
}

/// Busy points below which CPU added over direct is noise (a saturated or
/// noisy machine), not a reference to divide by.
const ADDED_NOISE_FLOOR: f64 = 0.5;

/// "—" when there is nothing to compare with, or the reference is not positive.
fn ratio(value: f64, reference: Option<f64>) -> String {
    ratio_above(value, reference, 0.0)
}

/// "—" when there is nothing to compare with, or the reference is not above `floor`.
fn ratio_above(value: f64, reference: Option<f64>, floor: f64) -> String {
    match reference {
        Some(reference) if reference > floor => format!("{:.2}", value / reference),
        _ => "—".into(),
    }
}

/// Median with range.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        assert!(!values.is_empty(), "a statistic of no rounds");
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
        Self { median, min: values[0], max: values[n - 1] }
    }

    fn show(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
    }
}

struct Summary {
    gbit: Stat,
    busy: Stat,
    cost: Stat,
}

impl Summary {
    fn of(rounds: &[Sample]) -> Self {
        Self {
            gbit: Stat::of(rounds.iter().map(|s| s.gbit_per_s)),
            busy: Stat::of(rounds.iter().map(|s| s.busy_percent)),
            cost: Stat::of(rounds.iter().map(|s| s.core_s_per_gb)),
        }
    }
}
