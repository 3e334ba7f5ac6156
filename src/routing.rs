//! Pure routing decisions: account → bucket, bucket + flag values → route.
//!
//! `bucket = crc32(salt ":" account_id) mod 10000`, so percentages move in
//! 0.01% steps. An account's bucket never changes (same salt), and a route only
//! depends on whether the bucket is below a threshold, so raising a percentage
//! only moves accounts forward (legacy → dual → kafka) and never back.

use serde::Serialize;

/// A fingerprint of what decides an account's bucket and route (the salt
/// and the flag keys), safe to export: it does not reveal the salt.
pub fn fingerprint(salt: &str, keys: &[&str]) -> String {
    let mut h = crc32fast::Hasher::new();
    h.update(b"switchyard-routing-v1\0");
    h.update(salt.as_bytes());
    for k in keys {
        h.update(b"\0");
        h.update(k.as_bytes());
    }
    format!("{:08x}", h.finalize())
}

/// Number of buckets: percentages have a resolution of 0.01.
pub const BUCKETS: u32 = 10_000;

/// Where a payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Offline file only (the old pipeline).
    Legacy,
    /// Offline file and Kafka.
    Dual,
    /// Kafka only (the new pipeline).
    Kafka,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Legacy => "legacy",
            Route::Dual => "dual",
            Route::Kafka => "kafka",
        }
    }

    pub fn to_file(self) -> bool {
        matches!(self, Route::Legacy | Route::Dual)
    }

    pub fn to_kafka(self) -> bool {
        matches!(self, Route::Dual | Route::Kafka)
    }

    /// How far along the migration an account is; routes only ever increase.
    pub fn rank(self) -> u8 {
        match self {
            Route::Legacy => 0,
            Route::Dual => 1,
            Route::Kafka => 2,
        }
    }
}

/// The flag values that apply to one account.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct FlagValues {
    /// Everything legacy, at once.
    pub kill_switch: bool,
    /// Percentage (0–100) of buckets that go Kafka only.
    pub kafka_only: f64,
    /// Percentage (0–100) of buckets that go to both sinks.
    pub dual_write: f64,
    /// With a migration flag: the route its stage maps to (the percentages
    /// are then not used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Route>,
}

/// Why a route was chosen, for `/v1/route/{account}` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    KillSwitch,
    BelowKafkaOnly,
    BelowDualWrite,
    AboveDualWrite,
    /// The migration flag's stage for this account.
    MigrationStage,
}

impl Reason {
    pub fn describe(self) -> &'static str {
        match self {
            Reason::KillSwitch => "the kill switch is on: everything goes legacy",
            Reason::BelowKafkaOnly => "the bucket is below the kafka-only threshold",
            Reason::BelowDualWrite => "the bucket is below the dual-write threshold",
            Reason::AboveDualWrite => {
                "the bucket is at or above both thresholds: the account stays legacy"
            }
            Reason::MigrationStage => {
                "the migration flag's stage for this account (off: legacy; dualwrite, shadow, live, rampdown: both; complete: Kafka only)"
            }
        }
    }
}

/// The route of a LaunchDarkly migration stage. Every stage between `off`
/// and `complete` writes both: `shadow`, `live` and `rampdown` change which
/// side is read or authoritative in LaunchDarkly's model, and switchyard
/// only writes, so it keeps both sides whole until the migration completes.
pub fn stage_route(stage: &str) -> Option<Route> {
    match stage {
        "off" => Some(Route::Legacy),
        "dualwrite" | "shadow" | "live" | "rampdown" => Some(Route::Dual),
        "complete" => Some(Route::Kafka),
        _ => None,
    }
}

/// The bucket of an account under a salt.
pub fn bucket(salt: &str, account_id: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(salt.as_bytes());
    h.update(b":");
    let mut buf = [0u8; 20];
    h.update(format_u64(account_id, &mut buf));
    h.finalize() % BUCKETS
}

