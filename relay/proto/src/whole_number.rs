//! Integer request fields as JSON Schema reads them: `3`, `3.0` and `3e0` are the
//! same integer there, and the OpenAPI document promises integers by that rule, so
//! a client (or a language whose numbers are all floats) may send any of them.
//! Fractions, negatives and values past `u32::MAX` are still refused.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

struct WholeU32;

impl Visitor<'_> for WholeU32 {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from 0 to {}", u32::MAX)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
        if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
            // Integral and in range: the cast is exact.
            Ok(v as u32)
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }
}

pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_any(WholeU32)
}

pub fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "u32")] u32);
    Ok(Option::<Whole>::deserialize(d)?.map(|Whole(v)| v))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(deserialize_with = "super::u32")]
        n: u32,
        #[serde(default, deserialize_with = "super::option_u32")]
        m: Option<u32>,
    }

    fn parse(json: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn integral_numbers_in_any_notation_are_accepted() {
        for (json, n) in [(r#"{"n":3}"#, 3), (r#"{"n":3.0}"#, 3), (r#"{"n":4e1}"#, 40)] {
            assert_eq!(parse(json).unwrap().n, n, "{json}");
        }
        let b = parse(r#"{"n":4294967295.0,"m":7.0}"#).unwrap();
        assert_eq!((b.n, b.m), (u32::MAX, Some(7)));
        assert_eq!(parse(r#"{"n":1,"m":null}"#).unwrap().m, None);
        assert_eq!(parse(r#"{"n":1}"#).unwrap().m, None);
    }

    #[test]
    fn fractions_negatives_and_overflow_are_refused() {
        for json in [
            r#"{"n":3.5}"#,
            r#"{"n":-1}"#,
            r#"{"n":-1.0}"#,
            r#"{"n":4294967296}"#,
            r#"{"n":4294967296.0}"#,
            r#"{"n":1e300}"#,
            r#"{"n":"3"}"#,
            r#"{"n":1,"m":0.5}"#,
        ] {
            let err = parse(json)
                .err()
                .unwrap_or_else(|| panic!("{json} was accepted"));
            assert!(!err.to_string().is_empty());
        }
    }
}
