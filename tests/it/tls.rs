//! TLS as the URLs ask for it, against private servers with certificates
//! for `localhost` signed by a CA of the test's own: PostgreSQL
//! (`sslmode`, `sslrootcert`) and RabbitMQ (`amqps://` with `cacertfile`,
//! `certfile`, `keyfile`, and the management API over HTTPS).

use std::path::{Path, PathBuf};
use std::process::Command;

use syncfleet_broker::management::Management;
use syncfleet_chaos::broker::{PrivateBroker, ServerTls};
use syncfleet_chaos::postgres::PrivatePostgres;
use syncfleet_core::config::{BrokerTls, DbConfig};
use syncfleet_core::secret::SecretUrl;
use syncfleet_db::{Pool, Role};

use crate::helpers::TestEnv;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate and key it signs for `localhost`, in
/// `dir`; returns the CA's file. The server's files belong to the user
/// the cluster runs as.
fn certificates(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=syncfleet test CA",
            "-days",
            "2",
        ],
    );
    signed(
        dir,
        "server",
        "/CN=localhost",
        "subjectAltName=DNS:localhost",
    );
    if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
    {
        let owned = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(owned.success());
    }
    dir.join("ca.pem")
}

/// A key and a certificate for `subject`, with the X.509 extension
/// `extension`, signed by the CA in `dir`: `{name}.key` and `{name}.crt`.
fn signed(dir: &Path, name: &str, subject: &str, extension: &str) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ],
    );
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), format!("{extension}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    let _ = Command::new("chmod")
        .arg("600")
        .arg(dir.join(&key))
        .status();
}

