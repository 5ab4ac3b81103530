//! The chaos harness, short form: the same scenario as `just chaos` on
//! fewer rows. A private RabbitMQ node is restarted, so the shared broker
//! and the other tests are not disturbed.

use std::time::Duration;

use crate::helpers::pg_url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_and_doubles_nothing() {
    let options = syncfleet_chaos::Options {
        syncfleet: env!("CARGO_BIN_EXE_syncfleet").into(),
        pg_url: pg_url(),
        rows: 30_000,
        workers: 3,
        kill_every: Duration::from_secs(1),
        terminate_at: 0.15,
        restart_at: 0.4,
        batch_size: 50,
        timeout: Duration::from_secs(300),
        name: format!("sfchaos_test_{}", std::process::id()),
    };
    let report = syncfleet_chaos::run(&options).await.unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!((report.lost, report.duplicated), (0, 0));
}
