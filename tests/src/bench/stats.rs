//! Percentiles and summaries of samples, and the median-with-spread of repeated runs.

use serde_json::{json, Value};

/// Nearest-rank percentile (`q` in 0..=100) of sorted samples; NaN when there are none.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let q = q.clamp(0.0, 100.0);
    // Nearest rank: the smallest value with at least q% of the samples at or below it.
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The distribution of one measured quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p5: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples` (sorted in place). NaN samples are dropped.
    pub fn of(samples: &mut Vec<f64>) -> Summary {
        samples.retain(|v| !v.is_nan());
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let mean = if n == 0 {
            f64::NAN
        } else {
            samples.iter().sum::<f64>() / n as f64
        };
        Summary {
            n,
            min: samples.first().copied().unwrap_or(f64::NAN),
            p5: percentile_sorted(samples, 5.0),
            p50: percentile_sorted(samples, 50.0),
            p95: percentile_sorted(samples, 95.0),
            p99: percentile_sorted(samples, 99.0),
            max: samples.last().copied().unwrap_or(f64::NAN),
            mean,
        }
    }

    pub fn to_json(self) -> Value {
        json!({"n": self.n, "min": num(self.min), "p5": num(self.p5), "p50": num(self.p50),
               "p95": num(self.p95), "p99": num(self.p99), "max": num(self.max), "mean": num(self.mean)})
    }
}

/// A figure measured once per repeat: its median and range across repeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeated {
    pub values: Vec<f64>,
}

impl Repeated {
    pub fn new(values: Vec<f64>) -> Repeated {
        Repeated { values }
    }

    pub fn median(&self) -> f64 {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f64::NAN, f64::max)
    }

    /// `median [min .. max]` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if self.values.len() == 1 {
            return format!("{:.*}", digits, self.median());
        }
        format!(
            "{:.*} [{:.*} .. {:.*}]",
            digits,
            self.median(),
            digits,
            self.min(),
            digits,
            self.max()
        )
    }

    pub fn to_json(&self) -> Value {
        json!({"median": num(self.median()), "min": num(self.min()), "max": num(self.max()),
               "runs": self.values.iter().map(|v| num(*v)).collect::<Vec<_>>()})
    }
}

/// A JSON number rounded to 3 decimals, or null for NaN/infinite.
pub fn num(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 50.0), 50.0);
        assert_eq!(percentile_sorted(&v, 99.0), 99.0);
        assert_eq!(percentile_sorted(&v, 100.0), 100.0);
        assert_eq!(percentile_sorted(&v, 0.0), 1.0);
        assert_eq!(percentile_sorted(&[7.0], 99.0), 7.0);
        assert!(percentile_sorted(&[], 50.0).is_nan());
    }

    #[test]
    fn summary_sorts_and_drops_nan() {
        let mut v = vec![5.0, f64::NAN, 1.0, 3.0, 2.0, 4.0];
        let s = Summary::of(&mut v);
        assert_eq!(s.n, 5);
        assert_eq!((s.min, s.p50, s.max, s.mean), (1.0, 3.0, 5.0, 3.0));
    }

    #[test]
    fn repeated_median_and_range() {
        let r = Repeated::new(vec![3.0, 1.0, 10.0, 2.0]);
        assert_eq!(r.median(), 2.5);
        assert_eq!((r.min(), r.max()), (1.0, 10.0));
        assert_eq!(r.show(1), "2.5 [1.0 .. 10.0]");
        assert_eq!(Repeated::new(vec![4.0]).show(0), "4");
    }

    #[test]
    fn json_numbers_are_rounded_and_nan_is_null() {
        assert_eq!(num(1.23456), json!(1.235));
        assert_eq!(num(f64::NAN), Value::Null);
    }
}
