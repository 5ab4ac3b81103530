//! A private RabbitMQ node on its own ports, so that restarting it disturbs
//! nothing else on the machine (the shared broker, other tests).
//!
//! It runs the distribution's RabbitMQ scripts as the current user with its
//! own HOME (and so its own Erlang cookie), data, logs, config and plugin
//! list under one folder, which [`PrivateBroker::drop`] removes after
//! stopping the node.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::ChaosError;

pub struct PrivateBroker {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    bin: PathBuf,
    tls_port: Option<u16>,
}

/// The PEM files a node serves TLS with: its certificate and key, and the
/// CA it checks client certificates against.
pub struct ServerTls<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Whether a client must present a certificate the CA signed.
    pub client_certificates: bool,
}

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16, ChaosError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

impl PrivateBroker {
    /// Starts a node named after `name` under `dir` and waits until it
    /// accepts connections.
    pub fn start(dir: &Path, name: &str) -> Result<Self, ChaosError> {
        Self::start_node(dir, name, None, None)
    }

    /// Starts a node that also takes AMQP over TLS (see
    /// [`PrivateBroker::tls_port`]) and serves its management API over
    /// HTTPS only; returns the node and the management API's URL.
    pub fn start_with_tls(
        dir: &Path,
        name: &str,
        tls: &ServerTls,
    ) -> Result<(Self, String), ChaosError> {
        let port = free_port()?;
        let broker = Self::start_node(dir, name, Some(port), Some(tls))?;
        Ok((broker, format!("https://guest:guest@localhost:{port}")))
    }

    /// The port of the node's TLS listener, if it has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Starts a node with the management plugin on its own port; returns
    /// the node and the management API's URL.
    pub fn start_with_management(dir: &Path, name: &str) -> Result<(Self, String), ChaosError> {
        let port = free_port()?;
        let broker = Self::start_node(dir, name, Some(port), None)?;
        Ok((broker, format!("http://guest:guest@127.0.0.1:{port}")))
    }

    fn start_node(
        dir: &Path,
        name: &str,
        management: Option<u16>,
        tls: Option<&ServerTls>,
    ) -> Result<Self, ChaosError> {
        let dir = dir.join("rabbitmq");
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::create_dir_all(dir.join("log"))?;
        let bin = ["/usr/lib/rabbitmq/bin", "/usr/lib/rabbitmq/sbin"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("rabbitmq-server").exists())
            .ok_or_else(|| ChaosError("RabbitMQ's scripts are not under /usr/lib/rabbitmq/bin (is rabbitmq-server installed?)".into()))?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n");
        let mut plugins = "[].\n".to_string();
        let management_listener = match tls {
            Some(_) => "ssl",
            None => "tcp",
        };
        if let Some(m) = management {
            conf.push_str(&format!(
                "management.{management_listener}.port = {m}\nmanagement.{management_listener}.ip = 127.0.0.1\n"
            ));
            plugins = "[rabbitmq_management].\n".into();
        }
        let tls_port = match tls {
            None => None,
            Some(tls) => {
                let tls_port = free_port()?;
                let verify = match tls.client_certificates {
                    true => "verify_peer\nssl_options.fail_if_no_peer_cert = true",
                    false => "verify_none",
                };
                let files = |section: &str| {
                    format!(
                        "{section}.cacertfile = {}\n{section}.certfile = {}\n{section}.keyfile = {}\n",
                        tls.ca.display(),
                        tls.cert.display(),
                        tls.key.display()
                    )
                };
                conf.push_str(&format!(
                    "listeners.ssl.1 = 127.0.0.1:{tls_port}\n{}ssl_options.verify = {verify}\n",
                    files("ssl_options")
                ));
                if management.is_some() {
                    conf.push_str(&files("management.ssl"));
                    if tls.client_certificates {
                        conf.push_str(
                            "management.ssl.verify = verify_peer\n\
                             management.ssl.fail_if_no_peer_cert = true\n",
                        );
                    }
                }
                Some(tls_port)
            }
        };
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), plugins)?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let broker = Self {
            node: format!("{name}@localhost"),
            dir,
            port,
            dist_port,
            bin,
            tls_port,
        };
        broker.boot()?;
        Ok(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn command(&self, script: &str) -> Command {
        let d = &self.dir;
        let mut c = Command::new(self.bin.join(script));
        c.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_FLAGS", "-kernel inet_dist_use_interface {127,0,0,1}");
        c
    }

    /// Each queue with its ready and unacked messages, for a report.
    pub fn queues(&self) -> String {
        self.ctl(&[
            "-q",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', "; "))
        .unwrap_or_else(|e| e.to_string())
    }

    fn ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
    }

    /// Starts the node and waits (bounded) until it is up.
    fn boot(&self) -> Result<(), ChaosError> {
        let started = self.command("rabbitmq-server").arg("-detached").output()?;
        if !started.status.success() {
            return Err(ChaosError(format!(
                "rabbitmq-server -detached failed: {}",
                String::from_utf8_lossy(&started.stderr)
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let ready = self.ctl(&["-q", "await_startup", "--timeout", "10"])?;
            if ready.status.success()
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ChaosError(format!(
                    "the private RabbitMQ node {} did not start within 90s; see {}",
                    self.node,
                    self.dir.join("log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Stops the node (bounded), killing it if it does not stop.
    fn halt(&self) {
        let _ = self.ctl(&["stop"]);
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }

    /// Stops the node (it can be started again with [`PrivateBroker::start_again`]).
    pub fn stop(&self) {
        self.halt();
    }

    /// Starts a stopped node again on the same data.
    pub fn start_again(&self) -> Result<(), ChaosError> {
        self.boot()
    }

    /// Stops the node and starts it again on the same data.
    pub fn restart(&self) -> Result<(), ChaosError> {
        self.halt();
        self.boot()
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.halt();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
