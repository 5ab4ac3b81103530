//! A private PostgreSQL cluster on its own port, so that a test can stop
//! and start it without disturbing the shared server.
//!
//! Made with the distribution's `initdb` and `pg_ctl` (trust auth, fsync
//! off: it is a throwaway); when running as root they run as the
//! `postgres` user, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ChaosError;
use crate::broker::free_port;

pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl PrivatePostgres {
    pub fn start(dir: &Path) -> Result<Self, ChaosError> {
        Self::start_with(dir, &[])
    }

    /// Starts a cluster with extra `postgresql.conf` lines (for example
    /// `shared_preload_libraries = 'pg_stat_statements'`).
    pub fn start_with(dir: &Path, settings: &[&str]) -> Result<Self, ChaosError> {
        let cluster = Self::folder(&dir.join("postgres"))?;
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        if !settings.is_empty() {
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(cluster.dir.join("data").join("postgresql.conf"))?;
            writeln!(conf, "\n# syncfleet\n{}", settings.join("\n"))?;
        }
        cluster.up()?;
        Ok(cluster)
    }

    /// Starts a hot standby of `primary` in `dir`, streaming its WAL from a
    /// base backup (`pg_basebackup -R`). `pg_wal_replay_pause()` on it holds
    /// it behind its primary.
    pub fn standby_of(primary: &PrivatePostgres, dir: &Path) -> Result<Self, ChaosError> {
        let cluster = Self::folder(&dir.join("standby"))?;
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &cluster.data(),
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        )?;
        cluster.up()?;
        Ok(cluster)
    }

    /// A cluster folder the server's user owns, and a free port.
    fn folder(dir: &Path) -> Result<Self, ChaosError> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let bin = std::fs::read_dir("/usr/lib/postgresql")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").exists())
            .ok_or_else(|| ChaosError("no initdb under /usr/lib/postgresql/*/bin".into()))?;
        let as_postgres = running_as_root();
        if as_postgres {
            let owned = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&dir)
                .status()?;
            if !owned.success() {
                return Err(ChaosError(
                    "cannot hand the cluster folder to the postgres user".into(),
                ));
            }
        }
        Ok(Self {
            port: free_port()?,
            dir,
            bin,
            as_postgres,
        })
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), ChaosError> {
        let program = self.bin.join(tool);
        let output = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .current_dir(&self.dir)
                .output()?
        } else {
            Command::new(&program)
                .args(args)
                .current_dir(&self.dir)
                .output()?
        };
        if output.status.success() {
            Ok(())
        } else {
            Err(ChaosError(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// Starts the server and waits (bounded) until it accepts connections.
    pub fn up(&self) -> Result<(), ChaosError> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server (fast shutdown: sessions are disconnected).
    pub fn down(&self) -> Result<(), ChaosError> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"],
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process runs as root (uid 0), read from /proc to avoid a
/// libc dependency.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
