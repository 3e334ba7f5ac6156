//! `switchyard health`, the image's health check: against a running role
//! it exits 0 (`/healthz`, and `/readyz` with `--ready`); when nothing
//! listens, when the port answers something other than 2xx, or when it does
//! not answer in time, it exits 1 with one line naming the URL and why.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// `switchyard health ARGS`, with the admin address from `env_admin` (as a
/// container sets it) or from no variable at all.
fn health(args: &[&str], env_admin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.arg("health")
        .args(args)
        .env_remove("SWITCHYARD_ADMIN_LISTEN");
    if let Some(a) = env_admin {
        c.env("SWITCHYARD_ADMIN_LISTEN", a);
    }
    c.output().expect("run switchyard health")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_running_role_is_healthy_and_ready() {
    // The loader on SQLite: a real role with its admin port, and nothing
    // else to start (no broker: it does not replay).
    let dir = tempfile::tempdir().unwrap();
    let offline = dir.path().join("offline");
    std::fs::create_dir_all(&offline).unwrap();
    let url = format!("sqlite:{}?mode=rwc", dir.path().join("old.db").display());
    let init = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["db", "init", "--db-url", &url])
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init).1);
    let offline = offline.display().to_string();
    let loader = Role::spawn(&[
        "load",
        "--db-url",
        &url,
        "--offline-dir",
        &offline,
        "--no-replay",
        "--progress",
        "never",
    ]);
    let admin = format!("127.0.0.1:{}", loader.admin_port);

    let o = health(&["--admin", &admin], None);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert_eq!(out.trim(), format!("http://{admin}/healthz: 200 OK"));

    let o = health(&["--admin", &admin, "--ready"], None);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert_eq!(out.trim(), format!("http://{admin}/readyz: 200 OK"));

    // The role's own variable, with the every-interface address a pod uses:
    // probed on loopback; --quiet prints nothing.
    let o = health(
        &["--quiet"],
        Some(&format!("0.0.0.0:{}", loader.admin_port)),
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert_eq!(out, "");
    drop(loader);
}

#[test]
fn a_closed_port_is_unhealthy_with_a_message() {
    let port = free_port();
    let o = health(&["--admin", &format!("127.0.0.1:{port}")], None);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert_eq!(out, "");
    assert!(
        err.starts_with(&format!(
            "switchyard: health: http://127.0.0.1:{port}/healthz: "
        )) && err.to_lowercase().contains("refused"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn a_port_that_never_answers_times_out() {
    // Bound and listening, never read: the kernel accepts the connection and
    // the request waits for an answer that does not come.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let started = Instant::now();
    let o = health(
        &["--admin", &addr.to_string(), "--timeout-secs", "0.5"],
        None,
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(err.contains("no answer within 500ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(listener);
}

#[test]
fn not_ready_is_exit_1_with_the_reason() {
    // A one-shot admin port that is not ready, answering as the roles' do.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // The whole request head first: closing with unread bytes would
        // reset the connection before the client reads the answer.
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        let body = "not ready: offline folder not writable\n";
        let _ = write!(
            s,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        request
    });
    let o = health(&["--admin", &addr.to_string(), "--ready"], None);
    let (out, err) = text(&o);
    let request = server.join().unwrap();
    assert!(request.starts_with("GET /readyz HTTP/1.1"), "{request}");
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert_eq!(
        err.trim(),
        format!(
            "switchyard: health: http://{addr}/readyz: 503 Service Unavailable: not ready: offline folder not writable"
        )
    );
}

#[test]
fn a_bad_address_is_a_usage_error() {
    let o = health(&["--admin", "not-an-address"], None);
    assert_eq!(o.status.code(), Some(2));
}
