//! Medians with their ranges, and ratios that show "—" without a reference.

use serde::Serialize;

/// Median with range (min–max) over the rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        assert!(!values.is_empty(), "a statistic of no rounds");
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
        Self { median, min: values[0], max: values[n - 1] }
    }

    pub fn show(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
    }
}

/// "—" when there is nothing to compare with, or the reference is not positive.
pub fn ratio(value: f64, reference: Option<f64>) -> String {
    ratio_above(value, reference, 0.0)
}

/// "—" when there is nothing to compare with, or the reference is not above `floor`.
pub fn ratio_above(value: f64, reference: Option<f64>, floor: f64) -> String {
    match reference {
        Some(reference) if reference > floor && value.is_finite() => format!("{:.2}", value / reference),
        _ => "—".into(),
    }
}