/// Connects with `url` and says whether the session is encrypted, or why
/// it could not connect.
async fn encrypted(url: &str) -> Result<bool, String> {
    let config = DbConfig {
        url: syncfleet_core::secret::SecretUrl::new(url.to_string()),
        max_connections: 1,
        connect_timeout: std::time::Duration::from_secs(5),
        statement_timeout: None,
    };
    let pool = Pool::connect(Role::Destination, &config)
        .await
        .map_err(|e| e.to_string())?;
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_the_urls_sslmode_and_checks_the_server_as_asked() {
    let env = TestEnv::new().await;
    let tls = env.dir.join("tls");
    let ca = certificates(&tls);
    let cert = tls.join("server.crt").display().to_string();
    let key = tls.join("server.key").display().to_string();
    let cluster = tokio::task::block_in_place(|| {
        PrivatePostgres::start_with(
            &env.dir,
            &[
                "ssl = on",
                &format!("ssl_cert_file = '{cert}'"),
                &format!("ssl_key_file = '{key}'"),
            ],
        )
    })
    .unwrap();
    let by_ip = cluster.url("postgres");
    let by_name = by_ip.replace("127.0.0.1", "localhost");
    let ca = ca.display().to_string().replace('/', "%2F");

    assert_eq!(encrypted(&by_ip).await, Ok(false), "no sslmode: no TLS");
    for mode in ["prefer", "require"] {
        assert_eq!(
            encrypted(&format!("{by_ip}?sslmode={mode}")).await,
            Ok(true),
            "{mode}"
        );
    }
    let trusted = format!("sslrootcert={ca}");
    assert_eq!(
        encrypted(&format!("{by_name}?sslmode=verify-full&{trusted}")).await,
        Ok(true)
    );
    assert_eq!(
        encrypted(&format!("{by_ip}?sslmode=verify-ca&{trusted}")).await,
        Ok(true),
        "verify-ca does not check the host"
    );
    let wrong_host = encrypted(&format!("{by_ip}?sslmode=verify-full&{trusted}")).await;
    assert!(
        wrong_host
            .as_ref()
            .is_err_and(|e| e.contains("certificate")),
        "verify-full checks the host: {wrong_host:?}"
    );
    for mode in ["verify-ca", "verify-full"] {
        let unknown_ca = encrypted(&format!("{by_name}?sslmode={mode}")).await;
        assert!(
            unknown_ca
                .as_ref()
                .is_err_and(|e| e.contains("certificate")),
            "{mode}: the system's CAs do not know the test's: {unknown_ca:?}"
        );
    }
    let bad_file = encrypted(&format!(
        "{by_name}?sslmode=verify-full&sslrootcert=%2Fno%2Fsuch.pem"
    ))
    .await;
    assert!(
        bad_file
            .as_ref()
            .is_err_and(|e| e.contains("sslrootcert: cannot read /no/such.pem")),
        "{bad_file:?}"
    );
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_runs_over_amqps_to_a_broker_that_checks_both_ends() {
    let env = TestEnv::new().await;
    let dir = env.dir.join("tls");
    let ca = certificates(&dir);
    // A version 3 certificate (with an extension), as rustls requires.
    signed(
        &dir,
        "client",
        "/CN=syncfleet worker",
        "extendedKeyUsage=clientAuth",
    );
    let (broker, management) = tokio::task::block_in_place(|| {
        PrivateBroker::start_with_tls(
            &env.dir,
            &format!("{}_tls", env.name),
            &ServerTls {
                ca: &ca,
                cert: &dir.join("server.crt"),
                key: &dir.join("server.key"),
                client_certificates: true,
            },
        )
    })
    .unwrap();
    let port = broker.tls_port().unwrap();
    let base = format!("amqps://guest:guest@localhost:{port}/%2f");
    let file = |name: &str| dir.join(name).display().to_string().replace('/', "%2F");
    let url = format!(
        "{base}?cacertfile={}&certfile={}&keyfile={}",
        file("ca.pem"),
        file("client.crt"),
        file("client.key")
    );
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 500) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let text = env
        .config_text("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n")
        .replace(&crate::helpers::amqp_url(), &url)
        .replace(
            "connect_timeout = \"5s\"\n[jobs]",
            &format!("connect_timeout = \"5s\"\nmanagement_url = \"{management}\"\n[jobs]"),
        );
    let path = env.write("syncfleet.toml", &text);
    let config = std::sync::Arc::new(syncfleet_core::Config::load(&path).unwrap());
    assert!(config.broker.tls.client.is_some(), "{text}");

    // The producer and the workers publish and consume over TLS.
    env.sync(&config, 2).await;
    env.assert_same_rows("SELECT * FROM items").await;

    // Queue depths come from the management API over HTTPS.
    let work = format!("{}.work", env.name);
    let api = Management::new(
        config.broker.management_url.as_ref().unwrap(),
        &config.broker.tls,
    )
    .unwrap();
    // (A queue's counts appear once the broker has collected its
    // statistics, every few seconds.)
    env.eventually("the work queue's counts", 30, || async {
        api.queue_counts("/", &work)
            .await
            .is_ok_and(|c| c.ready == 0)
    })
    .await;
    // The management listener asks for a client certificate too.
    let anonymous = Management::new(
        config.broker.management_url.as_ref().unwrap(),
        &BrokerTls {
            client: None,
            ..config.broker.tls.clone()
        },
    )
    .unwrap()
    .queue_counts("/", &work)
    .await;
    assert!(
        anonymous.is_err(),
        "the management API answered without a client certificate: {anonymous:?}"
    );
    let untrusted = Management::new(
        config.broker.management_url.as_ref().unwrap(),
        &BrokerTls::default(),
    )
    .unwrap()
    .queue_counts("/", &work)
    .await;
    assert!(
        untrusted.as_ref().is_err_and(|e| e.contains("certificate")),
        "the system's CAs do not know the test's: {untrusted:?}"
    );

    // Each end is checked: the broker's certificate against the CA and the
    // URL's host, the worker's by the broker.
    let connect = |url: String, tls: BrokerTls| {
        let mut broker = config.broker.clone();
        broker.url = SecretUrl::new(url);
        broker.tls = tls;
        async move {
            syncfleet_broker::connect(&broker, "tls-test")
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let all = config.broker.tls.clone();
    assert_eq!(connect(url.clone(), all.clone()).await, Ok(()));
    let no_ca = BrokerTls {
        ca_file: None,
        ..all.clone()
    };
    let failed = connect(base.clone(), no_ca).await;
    assert!(
        failed.as_ref().is_err_and(|e| e.contains("certificate")),
        "unknown CA: {failed:?}"
    );
    let by_ip = base.replace("localhost", "127.0.0.1");
    let failed = connect(by_ip, all.clone()).await;
    assert!(
        failed.as_ref().is_err_and(|e| e.contains("certificate")),
        "a certificate for another host: {failed:?}"
    );
    let no_client = BrokerTls {
        client: None,
        ..all.clone()
    };
    let failed = connect(base.clone(), no_client).await;
    assert!(failed.is_err(), "the broker asks for a client certificate");
    assert!(
        !format!("{failed:?}").contains("guest:guest"),
        "errors hide the password: {failed:?}"
    );
    drop(broker);
}
