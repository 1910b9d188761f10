//! Cut-off dates: the instant a unit primitive stops being free.
//!
//! Two spellings occur in the wild: RFC 3339 in the gitlab-cloud-connector layout
//! (`2024-10-17T00:00:00+00:00`) and Ruby's `Time#to_s` in the legacy file
//! (`2024-02-15 00:00:00 UTC`). `jiff` parses and checks the calendar; this module only
//! turns Ruby's spelling into RFC 3339 first and keeps the text for people.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

/// An instant in UTC, whole seconds, with the text it was written as (shown back to
/// people as-is).
#[derive(Debug, Clone)]
pub struct Timestamp {
    instant: jiff::Timestamp,
    text: String,
}

/// Why a text is not a cut-off date; the message says what one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid date {text:?}: {reason}; write it like \"2024-10-17T00:00:00+00:00\" or \"2024-02-15 00:00:00 UTC\""
)]
pub struct ParseTimestampError {
    text: String,
    reason: String,
}

impl Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub fn unix_seconds(&self) -> i64 {
        self.instant.as_second()
    }

    /// The text as written in the file.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `now` is at or after this instant. A clock beyond jiff's range (years
    /// -9999 to 9999) is on the side of its sign.
    pub fn has_passed(&self, now: SystemTime) -> bool {
        match jiff::Timestamp::try_from(now) {
            Ok(now) => now >= self.instant,
            Err(_) => now > SystemTime::UNIX_EPOCH,
        }
    }

    /// The instant as a `SystemTime`.
    pub fn to_system_time(&self) -> SystemTime {
        SystemTime::from(self.instant)
    }
}

/// Two timestamps are the same instant whatever their spelling.
impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.instant == other.instant
    }
}

impl Eq for Timestamp {}

impl PartialOrd for Timestamp {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timestamp {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.instant.cmp(&other.instant)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Timestamp {
    type Err = ParseTimestampError;

    /// Accepts `YYYY-MM-DD` + `T`/space + `HH:MM:SS[.fraction]` + a zone: `Z`, `UTC`,
    /// `±HH:MM` or `±HHMM` (optionally after a space). A time without a zone is rejected:
    /// it would depend on where the sidecar runs. Fractions of a second are dropped.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| ParseTimestampError {
            text: text.to_string(),
            reason,
        };
        let (datetime, zone) = split_zone(text);
        let zone = match zone {
            "" => {
                // Say what is wrong with the date and time first, if anything is.
                let reason = match datetime.parse::<jiff::civil::DateTime>() {
                    Err(e) => e.to_string(),
                    Ok(_) if datetime.len() <= 10 => "it needs a time and a time zone".into(),
                    Ok(_) => "it needs a time zone such as +00:00, Z or UTC".into(),
                };
                return Err(fail(reason));
            }
            "UTC" | "Z" | "z" => "Z",
            // jiff would also take ±HH, seconds and offsets up to ±25:59.
            offset if is_plain_offset(offset) => offset,
            _ => return Err(fail("the time zone must be Z, UTC or like +00:00".into())),
        };
        // jiff also takes other ISO 8601 shapes (no seconds, no dashes); a file's date
        // has this one.
        let shape = datetime.as_bytes();
        let separator =
            |at: usize, allowed: &[u8]| shape.get(at).is_some_and(|b| allowed.contains(b));
        if !(separator(4, b"-") && separator(7, b"-") && separator(10, b"Tt ")) {
            return Err(fail(
                "the date must look like 2024-10-17, then 'T' or a space".into(),
            ));
        }
        if !(separator(13, b":") && separator(16, b":") && shape.len() >= 19) {
            return Err(fail("the time must look like 00:00:00".into()));
        }
        // A leap second (jiff would clamp it to :59); cut-off dates are whole days in
        // practice, so refuse it rather than guess.
        if datetime.get(17..19) == Some("60") {
            return Err(fail("the time is out of range".into()));
        }
        let instant = format!("{datetime}{zone}")
            .parse::<jiff::Timestamp>()
            // Down to the whole second (jiff truncates toward 1970; a date before it floors).
            .and_then(|t| {
                jiff::Timestamp::from_second(t.as_second() - i64::from(t.subsec_nanosecond() < 0))
            })
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            instant,
            text: text.to_string(),
        })
    }
}

/// `text` split into its date and time, and its zone at the end: `UTC`, `Z` or an offset
/// after the date (with one space before it, as Ruby writes it, or none); the zone is
/// empty when there is none.
fn split_zone(text: &str) -> (&str, &str) {
    let zone_at = if text.ends_with("UTC") {
        text.len() - 3
    } else if text.ends_with(['Z', 'z']) {
        text.len() - 1
    } else {
        // The date's own dashes end at byte 10.
        text.get(10..)
            .and_then(|time| time.rfind(['+', '-']))
            .map_or(text.len(), |at| at + 10)
    };
    let (datetime, zone) = text.split_at(zone_at);
    (datetime.strip_suffix(' ').unwrap_or(datetime), zone)
}

