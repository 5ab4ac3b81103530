//! TLS to PostgreSQL as the URL asks for it (`sslmode`, `sslrootcert`),
//! against a private cluster serving a certificate for `localhost` signed
//! by a CA of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;

use syncfleet_chaos::postgres::PrivatePostgres;
use syncfleet_core::config::DbConfig;
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
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    let _ = Command::new("chmod")
        .arg("600")
        .arg(dir.join("server.key"))
        .status();
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
