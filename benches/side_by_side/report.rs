//! Repeating measurements in alternating order, and the tables that compare them.

use std::fmt::Write as _;

/// A figure each side reports once per round.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    /// Throughput: more is better. Latency and loss: less is better.
    pub higher_is_better: bool,
}

pub const fn gbps(name: &'static str) -> Metric {
    Metric {
        name,
        unit: "Gbit/s",
        higher_is_better: true,
    }
}

pub const fn ms(name: &'static str) -> Metric {
    Metric {
        name,
        unit: "ms",
        higher_is_better: false,
    }
}

pub const fn percent(name: &'static str) -> Metric {
    Metric {
        name,
        unit: "%",
        higher_is_better: false,
    }
}

/// Every sample of every metric of every side: `samples[side][metric]`.
pub struct Samples {
    pub sides: Vec<String>,
    pub metrics: Vec<Metric>,
    samples: Vec<Vec<Vec<f64>>>,
}

/// The order of the sides in round `round`: rotated by the round and reversed every
/// other round, so no side always runs first, last or right after the same neighbour.
/// Round 0 keeps the given order.
pub fn round_order(sides: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sides).map(|i| (i + round / 2) % sides).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Measures every side `repeats` times; `run(side)` returns one figure per metric, in
/// the order of `metrics`.
pub fn collect(
    sides: Vec<String>,
    metrics: &[Metric],
    repeats: usize,
    mut run: impl FnMut(usize) -> Vec<f64>,
) -> Samples {
    let mut samples = vec![vec![Vec::new(); metrics.len()]; sides.len()];
    for round in 0..repeats {
        for side in round_order(sides.len(), round) {
            println!("  round {}/{repeats}: {}", round + 1, sides[side]);
            let figures = run(side);
            assert_eq!(figures.len(), metrics.len(), "one figure per metric");
            for (m, v) in figures.into_iter().enumerate() {
                samples[side][m].push(v);
            }
        }
    }
    Samples {
        sides,
        metrics: metrics.to_vec(),
        samples,
    }
}

/// (median, min, max) of non-empty samples.
pub fn spread(samples: &[f64]) -> (f64, f64, f64) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn decimals(unit: &str) -> usize {
    match unit {
        "ms" => 3,
        "%" => 1,
        _ => 2,
    }
}

impl Samples {
    fn side(&self, name: &str) -> Option<usize> {
        self.sides.iter().position(|s| s == name)
    }

    pub fn median(&self, side: usize, metric: usize) -> f64 {
        spread(&self.samples[side][metric]).0
    }

    /// A Markdown table: one row per metric, `median (min-max)` per side.
    pub fn table(&self) -> String {
        let mut out = String::from("| metric |");
        for s in &self.sides {
            let _ = write!(out, " {s} |");
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(self.sides.len()));
        out.push('\n');
        for (m, metric) in self.metrics.iter().enumerate() {
            let d = decimals(metric.unit);
            let _ = write!(out, "| {} ({}) |", metric.name, metric.unit);
            for side in 0..self.sides.len() {
                let (med, lo, hi) = spread(&self.samples[side][m]);
                let _ = write!(out, " {med:.d$} ({lo:.d$}-{hi:.d$}) |");
            }
            out.push('\n');
        }
        out
    }

    /// Ours divided by every other side, per metric, medians; then what the issue's
    /// targets ask of these figures. `same_engine` names sides that run our engine
    /// under another command line: they get a ratio column but are no "best peer".
    pub fn ratios(&self, ours: &str, baseline: Option<&str>, same_engine: &[&str]) -> String {
        let Some(o) = self.side(ours) else {
            return String::new();
        };
        let others: Vec<usize> = (0..self.sides.len()).filter(|&s| s != o).collect();
        let mut out = String::from("| metric |");
        for &s in &others {
            let _ = write!(out, " {ours} / {} |", self.sides[s]);
        }
        out.push_str("\n|---|");
        out.push_str(&"---|".repeat(others.len()));
        out.push('\n');
        for (m, metric) in self.metrics.iter().enumerate() {
            let _ = write!(out, "| {} |", metric.name);
            for &s in &others {
                let theirs = self.median(s, m);
                let _ = if theirs == 0.0 {
                    write!(out, " - |")
                } else {
                    write!(out, " {:.2} |", self.median(o, m) / theirs)
                };
            }
            out.push('\n');
        }
        if let Some(b) = baseline.and_then(|b| self.side(b)) {
            let base = self.median(b, 0);
            let _ = write!(out, "\n{} as % of {}:", self.metrics[0].name, self.sides[b]);
            for s in (0..self.sides.len()).filter(|&s| s != b) {
                let _ = write!(
                    out,
                    " {} {:.0}%,",
                    self.sides[s],
                    100.0 * self.median(s, 0) / base
                );
            }
            out.pop();
            out.push('\n');
        }
        let peers: Vec<usize> = others
            .iter()
            .copied()
            .filter(|&s| Some(self.sides[s].as_str()) != baseline)
            .filter(|&s| !same_engine.contains(&self.sides[s].as_str()))
            .collect();
        if !peers.is_empty() {
            let _ = writeln!(out, "\n{ours} against the best peer (median):");
            for (m, metric) in self.metrics.iter().enumerate() {
                let better = |a: f64, b: f64| {
                    if metric.higher_is_better {
                        a >= b
                    } else {
                        a <= b
                    }
                };
                let best = peers
                    .iter()
                    .copied()
                    .reduce(|a, b| {
                        if better(self.median(a, m), self.median(b, m)) {
                            a
                        } else {
                            b
                        }
                    })
                    .expect("at least one peer");
                let (mine, theirs) = (self.median(o, m), self.median(best, m));
                let d = decimals(metric.unit);
                let _ = writeln!(
                    out,
                    "  {}: {ours} {mine:.d$} {}, best peer {} {theirs:.d$}: {}",
                    metric.name,
                    metric.unit,
                    self.sides[best],
                    if better(mine, theirs) {
                        "at or better than the best"
                    } else {
                        "behind the best"
                    }
                );
            }
        }
        out
    }
}
