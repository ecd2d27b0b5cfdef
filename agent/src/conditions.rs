//! Emulated network conditions as people write them: `50ms`, `1.5ms`, `0`, `1%`.
//! One strict reader for the labels, `sidecar-agent shape` and the control socket,
//! so all three accept exactly the same values and name what is wrong.

use std::time::Duration;

use sidecar::netem::{Conditions, Spread, MAX_DELAY};

/// Reads a one-way delay: a decimal number and a unit (`ns`, `us`, `ms`, `s`), or
/// a bare `0`.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let per_unit = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => {
            return Err(format!(
                "expected a duration such as 50ms, 1.5ms or 2s (units ns, us, ms, s), got {text:?}"
            ))
        }
    };
    let value = decimal(number)
        .ok_or_else(|| format!("expected a duration such as 50ms, 1.5ms or 2s, got {text:?}"))?;
    let ns = value * per_unit;
    if ns > MAX_DELAY.as_nanos() as f64 {
        return Err(format!("{text:?} is above the maximum of {MAX_DELAY:?}"));
    }
    Ok(Duration::from_nanos(ns.round() as u64))
}

/// Reads a loss rate: a percentage (`1%`, `0.5%`, `100%`) or a bare `0`; returns
/// the fraction.
pub fn parse_loss(text: &str) -> Result<f64, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(0.0);
    }
    let percent = t
        .strip_suffix('%')
        .and_then(decimal)
        .ok_or_else(|| format!("expected a percentage such as 1% or 0.5%, got {text:?}"))?;
    if percent > 100.0 {
        return Err(format!("{text:?} is above 100%"));
    }
    Ok(percent / 100.0)
}

/// Digits with at most one decimal point (no sign, exponent, `inf` or `nan`).
fn decimal(s: &str) -> Option<f64> {
    let well_formed = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || c == '.')
        && s.chars().filter(|c| *c == '.').count() <= 1
        && s.chars().any(|c| c.is_ascii_digit());
    well_formed.then(|| s.parse().ok()).flatten()
}

/// Conditions from their parts (absent ones are zero); `None` when they do nothing.
pub fn build(
    latency: Option<Duration>,
    jitter: Option<Duration>,
    loss: Option<f64>,
) -> Result<Option<Conditions>, String> {
    let c = Conditions::new(
        latency.unwrap_or_default(),
        jitter.unwrap_or_default(),
        Spread::Uniform,
        loss.unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    Ok((!c.is_none()).then_some(c))
}

/// The form [`parse_spec`] reads back, and what the tools print:
/// `latency=50ms jitter=10ms loss=1%`, or `none`.
pub fn describe(c: Option<&Conditions>) -> String {
    match c {
        None => "none".into(),
        Some(c) => {
            let [latency, jitter, loss] = fields(c);
            format!("latency={latency} jitter={jitter} loss={loss}")
        }
    }
}

/// Latency, jitter and loss written as they are read: `80ms`, `1.5ms`, `0.5%`.
pub fn fields(c: &Conditions) -> [String; 3] {
    [
        millis(c.latency()),
        millis(c.jitter()),
        format!("{}%", trim(c.loss() * 100.0)),
    ]
}

fn millis(d: Duration) -> String {
    format!("{}ms", trim(d.as_nanos() as f64 / 1e6))
}

/// A number without trailing zeros (at most six decimals).
fn trim(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Reads `latency=.. jitter=.. loss=..` (any of them, in any order) or `none`.
pub fn parse_spec(text: &str) -> Result<Option<Conditions>, String> {
    let text = text.trim();
    if text == "none" {
        return Ok(None);
    }
    let (mut latency, mut jitter, mut loss) = (None, None, None);
    for part in text.split_ascii_whitespace() {
        match part.split_once('=') {
            Some(("latency", v)) if latency.is_none() => latency = Some(parse_delay(v)?),
            Some(("jitter", v)) if jitter.is_none() => jitter = Some(parse_delay(v)?),
            Some(("loss", v)) if loss.is_none() => loss = Some(parse_loss(v)?),
            _ => {
                return Err(format!(
                    "unexpected {part:?}: expected latency=, jitter=, loss= once each, or none"
                ))
            }
        }
    }
    if latency.is_none() && jitter.is_none() && loss.is_none() {
        return Err("no conditions given: expected latency=, jitter=, loss= or none".into());
    }
    build(latency, jitter, loss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_in_every_unit() {
        assert_eq!(parse_delay("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_delay(" 1.5ms "), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_delay("7ns"), Ok(Duration::from_nanos(7)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert_eq!(parse_delay("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_delay("10s"), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn bad_delays_are_refused_with_the_reason() {
        for bad in [
            "", "50", "ms", "-5ms", "5 ms", "1e3ms", "1.2.3ms", "nanms", "infs", "5m", "5h", ".ms",
        ] {
            let e = parse_delay(bad).unwrap_err();
            assert!(e.contains("expected a duration"), "{bad:?}: {e}");
        }
        assert!(parse_delay("11s").unwrap_err().contains("maximum"));
        assert!(parse_delay("99999999999999999999999s")
            .unwrap_err()
            .contains("maximum"));
    }

    #[test]
    fn loss_as_a_percentage() {
        assert_eq!(parse_loss("1%"), Ok(0.01));
        assert_eq!(parse_loss("0.5%"), Ok(0.005));
        assert_eq!(parse_loss("100%"), Ok(1.0));
        assert_eq!(parse_loss("0"), Ok(0.0));
        for bad in ["1", "0.01", "-1%", "101%", "%", "nan%", "1 %", "five%"] {
            assert!(parse_loss(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spec_round_trips() {
        let c = build(
            Some(Duration::from_millis(80)),
            Some(Duration::from_micros(1500)),
            Some(0.005),
        )
        .unwrap()
        .unwrap();
        let text = describe(Some(&c));
        assert_eq!(text, "latency=80ms jitter=1.5ms loss=0.5%");
        assert_eq!(parse_spec(&text), Ok(Some(c)));
        assert_eq!(parse_spec("none"), Ok(None));
        assert_eq!(parse_spec("latency=0 loss=0"), Ok(None), "zero is none");
        assert_eq!(describe(None), "none");
        for bad in [
            "",
            "latency=5ms latency=6ms",
            "delay=5ms",
            "latency",
            "loss=2",
        ] {
            assert!(parse_spec(bad).is_err(), "{bad:?}");
        }
    }
}
