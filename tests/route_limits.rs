//! Admission on a real router: slow clients are cut off after their timeout
//! and counted, connections beyond the limit wait then are refused, a normal
//! client is served while hostile ones hold connections, a gzip bomb sent
//! slowly is refused as soon as it exceeds the body limit, and the whole
//! process stays under the stated memory bound with the container's limit
//! applied. Kafka plays no part here: the router runs with its broker down
//! (everything is routed to the offline file).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchyard::config::{PipelineConfig, EMBEDDED};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Nothing listens there: the router starts with Kafka unreachable.
const NO_BROKER: &str = "127.0.0.1:9";

fn limits_config(dirs: &Dirs) -> PipelineConfig {
    let mut cfg = config(dirs, "switchyard.items");
    cfg.kafka.topic_check_timeout_ms = 300;
    cfg
}

/// Reads until the peer closes (or resets) the connection, for at most `limit`.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let res = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(res.is_ok(), "the router did not close the connection");
    buf
}

fn post_head(content_length: Option<usize>, extra: &str) -> String {
    let len = content_length
        .map(|n| format!("content-length: {n}\r\n"))
        .unwrap_or_else(|| "transfer-encoding: chunked\r\n".into());
    format!("POST /v1/items HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-ndjson\r\n{extra}{len}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_bodies_are_cut_off_and_counted_while_others_are_served() {
    let dirs = Dirs::new();
    let mut cfg = limits_config(&dirs);
    cfg.route.header_read_timeout_ms = 1000;
    cfg.route.body_read_timeout_ms = 1500;
    let router = InProcess::start(cfg, NO_BROKER).await;
    const EACH: usize = 100;

    let mut slow_headers = Vec::new();
    for _ in 0..EACH {
        let opened = Instant::now();
        let mut s = TcpStream::connect(router.addr).await.unwrap();
        s.write_all(b"POST /v1/items HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        slow_headers.push((s, opened));
    }
    let mut slow_bodies = Vec::new();
    for _ in 0..EACH {
        let opened = Instant::now();
        let mut s = TcpStream::connect(router.addr).await.unwrap();
        s.write_all(post_head(Some(100_000), "").as_bytes())
            .await
            .unwrap();
        s.write_all(b"{\"account_id\":").await.unwrap();
        slow_bodies.push((s, opened));
    }
    eventually(
        "every hostile connection served",
        Duration::from_secs(10),
        || {
            let n = router.counter("switchyard_route_connections", &[]);
            async move { n >= (2 * EACH) as f64 }
        },
    )
    .await;

    // A normal client, while every hostile connection is held open (none
    // can have been cut yet: the shortest timeout runs from its opening).
    let (status, body) = post_ndjson(&router.url(), ndjson(&[envelope(7, 1, 100)])).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);

    for (mut s, opened) in slow_headers {
        read_until_closed(&mut s, Duration::from_secs(10)).await;
        assert!(opened.elapsed() >= Duration::from_millis(1000));
    }
    for (mut s, opened) in slow_bodies {
        let answer = read_until_closed(&mut s, Duration::from_secs(10)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("body_timeout"), "{answer}");
        assert!(opened.elapsed() >= Duration::from_millis(1500));
    }
    eventually("every cut counted", Duration::from_secs(5), || {
        let h = router.counter("switchyard_route_timeouts_total", &[("reason", "header")]);
        let b = router.counter("switchyard_route_timeouts_total", &[("reason", "body")]);
        async move { h == EACH as f64 && b == EACH as f64 }
    })
    .await;

    // A kept-alive connection that sends nothing more is closed as idle.
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    let line = ndjson(&[envelope(7, 2, 10)]);
    s.write_all(format!("{}{line}", post_head(Some(line.len()), "")).as_bytes())
        .await
        .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(router.counter("switchyard_route_timeouts_total", &[("reason", "idle")]) >= 1.0);
    router.stop().await;
    assert_eq!(offline_lines(&dirs.offline).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_limit_a_connection_waits_then_is_refused() {
    let dirs = Dirs::new();
    let mut cfg = limits_config(&dirs);
    cfg.route.max_connections = 4;
    cfg.route.admission_wait_ms = 1500;
    cfg.route.header_read_timeout_ms = 60_000;
    let router = InProcess::start(cfg, NO_BROKER).await;
    let gauge = |name: &'static str, want: f64| {
        let v = router.counter(name, &[]);
        async move { v == want }
    };
    // Four uploads doing their job (a body streaming well above the
    // minimum rate): none may be closed to make room.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(router.addr).await.unwrap();
        holders.push(tokio::spawn(async move {
            s.write_all(post_head(None, "").as_bytes()).await.unwrap();
            let chunk = format!("2000\r\n{}\r\n", "x".repeat(0x2000));
            while s.write_all(chunk.as_bytes()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    eventually("4 connections served", Duration::from_secs(5), || {
        gauge("switchyard_route_connections", 4.0)
    })
    .await;

    // A fifth waits for a slot, and none frees: 503 after the wait.
    let asked = Instant::now();
    let mut fifth = TcpStream::connect(router.addr).await.unwrap();
    let answer = read_until_closed(&mut fifth, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("\"overloaded\""), "{answer}");
    assert!(asked.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        router.counter(
            "switchyard_route_connections_limited_total",
            &[("outcome", "refused")]
        ),
        1.0
    );

    // A sixth waits, a slot frees while it does: it is served.
    let mut sixth = TcpStream::connect(router.addr).await.unwrap();
    let line = ndjson(&[envelope(7, 1, 10)]);
    sixth
        .write_all(
            format!(
                "{}{line}",
                post_head(Some(line.len()), "connection: close\r\n")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    eventually(
        "the sixth connection waiting",
        Duration::from_secs(1),
        || gauge("switchyard_route_connections_waiting", 1.0),
    )
    .await;
    holders.remove(0).abort();
    let answer = read_until_closed(&mut sixth, Duration::from_secs(10)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        router.counter(
            "switchyard_route_connections_limited_total",
            &[("outcome", "waited")]
        ),
        1.0
    );
    assert_eq!(
        router.counter("switchyard_route_connections_shed_total", &[]),
        0.0,
        "no upload doing its job was closed"
    );
    for h in holders {
        h.abort();
    }
    router.stop().await;
    assert_eq!(offline_lines(&dirs.offline).len(), 1);
}

/// One hostile connection: its request's headers (all of them and a body
/// that comes a byte every 200 ms, or half of them and nothing more).
/// Returns how long after it opened the router closed it, and the answer.
async fn hostile(addr: std::net::SocketAddr, slow: &'static str) -> (Duration, String) {
    let opened = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = match slow {
        "body" => format!("{}{{", post_head(Some(100_000), "")),
        _ => "POST /v1/items HTTP/1.1\r\nhost: x\r\n".to_string(),
    };
    let _ = s.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            },
            _ = tick.tick() => {
                if slow == "body" {
                    let _ = s.write_all(b" ").await;
                }
            }
        }
    }
    (
        opened.elapsed(),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

/// 600 connections that send their headers and dribble their bodies (and
/// 600 that never finish their headers) against 256 slots: a normal client
/// is still served at once, by taking the slot of one of them, and every
/// hostile connection is closed within its configured limit (the minimum
/// body rate, the header timeout), made room for, or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slow_clients_cannot_keep_a_normal_one_out() {
    const HOSTILE: usize = 600;
    for slow in ["body", "header"] {
        let dirs = Dirs::new();
        let mut cfg = limits_config(&dirs);
        cfg.route.header_read_timeout_ms = 3000;
        // The latest each is closed, by design: served after at most the
        // admission wait (or refused then, with a second to read its
        // answer), then cut at its limit: the rate is checked at the grace
        // and every second after, the header timer runs from being served.
        let wait = cfg.route.admission_wait_ms;
        let limit = Duration::from_millis(match slow {
            "body" => wait + cfg.route.body_rate_grace_ms + 1000,
            _ => wait + cfg.route.header_read_timeout_ms,
        });
        // Well short of the 30 s body deadline and the 10 s default header
        // timeout, with room for 1,200 sockets on two busy cores.
        let slack = Duration::from_secs(4);
        assert_eq!(cfg.route.max_connections, 256);
        let router = InProcess::start(cfg, NO_BROKER).await;
        let addr = router.addr;
        let mut tasks = Vec::new();
        for _ in 0..HOSTILE {
            tasks.push(tokio::spawn(hostile(addr, slow)));
        }
        eventually(
            "every slot taken and no connection left waiting",
            Duration::from_secs(20),
            || {
                let served = router.counter("switchyard_route_connections", &[]);
                let waiting = router.counter("switchyard_route_connections_waiting", &[]);
                async move { served == 256.0 && waiting == 0.0 }
            },
        )
        .await;
        let asked = Instant::now();
        let (status, body) = post_ndjson(&router.url(), ndjson(&[envelope(7, 1, 100)])).await;
        let took = asked.elapsed();
        assert_eq!(status, 200, "{slow}: {body}");
        assert!(
            took < Duration::from_secs(2),
            "{slow}: the normal client waited {took:?}"
        );
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for t in tasks {
            let (open_for, answer) = t.await.unwrap();
            assert!(
                open_for < limit + slack,
                "{slow}: a hostile connection stayed {open_for:?} (limit {limit:?}): {answer}"
            );
            let kind = answer.split(' ').nth(1).unwrap_or("closed").to_string();
            *kinds.entry(kind).or_default() += 1;
        }
        let shed = router.counter(
            "switchyard_route_connections_shed_total",
            &[("state", slow)],
        );
        assert!(shed >= 1.0, "{slow}: none was closed to make room");
        let cut = match slow {
            "body" => router.counter(
                "switchyard_route_timeouts_total",
                &[("reason", "slow_body")],
            ),
            _ => router.counter("switchyard_route_timeouts_total", &[("reason", "header")]),
        };
        assert!(cut >= 1.0, "{slow}: none was cut at its limit ({kinds:?})");
        if slow == "body" {
            assert!(kinds.get("408").copied().unwrap_or(0) >= 1, "{kinds:?}");
        }
        println!("{slow}: normal client served in {took:?}; hostile answers {kinds:?}, {shed} made room for, {cut} cut at the limit");
        router.stop().await;
        assert_eq!(offline_lines(&dirs.offline).len(), 1);
    }
}

/// A gzip stream of `total` zero bytes, and the length of its prefix that
/// decompresses to exactly `prefix_out` bytes (a sync flush ends it).
fn zeros_bomb(total: usize, prefix_out: usize) -> (Vec<u8>, usize) {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    let mut written = 0;
    let mut cut = 0;
    while written < total {
        let n = if written < prefix_out {
            (prefix_out - written).min(zeros.len())
        } else {
            (total - written).min(zeros.len())
        };
        gz.write_all(&zeros[..n]).unwrap();
        written += n;
        if written == prefix_out {
            gz.flush().unwrap();
            cut = gz.get_ref().len();
        }
    }
    (gz.finish().unwrap(), cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_sent_slowly_is_refused_once_it_exceeds_the_limit() {
    let dirs = Dirs::new();
    let cfg = limits_config(&dirs);
    let max = cfg.route.max_body_bytes;
    let router = InProcess::start(cfg, NO_BROKER).await;
    // The bomb's first part expands to one byte beyond the limit; the rest
    // never comes. Each chunk goes in one write, so that the router has read
    // all that was sent when it refuses (its close is then not a reset).
    let (bomb, cut) = zeros_bomb(100 << 20, max + 1);
    let mut s = TcpStream::connect(router.addr).await.unwrap();
    s.write_all(post_head(None, "content-encoding: gzip\r\n").as_bytes())
        .await
        .unwrap();
    for piece in bomb[..cut].chunks(512) {
        let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
        chunk.extend_from_slice(piece);
        chunk.extend_from_slice(b"\r\n");
        s.write_all(&chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let answer = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    // No request ever held more memory than one whole body's admission.
    assert_eq!(router.counter("switchyard_route_inflight_bytes", &[]), 0.0);
    router.stop().await;
    assert!(offline_lines(&dirs.offline).is_empty());
}

/// One metric from an admin port's /metrics (summed over its series).
fn scrape(admin: u16, name: &str, label: &str) -> f64 {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
        return f64::NAN;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return f64::NAN;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with([' ', '{']) && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_gzip_bombs_hold_no_more_memory_than_they_were_admitted() {
    const LIMIT: u64 = 256 << 20;
    const BOMBS: usize = 20;
    let dirs = Dirs::new();
    // Stalled for good: the minimum body rate, which would cut them after
    // its grace, is off, so that what they hold is all admission's doing.
    let (cfg_path, cfg) = limited_config_with(
        &dirs,
        &[(
            "min_body_rate_bytes_per_sec = 4096",
            "min_body_rate_bytes_per_sec = 0",
        )],
    );
    let router = Limited::spawn(&cfg_path, LIMIT);
    let base = router.status("VmRSS:");
    let max = cfg.route.max_body_bytes;
    let budget = cfg.route.max_inflight_bytes as u64;
    // Each stalls just under the limit, without its last bytes: what it
    // was admitted for is all it may hold, however long it stalls.
    let (bomb, cut) = zeros_bomb(64 << 20, max - (1 << 20));
    let addr = format!("127.0.0.1:{}", router.port);
    let mut stalled = Vec::new();
    for _ in 0..BOMBS {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(post_head(None, "content-encoding: gzip\r\n").as_bytes())
            .await
            .unwrap();
        for piece in bomb[..cut].chunks(4096) {
            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
            chunk.extend_from_slice(piece);
            chunk.extend_from_slice(b"\r\n");
            s.write_all(&chunk).await.unwrap();
        }
        stalled.push(s);
    }
    // At most budget ÷ one full admission can hold theirs; every other one
    // is refused after its bounded wait.
    let holders = budget / switchyard::config::admitted_bytes(max) as u64;
    let admin = router.admin;
    eventually(
        "the bombs beyond the budget refused",
        Duration::from_secs(30),
        || {
            let refused = scrape(admin, "switchyard_route_rejected_total", "overloaded");
            async move { refused >= (BOMBS as u64 - holders) as f64 }
        },
    )
    .await;
    assert!(scrape(admin, "switchyard_route_inflight_bytes", "") <= budget as f64);
    // A normal client is served meanwhile.
    let (status, body) = post_ndjson(&router.url(), ndjson(&[envelope(7, 1, 100)])).await;
    assert_eq!(status, 200, "{body}");
    let hwm = router.status("VmHWM:");
    println!(
        "{BOMBS} stalled bombs of {} MiB each: VmRSS at start {} MiB, VmHWM {} MiB, budget {} MiB",
        (max - (1 << 20)) >> 20,
        base >> 20,
        hwm >> 20,
        budget >> 20
    );
    assert!(
        hwm - base <= budget,
        "peak RSS grew by {} bytes",
        hwm - base
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_keys_are_refused_by_name_and_nothing_is_written() {
    let dirs = Dirs::new();
    let router = InProcess::start(limits_config(&dirs), NO_BROKER).await;
    let good = envelope(7, 1, 10).to_string();
    let repeated = good.replacen(
        "{\"account_id\":7,",
        "{\"account_id\":7,\"account_id\":8,",
        1,
    );
    assert_ne!(good, repeated);
    let (status, body) = post_ndjson(&router.url(), format!("{good}\n{repeated}\n")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "duplicate_key");
    assert_eq!(body["error"]["line"], 2);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("duplicate key \"account_id\""), "{msg}");
    router.stop().await;
    assert!(offline_lines(&dirs.offline).is_empty());
}

/// The memory a router process may reach with `cfg` (README, "Memory
/// bound"), before headroom.
fn memory_bound(cfg: &PipelineConfig, base: u64) -> u64 {
    let r = &cfg.route;
    let max_line = cfg.tables.iter().map(|t| t.max_row_bytes).max().unwrap() + (64 << 10);
    base + r.max_connections as u64 * (80 << 10)
        + r.max_inflight_bytes as u64
        + r.parse_concurrency as u64 * max_line as u64 * 20
}

/// The router as a child process under a memory limit: a memory cgroup when
/// one can be made here (what a container gets), else RLIMIT_AS.
struct Limited {
    child: Child,
    port: u16,
    admin: u16,
    cgroup: Option<PathBuf>,
}

impl Limited {
    fn spawn(config: &Path, limit: u64) -> Limited {
        let (port, admin) = (free_port(), free_port());
        let cgroup = memory_cgroup("switchyard-route-limits", limit);
        let bin = env!("CARGO_BIN_EXE_switchyard");
        let args = format!(
            "route --config {} --listen 127.0.0.1:{port} --admin-listen 127.0.0.1:{admin} --kafka-brokers {NO_BROKER}",
            config.display()
        );
        let script = match &cgroup {
            Some(dir) => format!(
                "echo $$ > {}/cgroup.procs && exec {bin} {args}",
                dir.display()
            ),
            // A 64-bit runtime maps far more than it touches (thread stacks,
            // malloc arenas): the idle router maps ~540 MiB and peaked at
            // ~600 MiB under this test's load, so address space gets 4 × the
            // resident limit (RSS itself is checked against the bound).
            None => format!("exec prlimit --as={} {bin} {args}", limit * 4),
        };
        let child = Command::new("sh")
            .args(["-c", &script])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the router");
        let mut l = Limited {
            child,
            port,
            admin,
            cgroup,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get_ok(admin, "/readyz") {
            if let Ok(Some(s)) = l.child.try_wait() {
                panic!("the router exited at start: {s}");
            }
            assert!(Instant::now() < deadline, "the router never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        l
    }

    fn status(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/items", self.port)
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn small_rows_batch(bytes: usize, seed: u64) -> String {
    let mut out = String::with_capacity(bytes + 300);
    let mut i = 0;
    while out.len() + 300 < bytes {
        out.push_str(&envelope(seed * 1_000_000 + i, i, 20).to_string());
        out.push('\n');
        i += 1;
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// The embedded configuration for a child router (broker down).
fn limited_config(dirs: &Dirs) -> (PathBuf, PipelineConfig) {
    limited_config_with(dirs, &[])
}

/// The same, with (from, to) replacements in its text.
fn limited_config_with(dirs: &Dirs, edits: &[(&str, &str)]) -> (PathBuf, PipelineConfig) {
    let path = write_config(EMBEDDED, dirs, "switchyard.items");
    let mut text = std::fs::read_to_string(&path).unwrap().replace(
        "topic_check_timeout_ms = 10000",
        "topic_check_timeout_ms = 300",
    );
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replace(from, to);
    }
    std::fs::write(&path, &text).unwrap();
    (path, PipelineConfig::parse("test", &text).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_containers_memory_limit_any_mix_of_requests_stays_under_the_bound() {
    // The manifests' limit for the router container.
    const LIMIT: u64 = 256 << 20;
    let dirs = Dirs::new();
    let (cfg_path, cfg) = limited_config(&dirs);
    let router = Limited::spawn(&cfg_path, LIMIT);
    let base = router.status("VmRSS:");
    let bound = memory_bound(&cfg, base);
    assert!(
        bound + bound / 4 <= LIMIT,
        "the defaults ({bound} bytes with headroom) do not fit the {LIMIT}-byte limit"
    );

    let max = cfg.route.max_body_bytes;
    let batch = small_rows_batch(max, 1);
    let batch_gz = gzip(batch.as_bytes());
    let (bomb, _) = zeros_bomb(64 << 20, 1 << 20);
    let bodies: Vec<(Vec<u8>, bool)> = vec![
        (batch.as_bytes().to_vec(), false),
        (batch_gz, true),
        (bomb, true),
        (small_rows_batch(max / 2, 2).into_bytes(), false),
    ];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..24usize {
        let (client, url, bodies) = (client.clone(), router.url(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for r in 0..3 {
                let (body, gz) = &bodies[(c + r) % bodies.len()];
                let mut req = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone());
                if *gz {
                    req = req.header("content-encoding", "gzip");
                }
                let resp = req.send().await.expect("an answer, not a dead router");
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or(json!(null));
                seen.push((status, v["error"]["code"].as_str().map(String::from)));
            }
            seen
        }));
    }
    let mut by_status = std::collections::BTreeMap::new();
    for t in tasks {
        for (status, code) in t.await.unwrap() {
            assert!(
                matches!(
                    (status, code.as_deref()),
                    (200, None) | (413, Some("body_too_large")) | (503, Some("overloaded"))
                ),
                "{status} {code:?}"
            );
            *by_status.entry(status).or_insert(0) += 1;
        }
    }
    let hwm = router.status("VmHWM:");
    println!(
        "responses {by_status:?}; VmRSS at start {} MiB, VmHWM {} MiB, bound {} MiB, limit {} MiB, cgroup: {}",
        base >> 20,
        hwm >> 20,
        bound >> 20,
        LIMIT >> 20,
        router.cgroup.is_some()
    );
    assert!(hwm <= bound, "peak RSS {hwm} above the bound {bound}");
    // Alone again, a full-size batch is taken.
    let (status, answer) = post_ndjson(&router.url(), batch).await;
    assert_eq!(status, 200, "{answer}");
    assert!(router.status("VmHWM:") <= bound);
}

/// The admin port cuts a client that never finishes its headers after its
/// header timeout, and answers others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_cuts_stuck_clients_off() {
    let dirs = Dirs::new();
    let router = InProcess::start(limits_config(&dirs), NO_BROKER).await;
    let opened = Instant::now();
    let mut stuck = TcpStream::connect(router.admin).await.unwrap();
    stuck.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    let m = reqwest::get(format!("http://{}/metrics", router.admin))
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    let answer = read_until_closed(&mut stuck, Duration::from_secs(20)).await;
    let took = opened.elapsed();
    assert!(
        took >= switchyard::admin::HEADER_TIMEOUT,
        "closed after {took:?}: {}",
        String::from_utf8_lossy(&answer)
    );
    router.stop().await;
}
