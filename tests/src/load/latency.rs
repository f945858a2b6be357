//! Latency percentiles from an HDR histogram of microseconds.

use hdrhistogram::Histogram;
use serde::Serialize;

/// A new histogram of microseconds, 1 µs to 10 minutes at 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 600_000_000, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds are valid: {e}"),
    }
}

/// Records `micros`, clamped into the histogram's range (a stall longer than the range still counts).
pub fn record(hist: &mut Histogram<u64>, micros: u64) {
    let v = micros.clamp(hist.low(), hist.high());
    // In range by the clamp above, so recording cannot fail.
    let _ = hist.record(v);
}

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

impl Summary {
    /// Summarizes a histogram (all zeros when it is empty).
    pub fn of(hist: &Histogram<u64>) -> Summary {
        if hist.is_empty() {
            return Summary { count: 0, p50_us: 0, p99_us: 0, p999_us: 0, max_us: 0 };
        }
        Summary {
            count: hist.len(),
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(
            f,
            "p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  (n={})",
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            record(&mut h, v);
        }
        let s = Summary::of(&h);
        assert_eq!(s.count, 10_000);
        // 3 significant figures: within 0.1% of the exact quantile.
        assert!((4_990..=5_010).contains(&s.p50_us), "{s:?}");
        assert!((9_890..=9_910).contains(&s.p99_us), "{s:?}");
        assert!((9_980..=10_010).contains(&s.p999_us), "{s:?}");
        assert!((9_990..=10_010).contains(&s.max_us), "{s:?}");
    }

    #[test]
    fn clamps_out_of_range_and_handles_empty() {
        assert_eq!(Summary::of(&histogram()).count, 0);
        let mut h = histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= 600_000_000 - 600_000);
    }
}
