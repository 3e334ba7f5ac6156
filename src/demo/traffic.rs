//! Synthetic traffic: Rollbar-like items (~2.5 KB on average, skewed sizes)
//! from many accounts (a few busy ones, a long tail), sent to the router in
//! NDJSON batches at a steady rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Payloads acknowledged per route, and refused requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub legacy: u64,
    pub dual: u64,
    pub kafka: u64,
    pub errors: u64,
}

impl Counts {
    pub fn accepted(&self) -> u64 {
        self.legacy + self.dual + self.kafka
    }
}

#[derive(Default)]
pub struct Tally {
    legacy: AtomicU64,
    dual: AtomicU64,
    kafka: AtomicU64,
    errors: AtomicU64,
}

impl Tally {
    pub fn snapshot(&self) -> Counts {
        Counts {
            legacy: self.legacy.load(Ordering::Relaxed),
            dual: self.dual.load(Ordering::Relaxed),
            kafka: self.kafka.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// xorshift64*: reproducible, dependency-free, good enough for load.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Accounts: a few busy ones and a long tail (u³ skew over 20,000 ids).
fn account(rng: &mut Rng) -> u64 {
    1 + (rng.unit().powi(3) * 20_000.0) as u64
}

/// Body length: log-normal around 2 KB, 200 B to 16 KB (rows average ~2.5 KB).
fn body_len(rng: &mut Rng) -> usize {
    let normal: f64 = (0..6).map(|_| rng.unit()).sum::<f64>() - 3.0; // ≈ N(0, 1/√2)
    let len = (2_000.0f64.ln() + normal * 0.9).exp();
    len.clamp(200.0, 16_000.0) as usize
}

fn uuid(rng: &mut Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// One envelope: an item's compressed body looks like base64.
pub fn item(rng: &mut Rng) -> serde_json::Value {
    let account = account(rng);
    let len = body_len(rng);
    let body: String = (0..len)
        .map(|_| ALPHABET[(rng.next_u64() % 64) as usize] as char)
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "account_id": account,
        "table": "raw_item",
        "row": {
            "project_id": account * 3 + rng.next_u64() % 3,
            "timestamp": now,
            "body": body,
            "version": 2,
            "billable": u64::from(rng.unit() < 0.9),
            "uuid": uuid(rng),
        }
    })
}

/// Sends `rate` payloads a second in batches of 20 until `stop`.
pub async fn generate(
    url: String,
    rate: u32,
    tally: std::sync::Arc<Tally>,
    stop: CancellationToken,
) {
    let client = reqwest::Client::new();
    let mut rng = Rng::new(0x5157_7c4a_11d5_u64 ^ u64::from(rate));
    let batch = 20u32;
    let every = Duration::from_secs_f64(f64::from(batch) / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut body = String::new();
        for _ in 0..batch {
            body.push_str(&item(&mut rng).to_string());
            body.push('\n');
        }
        let res = client
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                tally
                    .legacy
                    .fetch_add(v["legacy"].as_u64().unwrap_or(0), Ordering::Relaxed);
                tally
                    .dual
                    .fetch_add(v["dual"].as_u64().unwrap_or(0), Ordering::Relaxed);
                tally
                    .kafka
                    .fetch_add(v["kafka"].as_u64().unwrap_or(0), Ordering::Relaxed);
            }
            _ => {
                tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_look_like_rollbar_items() {
        let mut rng = Rng::new(7);
        let items: Vec<_> = (0..2000).map(|_| item(&mut rng)).collect();
        let sizes: Vec<usize> = items.iter().map(|i| i.to_string().len()).collect();
        let avg = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!((2000.0..3200.0).contains(&avg), "average {avg}");
        assert!(
            sizes.iter().any(|s| *s > 6000) && sizes.iter().any(|s| *s < 800),
            "skewed sizes"
        );
        let accounts: std::collections::HashSet<u64> = items
            .iter()
            .map(|i| i["account_id"].as_u64().unwrap())
            .collect();
        assert!(accounts.len() > 300, "many accounts: {}", accounts.len());
        let schema = crate::config::PipelineConfig::load(None)
            .unwrap()
            .schema()
            .unwrap();
        for i in &items[..50] {
            let row = i["row"].as_object().unwrap();
            assert!(schema.check_row("raw_item", row).is_ok(), "{i}");
        }
    }
}