fn format_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A percentage as a bucket threshold: buckets strictly below it are in.
/// Out-of-range and NaN values are clamped to the safe side (0 for NaN).
pub fn threshold(percent: f64) -> u32 {
    if percent.is_nan() {
        return 0;
    }
    (percent.clamp(0.0, 100.0) * 100.0).round() as u32
}

/// The route for a bucket under the given flag values.
pub fn decide(bucket: u32, flags: &FlagValues) -> (Route, Reason) {
    if flags.kill_switch {
        (Route::Legacy, Reason::KillSwitch)
    } else if let Some(r) = flags.migration {
        (r, Reason::MigrationStage)
    } else if bucket < threshold(flags.kafka_only) {
        (Route::Kafka, Reason::BelowKafkaOnly)
    } else if bucket < threshold(flags.dual_write) {
        (Route::Dual, Reason::BelowDualWrite)
    } else {
        (Route::Legacy, Reason::AboveDualWrite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn flags(kafka_only: f64, dual_write: f64) -> FlagValues {
        FlagValues {
            kill_switch: false,
            kafka_only,
            dual_write,
            migration: None,
        }
    }

    #[test]
    fn bucket_is_crc32_of_salt_colon_id() {
        let expected = crc32fast::hash(b"s:42") % BUCKETS;
        assert_eq!(bucket("s", 42), expected);
        assert_eq!(
            bucket("", u64::MAX),
            crc32fast::hash(b":18446744073709551615") % BUCKETS
        );
        assert_eq!(bucket("x", 0), crc32fast::hash(b"x:0") % BUCKETS);
    }

    #[test]
    fn kill_switch_wins() {
        let f = FlagValues {
            kill_switch: true,
            kafka_only: 100.0,
            dual_write: 100.0,
            migration: None,
        };
        assert_eq!(decide(0, &f), (Route::Legacy, Reason::KillSwitch));
    }

    #[test]
    fn thresholds_are_in_hundredths() {
        assert_eq!(threshold(0.01), 1);
        assert_eq!(threshold(100.0), BUCKETS);
        assert_eq!(threshold(150.0), BUCKETS);
        assert_eq!(threshold(-3.0), 0);
        assert_eq!(threshold(f64::NAN), 0);
        assert_eq!(decide(0, &flags(0.0, 0.01)).0, Route::Dual);
        assert_eq!(decide(1, &flags(0.0, 0.01)).0, Route::Legacy);
        assert_eq!(decide(9_999, &flags(0.0, 100.0)).0, Route::Dual);
    }

    #[test]
    fn every_step_of_five_gets_its_share_within_one_point() {
        let buckets: Vec<u32> = (0..100_000u64).map(|a| bucket("switchyard", a)).collect();
        for pct in (0..=100).step_by(5) {
            let pct = pct as f64;
            for (f, want) in [
                (flags(pct, pct), Route::Kafka),
                (flags(0.0, pct), Route::Dual),
            ] {
                let n = buckets.iter().filter(|b| decide(**b, &f).0 == want).count();
                let share = n as f64 * 100.0 / buckets.len() as f64;
                assert!(
                    (share - pct).abs() <= 1.0,
                    "{pct}% asked, {share:.3}% got ({want:?})"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn an_account_never_flaps_while_flags_stay(account: u64, k in 0.0f64..100.0, d in 0.0f64..100.0) {
            let f = flags(k, d);
            let first = decide(bucket("salt", account), &f);
            for _ in 0..3 {
                prop_assert_eq!(decide(bucket("salt", account), &f), first);
            }
        }

        #[test]
        fn raising_a_percentage_only_moves_forward(
            account: u64,
            k1 in 0.0f64..100.0, dk in 0.0f64..100.0,
            d1 in 0.0f64..100.0, dd in 0.0f64..100.0,
        ) {
            let b = bucket("salt", account);
            let before = decide(b, &flags(k1, d1)).0;
            let after = decide(b, &flags((k1 + dk).min(100.0), (d1 + dd).min(100.0))).0;
            prop_assert!(after.rank() >= before.rank(), "{:?} -> {:?}", before, after);
        }
    }
}
