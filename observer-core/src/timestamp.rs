//! RFC 3339 timestamps as the envelope and the action log write them, formatted into a stack
//! buffer: chrono's own formatting goes through `fmt` (its `Serialize` through `collect_str`),
//! which was the largest part of writing an attempt to the action log (callgrind, 20,000-event
//! drain: 3.9 % of the daemon's instructions). The output is chrono's, byte for byte; the rare
//! cases this does not cover (a leap second, a year outside 0000–9999) are handed to chrono.

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};

/// How many digits of the second's fraction are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fraction {
    /// Always six (chrono's `SecondsFormat::Micros`; the envelope's `created_at`).
    Micros,
    /// None, three, six or nine, as few as hold the value (chrono's `SecondsFormat::AutoSi`,
    /// what chrono's `Serialize` writes).
    Auto,
}

/// A formatted timestamp, `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
pub struct Rfc3339 {
    buf: [u8; 32],
    len: usize,
    /// Set when chrono formatted it (the cases the fast path leaves alone).
    long: Option<String>,
}

impl Rfc3339 {
    pub fn new(at: &DateTime<Utc>, fraction: Fraction) -> Rfc3339 {
        let nanos = at.nanosecond();
        let year = at.year();
        if nanos >= 1_000_000_000 || !(0..=9999).contains(&year) {
            let format = match fraction {
                Fraction::Micros => SecondsFormat::Micros,
                Fraction::Auto => SecondsFormat::AutoSi,
            };
            return Rfc3339 {
                buf: [0; 32],
                len: 0,
                long: Some(at.to_rfc3339_opts(format, true)),
            };
        }
        let mut buf = [0u8; 32];
        let mut put = |at: usize, value: u32, digits: usize| {
            let mut v = value;
            for i in (0..digits).rev() {
                buf[at + i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, year as u32, 4);
        put(5, at.month(), 2);
        put(8, at.day(), 2);
        put(11, at.hour(), 2);
        put(14, at.minute(), 2);
        put(17, at.second(), 2);
        let (value, digits) = match fraction {
            Fraction::Micros => (nanos / 1_000, 6),
            Fraction::Auto if nanos == 0 => (0, 0),
            Fraction::Auto if nanos.is_multiple_of(1_000_000) => (nanos / 1_000_000, 3),
            Fraction::Auto if nanos.is_multiple_of(1_000) => (nanos / 1_000, 6),
            Fraction::Auto => (nanos, 9),
        };
        let mut len = 19;
        if digits > 0 {
            put(20, value, digits);
            len = 20 + digits;
        }
        for (i, c) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
        ] {
            buf[i] = c;
        }
        buf[len] = b'Z';
        Rfc3339 {
            buf,
            len: len + 1,
            long: None,
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.long {
            Some(s) => s,
            // Only ASCII digits and separators were written.
            None => std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default(),
        }
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chrono(at: &DateTime<Utc>, f: Fraction) -> String {
        match f {
            Fraction::Micros => at.to_rfc3339_opts(SecondsFormat::Micros, true),
            Fraction::Auto => serde_json::to_value(at)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string(),
        }
    }

    #[test]
    fn writes_what_chrono_writes() {
        let mut cases: Vec<DateTime<Utc>> = vec![
            DateTime::from_timestamp(0, 0).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 120_000_000).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 1).unwrap(),
            DateTime::from_timestamp(1_700_000_000, 999_999_999).unwrap(),
            DateTime::from_timestamp(-62_167_219_200, 5_000).unwrap(), // 0000-01-01
            DateTime::from_timestamp(253_402_300_799, 999_000).unwrap(), // 9999-12-31T23:59:59
            // Out of the fast path's range: chrono's own forms.
            DateTime::from_timestamp(253_402_300_800, 0).unwrap(), // 10000-01-01
            DateTime::from_timestamp(-62_167_219_201, 0).unwrap(), // -0001-12-31
            // A leap second.
            DateTime::from_timestamp(1_483_228_799, 1_500_000_000).unwrap(),
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 4_000_000_000) as i64;
            let nanos = match x % 4 {
                0 => 0,
                1 => (x >> 8) as u32 % 1000 * 1_000_000,
                2 => (x >> 8) as u32 % 1_000_000 * 1_000,
                _ => (x >> 8) as u32 % 1_000_000_000,
            };
            cases.push(DateTime::from_timestamp(secs, nanos).unwrap());
        }
        for at in &cases {
            for f in [Fraction::Micros, Fraction::Auto] {
                assert_eq!(Rfc3339::new(at, f).as_str(), chrono(at, f), "{at:?} {f:?}");
            }
        }
    }
}
