//! Durations as people write them on a command line or in a config file: `90`, `90s`, `30m`,
//! `2h`, `7d`. One rule for every host-side program (the launchers, the runner, the client, the
//! server's settings, the raw-base cache's keep time).

use std::time::Duration;

/// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd` (N a whole number; no unit means seconds); 0 is allowed
/// (a setting where 0 means "never" or "off").
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration (examples: 90s, 30m, 2h, 7d)");
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let multiplier = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    n.checked_mul(multiplier)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// [`parse_span`], longer than 0 s: a time limit, an interval.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = parse_span(text)?;
    if d.is_zero() {
        return Err("a duration must be longer than 0 s".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        for bad in [
            "",
            "m",
            "1w",
            "-1",
            "0",
            "1.5m",
            "99999999999999999999h",
            "1 d",
            "9999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_span_may_be_zero() {
        assert_eq!(parse_span("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_span("0d").unwrap(), Duration::ZERO);
        assert!(parse_span("").is_err() && parse_span("x").is_err());
    }
}