/// `±HH:MM` or `±HHMM` within a day.
fn is_plain_offset(zone: &str) -> bool {
    let digits = match *zone.as_bytes() {
        [b'+' | b'-', h1, h2, b':', m1, m2] | [b'+' | b'-', h1, h2, m1, m2] => [h1, h2, m1, m2],
        _ => return false,
    };
    digits.iter().all(u8::is_ascii_digit) && digits[..2] <= b"23"[..] && digits[2..] <= b"59"[..]
}

/// As its text, which [`FromStr`] reads back.
impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn parses_both_spellings_to_the_same_instant() {
        assert_eq!(
            ts("2024-10-17T00:00:00+00:00").unix_seconds(),
            1_729_123_200
        );
        assert_eq!(ts("2024-02-15 00:00:00 UTC").unix_seconds(), 1_707_955_200);
        assert_eq!(ts("2024-02-15T00:00:00Z"), ts("2024-02-15 00:00:00 UTC"));
        assert_eq!(ts("2024-02-15T02:00:00+02:00"), ts("2024-02-15T00:00:00Z"));
        assert_eq!(
            ts("2024-02-14T19:00:00-0500"),
            ts("2024-02-15T00:00:00.000Z")
        );
        assert_eq!(
            ts("2024-02-15 00:00:00 +00:00").unix_seconds(),
            1_707_955_200
        );
        assert_eq!(ts("1970-01-01T00:00:00Z").unix_seconds(), 0);
        assert_eq!(ts("1969-12-31T23:59:59Z").unix_seconds(), -1);
        assert_eq!(ts("2000-02-29T00:00:00Z").unix_seconds(), 951_782_400);
        assert_eq!(
            ts("2024-10-17T00:00:00+00:00").as_str(),
            "2024-10-17T00:00:00+00:00"
        );
    }

    #[test]
    fn the_reason_says_what_is_wrong() {
        let reason = |text: &str| text.parse::<Timestamp>().unwrap_err().to_string();
        assert!(
            reason("2024-13-01T00:00:00Z").contains("month"),
            "{}",
            reason("2024-13-01T00:00:00Z")
        );
        assert!(
            reason("2023-02-29T00:00:00Z").contains("day"),
            "{}",
            reason("2023-02-29T00:00:00Z")
        );
        assert!(reason("2024-02-15T00:00:00").contains("needs a time zone"));
        assert!(reason("2024-02-15").contains("needs a time and a time zone"));
        assert!(reason("2024-02-15T00:00:00+25:00").contains("like +00:00"));
        assert!(reason("2024-02-15T23:59:60Z").contains("out of range"));
    }

    #[test]
    fn fractions_and_lower_case_are_accepted() {
        assert_eq!(ts("2024-02-15t00:00:00.999z"), ts("2024-02-15T00:00:00Z"));
        assert_eq!(ts("1969-12-31T23:59:59.5Z").unix_seconds(), -1);
        assert_eq!(ts("2024-02-15T05:30:00+0530"), ts("2024-02-15T00:00:00Z"));
    }

    #[test]
    fn knows_whether_it_has_passed() {
        let t = ts("2024-02-15T00:00:00Z");
        assert!(t.has_passed(t.to_system_time()));
        assert!(!t.has_passed(t.to_system_time() - Duration::from_secs(1)));
        assert!(ts("1969-12-31T23:59:59Z").has_passed(UNIX_EPOCH));
    }

    #[test]
    fn rejects_bad_dates() {
        for bad in [
            "",
            "2024-02-15",
            "2024-02-15T00:00:00",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-02-15T24:00:00Z",
            "2024-02-15T00:00:00 PST",
            "2024-02-15T00:00:00+25:00",
            "24-02-15T00:00:00Z",
            "2024-02-15T00:00:00.Z",
            "2024-02-15T00:00:00Z trailing",
            "tomorrow",
            "2024-02-15T23:59:60Z",
            "2024-02-15T00:00:00+05",
            "2024-02-15T00:00:00+05:00:00",
            "2024-02-15T00:00:00+24:00",
            "2024-02-15T00:00:00+05:60",
            "2024-02-15T00:00:00 UT",
            "2024-02-15 00:00 UTC",
            "2024-02-15T00:00:00+0é:00",
        ] {
            let err = bad.parse::<Timestamp>().unwrap_err();
            assert!(err.to_string().contains("write it like"), "{bad}: {err}");
        }
    }
}
