//! Cut-off dates: the instant a unit primitive stops being free.
//!
//! Two spellings occur in the wild: RFC 3339 in the gitlab-cloud-connector layout
//! (`2024-10-17T00:00:00+00:00`) and Ruby's `Time#to_s` in the legacy file
//! (`2024-02-15 00:00:00 UTC`). Both are parsed here rather than with a date crate because
//! nothing else in the sidecar needs calendar arithmetic.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An instant in UTC, with the text it was written as (shown back to people as-is).
#[derive(Debug, Clone)]
pub struct Timestamp {
    unix_seconds: i64,
    text: String,
}

/// Why a text is not a cut-off date; the message says what one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid date {text:?}: {reason}; write it like \"2024-10-17T00:00:00+00:00\" or \"2024-02-15 00:00:00 UTC\""
)]
pub struct ParseTimestampError {
    text: String,
    reason: &'static str,
}

impl Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub fn unix_seconds(&self) -> i64 {
        self.unix_seconds
    }

    /// The text as written in the file.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `now` is at or after this instant.
    pub fn has_passed(&self, now: SystemTime) -> bool {
        let now = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        now >= self.unix_seconds
    }

    /// The instant as a `SystemTime`.
    pub fn to_system_time(&self) -> SystemTime {
        let magnitude = Duration::from_secs(self.unix_seconds.unsigned_abs());
        if self.unix_seconds >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }
}

/// Two timestamps are the same instant whatever their spelling.
impl PartialEq for Timestamp {
    fn eq(&self, other: &Self) -> bool {
        self.unix_seconds == other.unix_seconds
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
        self.unix_seconds.cmp(&other.unix_seconds)
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
    /// it would depend on where the sidecar runs.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseTimestampError {
            text: text.to_string(),
            reason,
        };
        let mut cur = Cursor(text.as_bytes());
        let year = cur
            .digits(4)
            .ok_or_else(|| fail("the year needs four digits"))?;
        cur.expect(b'-')
            .ok_or_else(|| fail("expected '-' after the year"))?;
        let month = cur
            .digits(2)
            .ok_or_else(|| fail("the month needs two digits"))?;
        cur.expect(b'-')
            .ok_or_else(|| fail("expected '-' after the month"))?;
        let day = cur
            .digits(2)
            .ok_or_else(|| fail("the day needs two digits"))?;
        if !(1..=12).contains(&month) {
            return Err(fail("the month is out of range"));
        }
        if day < 1 || day > days_in_month(year, month) {
            return Err(fail("the day is out of range for that month"));
        }
        if cur.is_empty() {
            return Err(fail("it needs a time and a time zone"));
        }
        if cur.expect(b'T').is_none() && cur.expect(b't').is_none() && cur.expect(b' ').is_none() {
            return Err(fail("expected 'T' or a space between date and time"));
        }
        let hour = cur
            .digits(2)
            .ok_or_else(|| fail("the hour needs two digits"))?;
        cur.expect(b':')
            .ok_or_else(|| fail("expected ':' after the hour"))?;
        let minute = cur
            .digits(2)
            .ok_or_else(|| fail("the minute needs two digits"))?;
        cur.expect(b':')
            .ok_or_else(|| fail("expected ':' after the minute"))?;
        let second = cur
            .digits(2)
            .ok_or_else(|| fail("the second needs two digits"))?;
        // 60 would be a leap second; cut-off dates are whole days in practice, so refuse it
        // rather than guess.
        if hour > 23 || minute > 59 || second > 59 {
            return Err(fail("the time is out of range"));
        }
        if cur.expect(b'.').is_some() {
            // Sub-second precision cannot matter for a cut-off date; it is accepted and dropped.
            if cur.digit_run() == 0 {
                return Err(fail("expected digits after '.'"));
            }
        }
        let _ = cur.expect(b' ');
        let offset_seconds: i64 = match cur.rest() {
            b"Z" | b"z" | b"UTC" => 0,
            b"" => return Err(fail("it needs a time zone such as +00:00, Z or UTC")),
            [sign @ (b'+' | b'-'), rest @ ..] => {
                let mut zone = Cursor(rest);
                let hours = zone.digits(2);
                let _ = zone.expect(b':');
                let minutes = zone.digits(2);
                match (hours, minutes, zone.is_empty()) {
                    (Some(h), Some(m), true) if h <= 23 && m <= 59 => {
                        let magnitude = i64::from(h) * 3600 + i64::from(m) * 60;
                        if *sign == b'-' { -magnitude } else { magnitude }
                    }
                    _ => return Err(fail("the time zone must look like +00:00")),
                }
            }
            _ => return Err(fail("the time zone must be Z, UTC or like +00:00")),
        };
        let local = days_from_civil(i64::from(year), month, day) * 86_400
            + i64::from(hour) * 3600
            + i64::from(minute) * 60
            + i64::from(second);
        Ok(Self {
            unix_seconds: local - offset_seconds,
            text: text.to_string(),
        })
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let (head, tail) = self.0.split_at_checked(n)?;
        if !head.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.0 = tail;
        Some(head.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    }

    fn digit_run(&mut self) -> usize {
        let n = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        self.0 = &self.0[n..];
        n
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        let (first, tail) = self.0.split_first()?;
        if *first != byte {
            return None;
        }
        self.0 = tail;
        Some(())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn rest(&self) -> &[u8] {
        self.0
    }
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (month 1..=12, day validated).
///
/// Counts in 400-year eras starting on March 1st, where leap days fall at the end of the
/// year, so the length of every earlier month in the shifted year is a fixed formula.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = i64::from((month + 9) % 12); // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719_468 days lie between 0000-03-01 and 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
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
        ] {
            let err = bad.parse::<Timestamp>().unwrap_err();
            assert!(err.to_string().contains("write it like"), "{bad}: {err}");
        }
    }
}
