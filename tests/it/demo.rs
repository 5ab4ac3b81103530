//! `syncfleet demo` exits 0 with every stream verified.

use crate::helpers::{TestEnv, amqp_url, connect, pg_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_syncs_and_verifies_every_stream() {
    // A TestEnv only for its unique name and its cleanup of the broker
    // prefix; the demo makes its own databases under that name.
    let env = TestEnv::new().await;
    let config = env.dir.join("demo.toml");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        crate::helpers::syncfleet()
            .args([
                "demo",
                "--users",
                "500",
                "--name",
                &env.name,
                "--write-config",
            ])
            .arg(&config)
            .env("SYNCFLEET_DEMO_PG_URL", pg_url())
            .env("SYNCFLEET_DEMO_AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await;
    // Dropped whether the demo finished or not (a timeout kills it).
    let admin = connect(&pg_url()).await;
    for db in ["app", "reporting"] {
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}_{db}\" WITH (FORCE)",
                env.name
            ))
            .await
            .unwrap();
    }
    let out = out.expect("the demo to finish within 300 s").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (stream, rows) in [
        ("user_profiles", 500),
        ("quiz_responses", 1500),
        ("engagement_logs", 2500),
        ("chat_logs", 2000),
        ("course_progress", 1000),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(stream))
            .unwrap_or_else(|| panic!("no summary line for {stream}: {stdout}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[1], rows.to_string(), "{line}");
        assert_eq!(fields.last(), Some(&"yes"), "{line}");
    }
}

/// A `--name` that is no plain identifier (it names databases the demo
/// drops, and the broker prefix) is refused before anything is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_refuses_a_name_it_cannot_use_as_is() {
    let out = crate::helpers::syncfleet()
        .args([
            "demo",
            "--name",
            "x\"; DROP",
            "--write-config",
            "/nonexistent/demo.toml",
        ])
        .env("SYNCFLEET_DEMO_PG_URL", pg_url())
        .env("SYNCFLEET_DEMO_AMQP_URL", amqp_url())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--name: expected"), "{stderr}");
}
