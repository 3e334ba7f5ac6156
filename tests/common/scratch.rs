//! A throwaway MariaDB server in a temporary folder, for what the shared one
//! must not be changed for (a small `max_allowed_packet`, TLS). Killed and
//! removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for_port};

pub struct ScratchMariadb {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl ScratchMariadb {
    /// `mariadb-install-db` into a fresh folder, then `mariadbd` on a free
    /// loopback port with `extra` server options. Root has no password.
    pub fn start(extra: &[&str]) -> ScratchMariadb {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        // mariadbd runs as `mysql`: the folder must be its own.
        let own = Command::new("chown")
            .args(["-R", "mysql:mysql"])
            .arg(&path)
            .status()
            .expect("chown");
        assert!(own.success(), "chown mysql {}", path.display());
        let data = path.join("data");
        let out = Command::new("mariadb-install-db")
            .args([
                "--user=mysql",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display()))
            .output()
            .expect("run mariadb-install-db (Debian package mariadb-server)");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let log = std::fs::File::create(path.join("server.log")).expect("log file");
        let child = Command::new(mariadbd())
            .args([
                "--no-defaults",
                "--user=mysql",
                "--bind-address=127.0.0.1",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", path.join("s.sock").display()))
            .arg(format!("--pid-file={}", path.join("pid").display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        let mut s = ScratchMariadb { port, child, dir };
        if !wait_for_port(port, Duration::from_secs(30)) {
            let _ = s.child.kill();
            let log = std::fs::read_to_string(s.dir.path().join("server.log")).unwrap_or_default();
            panic!("the scratch mariadbd did not listen on {port}: {log}");
        }
        s
    }

    /// An admin URL for `database` (which must exist; `mysql` always does).
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }
}

fn mariadbd() -> PathBuf {
    ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mariadbd"))
}

impl Drop for ScratchMariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
