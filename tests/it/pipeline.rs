//! The pipeline end to end: deletes, replays, a shared queue, verify, and
//! the commands around them.

use std::sync::Arc;
use std::time::Duration;

use syncfleet_core::job::{Job, KeyRange, NO_RUN, Selection};
use syncfleet_db::StreamShape;
use syncfleet_db::sql::{self, Upsert};
use syncfleet_worker::Executor;

use crate::helpers::{Fleet, TestEnv};
use tokio::io::{AsyncBufReadExt, BufReader};

const USERS: &str = "CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name text, score numeric);
     INSERT INTO users SELECT i, 'u' || i || '@example.com', 'name ' || i, i * 1.5 FROM generate_series(1, 500) i;";

const USERS_STREAM: &str = "[[stream]]\nname = \"users\"\ntable = \"users\"\nbatch_size = 40\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_in_the_source_reach_the_destination() {
    let env = TestEnv::new().await;
    env.source.batch_execute(USERS).await.unwrap();
    env.migrate().await;
    let config = env.config(USERS_STREAM);
    env.sync(&config, 1).await;

    // First row, last row, a whole batch's worth in the middle, and changes.
    env.source
        .batch_execute(
            "DELETE FROM users WHERE id = 1 OR id = 500 OR id BETWEEN 100 AND 180;
             UPDATE users SET name = 'renamed' WHERE id % 7 = 0;
             INSERT INTO users VALUES (1000, 'new@example.com', NULL, NULL);",
        )
        .await
        .unwrap();
    env.sync(&config, 1).await;
    let all = "SELECT * FROM users";
    assert_eq!(
        TestEnv::rows(&env.source, all).await,
        TestEnv::rows(&env.dest, all).await
    );

    // An emptied source empties the destination.
    env.source.batch_execute("DELETE FROM users").await.unwrap();
    env.sync(&config, 1).await;
    assert!(TestEnv::rows(&env.dest, all).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_replayed_three_times_leaves_the_same_state() {
    let env = TestEnv::new().await;
    env.source.batch_execute(USERS).await.unwrap();
    env.migrate().await;
    let config = env.config(USERS_STREAM);
    let plan = env.plan(&config).await;
    let executor = Executor::connect(config.clone()).await.unwrap();
    let jobs = env.jobs(plan.run_id, "users").await;
    assert_eq!(jobs.len(), 13);

    // A destination row the source never had, inside the first batch's range: the
    // first round deletes it, the replays find nothing left to delete.
    env.dest
        .batch_execute("INSERT INTO users VALUES (0, 'stray', 'stray', 0)")
        .await
        .unwrap();
    let mut snapshots = Vec::new();
    for round in 0..3 {
        for job in &jobs {
            let outcome = executor.execute(job).await.unwrap();
            if round > 0 {
                assert_eq!(
                    outcome.rows_deleted, 0,
                    "nothing left to delete on a replay"
                );
            }
        }
        snapshots.push(TestEnv::rows(&env.dest, "SELECT * FROM users").await);
    }
    assert_eq!(snapshots[0], snapshots[1]);
    assert_eq!(snapshots[1], snapshots[2]);
    assert_eq!(
        snapshots[2],
        TestEnv::rows(&env.source, "SELECT * FROM users").await
    );
    let attempts: i32 = env
        .dest
        .query_one(
            "SELECT min(attempts) FROM syncfleet.batches WHERE run_id = $1",
            &[&plan.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_queue() {
    let env = TestEnv::new().await;
    env.source.batch_execute(USERS).await.unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"users\"\ntable = \"users\"\nbatch_size = 5\n");
    // Two worker processes of the real binary.
    let path = env.dir.join("syncfleet.toml");
    let spawn = || {
        crate::helpers::syncfleet()
            .arg("--config")
            .arg(&path)
            .args(["worker", "--concurrency", "2"])
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut workers = [spawn(), spawn()];
    // Both consume before any job is published: a worker that starts late
    // on a busy machine could find the jobs all done.
    env.eventually("both workers to consume", 60, || async {
        env.work_consumers().await == 2
    })
    .await;
    let plan = env.plan(&config).await;
    env.wait(plan.run_id).await;
    let by_worker: Vec<i64> = env
        .dest
        .query(
            "SELECT count(*) FROM syncfleet.batches WHERE run_id = $1 GROUP BY worker",
            &[&plan.run_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(by_worker.len(), 2, "both workers took jobs: {by_worker:?}");
    assert_eq!(by_worker.iter().sum::<i64>(), 101);
    env.assert_same_rows("SELECT * FROM users").await;
    // SIGTERM drains and exits 0.
    for w in &mut workers {
        let pid = w.id().unwrap() as i32;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
    }
    for w in &mut workers {
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), w.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
    assert_eq!(env.queue_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_streams_and_ranges_that_differ() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(&format!(
            "{USERS} CREATE TABLE notes (id int PRIMARY KEY, body text);
             INSERT INTO notes SELECT i, 'n' || i FROM generate_series(1, 30) i;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(&format!(
        "{USERS_STREAM}[[stream]]\nname = \"notes\"\ntable = \"notes\"\n"
    ));
    env.sync(&config, 1).await;
    let path = env.dir.join("syncfleet.toml");
    let out = env.cli(&path, &["verify", "--range-rows", "100"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("users") && stdout.contains("ok"),
        "{stdout}"
    );

    // Same count, different content in one range; a missing row in another.
    env.dest
        .batch_execute(
            "UPDATE users SET name = 'tampered' WHERE id = 150; DELETE FROM users WHERE id = 420;",
        )
        .await
        .unwrap();
    let out = env.cli(&path, &["verify", "--range-rows", "100"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("stream 'users': 2 key range(s) differ"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "(100, 200]: source 100 rows, destination 100 rows (same count, different content)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("(400, 500]: source 100 rows, destination 99 rows"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("stream 'notes'"),
        "notes is intact: {stdout}"
    );

    // A destination row beyond every source key is caught by the open range.
    env.dest
        .batch_execute("UPDATE users SET name = 'name 150' WHERE id = 150; INSERT INTO users VALUES (420, 'u420@example.com', 'name 420', 630.0), (9999, 'x', 'x', 1);")
        .await
        .unwrap();
    let out = env
        .cli(
            &path,
            &["verify", "--stream", "users", "--range-rows", "100"],
        )
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.contains("(500, +inf): source 0 rows, destination 1 rows"),
        "{stdout}"
    );

    // A column added to the source before the destination has it: the
    // error says which stream, which side and what (not just "db error").
    env.source
        .batch_execute("ALTER TABLE notes ADD COLUMN extra int")
        .await
        .unwrap();
    let out = env.cli(&path, &["verify", "--stream", "notes"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stream 'notes': on the destination: column")
            && stderr.contains("extra does not exist"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_wait_and_status_through_the_binary() {
    let env = TestEnv::new().await;
    env.source.batch_execute(USERS).await.unwrap();
    let config = env.config(USERS_STREAM);
    let path = env.dir.join("syncfleet.toml");

    // Without the control schema, sync and status refuse and say what to
    // run.
    for args in [&["sync"][..], &["status"], &["status", "--json"]] {
        let out = env.cli(&path, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("syncfleet migrate"), "{args:?}: {stderr}");
    }

    let out = env.cli(&path, &["migrate"]).await;
    assert!(out.status.success());
    let again = env.cli(&path, &["migrate"]).await;
    assert!(again.status.success(), "migrate is idempotent");
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    let fleet = Fleet::start(&Arc::clone(&config), 1);
    // --config after the subcommand works too.
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        crate::helpers::syncfleet()
            .args(["sync", "--wait", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(run_id.parse::<i64>().is_ok(), "prints the run id: {run_id}");
    fleet.stop().await;

    let out = env.cli(&path, &["status", &run_id]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(stdout.contains("13/13"), "{stdout}");
    assert!(stdout.contains("read slots: 0 of 4 held"), "{stdout}");
    assert!(
        stdout.contains(&format!("queue {}.work: 0 ready", env.name)),
        "{stdout}"
    );

    // Machine-readable, and a watch of a finished run returns at once.
    let out = env.cli(&path, &["status", "--json", &run_id]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(v["run"]["status"], "succeeded");
    assert_eq!(v["run"]["streams"][0]["batches_done"], 13);
    assert_eq!(v["run"]["streams"][0]["rows"], 500);
    assert!(v["queues"].as_array().is_some_and(|q| !q.is_empty()), "{v}");
    assert!(v["queues_error"].is_null(), "{v}");
    assert_eq!(v["run"]["failed_batches_total"], 0);
    let out = env.cli(&path, &["status", "--watch", &run_id]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    // A run that does not exist is a usage error, watched or not.
    for args in [&["status", "999999"][..], &["status", "--watch", "999999"]] {
        let out = env.cli(&path, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }

    // No worker runs now: the wait runs out, and says the run goes on.
    let out = env.cli(&path, &["sync", "--wait", "--timeout", "1s"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("it goes on"), "{stderr}");

    // Resumed, and then the control schema locked under its wait (a
    // migration, `VACUUM FULL`): the wait still ends at its timeout.
    let going: i64 = env
        .dest
        .query_one("SELECT max(id) FROM syncfleet.runs", &[])
        .await
        .unwrap()
        .get(0);
    let mut child = crate::helpers::syncfleet()
        .args(["sync", "--wait", "--timeout", "15s", "--resume"])
        .arg(going.to_string())
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    let resumed = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stderr.push_str(&line);
            if line.contains("resumed run") {
                return;
            }
        }
        panic!("no resume: {stderr}");
    };
    tokio::time::timeout(Duration::from_secs(60), resumed)
        .await
        .unwrap();
    let locker = crate::helpers::connect(&env.dest_url).await;
    locker
        .batch_execute("BEGIN; LOCK TABLE syncfleet.runs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let waited = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stderr.push_str(&line);
        }
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(60), waited).await;
    locker.batch_execute("ROLLBACK").await.unwrap();
    let status = status.expect("the wait ended while the lock was held");
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("gave no answer"), "{stderr}");
}

/// A key whose `=` forgives differences (numeric scale) is copied as the
/// source writes it: the row its key finds holds it in another form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_equal_in_value_but_not_in_form_is_rewritten() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE nk (id numeric PRIMARY KEY, v text);
             INSERT INTO nk VALUES (1.00, 'a'), (2, 'b'), (3.5, 'c');",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"nk\"\ntable = \"nk\"\nbatch_size = 2\n");
    env.sync(&config, 1).await;
    env.dest
        .batch_execute("UPDATE nk SET id = 1.0 WHERE id = 1; UPDATE nk SET id = 2.000 WHERE id = 2")
        .await
        .unwrap();
    env.sync(&config, 1).await;
    env.assert_same_rows("SELECT id::text, v FROM nk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_empty_range_and_merge_paths_give_the_same_rows() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text, j json, n numeric);
             INSERT INTO t SELECT i, 'v' || i, '{\"a\": 1,  \"b\": [1, 2]}', i / 7.0 FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\nbatch_size = 50\n");
    // Into an empty destination: every batch takes the direct COPY path.
    env.sync(&config, 1).await;
    let direct = TestEnv::rows(&env.dest, "SELECT * FROM t").await;
    assert_eq!(direct, TestEnv::rows(&env.source, "SELECT * FROM t").await);

    // Every range now holds rows, some stale, some extra, some identical:
    // every batch takes the stage-and-merge path.
    env.dest
        .batch_execute(
            "UPDATE t SET v = 'stale', j = '{\"a\": 2}' WHERE id % 3 = 0;
             DELETE FROM t WHERE id % 5 = 0;
             INSERT INTO t SELECT i * 1000, 'extra', NULL, NULL FROM generate_series(1, 300) i ON CONFLICT DO NOTHING;
             INSERT INTO t VALUES (-1, 'before every range', NULL, NULL);",
        )
        .await
        .unwrap();
    env.sync(&config, 1).await;
    assert_eq!(TestEnv::rows(&env.dest, "SELECT * FROM t").await, direct);
    // json text is kept byte for byte on both paths.
    let j: String = env
        .dest
        .query_one("SELECT j::text FROM t WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(j, "{\"a\": 1,  \"b\": [1, 2]}");

    // An unchanged re-sync rewrites no row: every row keeps its version
    // (the transaction id that wrote it).
    let versions = "SELECT id, xmin::text, xmax::text FROM t";
    let before = TestEnv::rows(&env.dest, versions).await;
    env.sync(&config, 1).await;
    assert_eq!(
        before,
        TestEnv::rows(&env.dest, versions).await,
        "an unchanged re-sync wrote rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_found_unchanged_is_not_copied_and_any_change_is() {
    let env = TestEnv::new().await;
    // Every kind of column: types with exact equality are fingerprinted as
    // values, the others as text.
    let mood = "CREATE TYPE mood AS ENUM ('sad', 'ok');";
    env.dest.batch_execute(mood).await.unwrap();
    env.source
        .batch_execute(&format!(
            "{mood}
             CREATE TABLE t (id bigint PRIMARY KEY, txt text, b bool, ts timestamptz, d date, u uuid,
               by bytea, n numeric, f float8, j jsonb, js json, iv interval, a int[], m mood, c char(4));
             INSERT INTO t SELECT i, 'v' || i, i % 2 = 0, timestamptz '2024-01-01' + i * interval '1 min',
               date '2024-01-01' + i, md5(i::text)::uuid, decode(md5(i::text), 'hex'), i / 7.0,
               CASE WHEN i = 4500 THEN 0 WHEN i % 50 = 0 THEN 'NaN' ELSE i / 3.0 END,
               jsonb_build_object('n', i), '{{\"a\":  1}}', make_interval(hours => i), ARRAY[i, NULL],
               CASE WHEN i % 2 = 0 THEN 'ok' ELSE 'sad' END::mood, 'ab'
             FROM generate_series(1, 6000) i;
             UPDATE t SET txt = NULL, n = NULL, j = NULL, a = NULL WHERE id % 11 = 0;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\nbatch_size = 1000\n");
    let batches = |run_id: i64| {
        let dest = &env.dest;
        async move {
            dest.query(
                "SELECT coalesce(rows_copied, 0), coalesce(rows_unchanged, 0) \
                 FROM syncfleet.batches WHERE run_id = $1 ORDER BY batch_no",
                &[&run_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
        }
    };
    let all = "SELECT * FROM t";
    let loaded = env.sync(&config, 1).await;
    assert_eq!(
        TestEnv::rows(&env.dest, all).await,
        TestEnv::rows(&env.source, all).await
    );
    assert!(
        batches(loaded)
            .await
            .iter()
            .all(|&(_, unchanged)| unchanged == 0)
    );

    // Unchanged: every batch is found equal, nothing is copied or written.
    let versions = "SELECT id, xmin::text, xmax::text FROM t";
    let before = TestEnv::rows(&env.dest, versions).await;
    let resynced = env.sync(&config, 1).await;
    let found = batches(resynced).await;
    assert_eq!(found.iter().map(|b| b.1).sum::<i64>(), 6000, "{found:?}");
    assert!(found.iter().all(|&(copied, _)| copied == 0), "{found:?}");
    assert_eq!(TestEnv::rows(&env.dest, versions).await, before);

    // One change in each of five ranges, each of a kind that only the text
    // form or the row count shows: numeric scale, a jsonb number's form, a
    // float's sign, a row gone from the source, a row changed in the
    // destination. The last range stays unchanged.
    env.source
        .batch_execute(
            "UPDATE t SET n = 1.00 WHERE id = 7;
             UPDATE t SET j = '{\"n\": 1500.0}' WHERE id = 1500;
             DELETE FROM t WHERE id = 2500;
             UPDATE t SET f = '-0' WHERE id = 4500;",
        )
        .await
        .unwrap();
    env.dest
        .batch_execute("UPDATE t SET txt = 'tampered' WHERE id = 3500")
        .await
        .unwrap();
    let changed = env.sync(&config, 1).await;
    assert_eq!(
        TestEnv::rows(&env.dest, all).await,
        TestEnv::rows(&env.source, all).await
    );
    let found = batches(changed).await;
    assert_eq!(
        found.iter().map(|b| b.0 + b.1).sum::<i64>(),
        5999,
        "{found:?}"
    );
    assert!(found.iter().filter(|b| b.1 > 0).count() <= 1, "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_upsert_forms_write_the_same_rows() {
    // Workers use MERGE where the destination has it (PostgreSQL 15 and
    // later) and INSERT … ON CONFLICT before; this server has both.
    let env = TestEnv::new().await;
    let table = "CREATE TABLE t (id int PRIMARY KEY, v text, j jsonb, n numeric)";
    env.source.batch_execute(table).await.unwrap();
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\n");
    let stream = config.stream("t").unwrap();
    let shape = StreamShape::describe(&env.source, stream).await.unwrap();
    // What the destination held, and a batch of the source's rows: the same
    // values (1, 2), changed ones (3-7: text, jsonb number, numeric scale,
    // to and from NULL) and new ones (8, 9). Row 10 is outside the batch.
    let held = "INSERT INTO t VALUES (1, 'a', '{\"n\": 1}', 1.5), (2, NULL, NULL, NULL),
        (3, 'old', NULL, NULL), (4, 'x', '{\"n\": 1}', NULL), (5, 'x', NULL, 1.0),
        (6, NULL, NULL, 2), (7, 'x', '[]', 3), (10, 'kept', NULL, NULL)";
    let staged = "INSERT INTO pg_temp.syncfleet_stage VALUES (1, 'a', '{\"n\": 1}', 1.5),
        (2, NULL, NULL, NULL), (3, 'new', NULL, NULL), (4, 'x', '{\"n\": 1.0}', NULL),
        (5, 'x', NULL, 1.00), (6, 'now set', '{}', 2), (7, NULL, NULL, NULL),
        (8, 'new', '[1]', 8), (9, NULL, NULL, NULL)";
    let expected = vec![
        "(1,a,\"{\"\"n\"\": 1}\",1.5)",
        "(10,kept,,)",
        "(2,,,)",
        "(3,new,,)",
        "(4,x,\"{\"\"n\"\": 1.0}\",)",
        "(5,x,,1.00)",
        "(6,\"now set\",{},2)",
        "(7,,,)",
        "(8,new,[1],8)",
        "(9,,,)",
    ];
    for how in [Upsert::Merge, Upsert::OnConflict] {
        env.dest
            .batch_execute(&format!("DROP TABLE IF EXISTS t; {table}; {held}"))
            .await
            .unwrap();
        let unchanged = "SELECT id, xmin::text, xmax::text FROM t WHERE id IN (1, 2)";
        let before = TestEnv::rows(&env.dest, unchanged).await;
        let upsert = sql::upsert(&shape, &stream.destination_table, false, how);
        env.dest
            .batch_execute(&format!(
                "BEGIN; {}; {staged}; {upsert}; COMMIT",
                sql::create_stage(&shape, &stream.destination_table)
            ))
            .await
            .unwrap_or_else(|e| panic!("{how:?}: {e}"));
        assert_eq!(
            TestEnv::rows(&env.dest, "SELECT * FROM t").await,
            expected,
            "{how:?}"
        );
        if how == Upsert::Merge {
            // Unchanged rows are not even locked (ON CONFLICT locks them).
            assert_eq!(TestEnv::rows(&env.dest, unchanged).await, before);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emptiness_check_probes_the_key_index_even_without_statistics() {
    // A freshly loaded destination has no statistics yet; a bare NOT
    // EXISTS over the last, open range was planned as a scan of the whole
    // table.
    let env = TestEnv::new().await;
    let table = "CREATE TABLE t (id bigint PRIMARY KEY, v text) WITH (autovacuum_enabled = false)";
    env.source.batch_execute(table).await.unwrap();
    env.dest
        .batch_execute(&format!(
            "{table}; INSERT INTO t SELECT i, repeat('x', 100) FROM generate_series(1, 200000) i"
        ))
        .await
        .unwrap();
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\n");
    let stream = config.stream("t").unwrap();
    let shape = StreamShape::describe(&env.source, stream).await.unwrap();
    let range = KeyRange {
        lower: Some(vec!["199000".into()]),
        upper: None,
    };
    let predicate =
        sql::RangePredicate::new(&shape, "d", &range, sql::Binding::Params { first: 1 });
    let check = sql::range_is_empty(&shape, &stream.destination_table, &predicate);
    let plan = crate::helpers::explain(&env.dest, &check, &[&predicate.params[0]]).await;
    assert!(plan.contains("t_pkey"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_sharing_a_transaction_write_what_each_would_alone() {
    // Workers run small jobs together: one source snapshot, one destination
    // transaction. Here one group takes every path at once, across two
    // streams: direct COPY into empty ranges, stage and merge (the stage
    // made again for each job), clearing a range the source emptied, and
    // ranges empty on both sides.
    let env = TestEnv::new().await;
    let t = "CREATE TABLE t (id int PRIMARY KEY, v text, n numeric)";
    env.source
        .batch_execute(&format!(
            "{USERS} {t}; INSERT INTO t SELECT i, 'v' || i, i / 7.0 FROM generate_series(1, 300) i;"
        ))
        .await
        .unwrap();
    env.migrate().await;
    env.dest
        .batch_execute(&format!(
            "{t}; ALTER TABLE t ADD CONSTRAINT not_bad CHECK (v <> 'bad');
             INSERT INTO t SELECT i, CASE WHEN i % 3 = 0 THEN 'stale' ELSE 'v' || i END, i / 7.0 \
             FROM generate_series(1, 300) i WHERE i % 5 <> 0;
             INSERT INTO t VALUES (1000, 'extra', NULL);"
        ))
        .await
        .unwrap();
    let config = env.config(&format!(
        "{USERS_STREAM}[[stream]]\nname = \"t\"\ntable = \"t\"\nbatch_size = 50\n"
    ));
    let plan = env.plan(&config).await;
    // After planning: a users range the source no longer has rows in, which
    // the destination still does, and one empty on both sides.
    env.source
        .batch_execute("DELETE FROM users WHERE id BETWEEN 41 AND 120")
        .await
        .unwrap();
    env.dest
        .batch_execute("INSERT INTO users VALUES (50, 'gone@example.com', 'gone', 0)")
        .await
        .unwrap();
    let executor = Executor::connect(config.clone()).await.unwrap();
    let (users, items) = (
        env.jobs(plan.run_id, "users").await,
        env.jobs(plan.run_id, "t").await,
    );
    assert_eq!((users.len(), items.len()), (13, 7));
    let mut items = items.into_iter();
    let jobs: Vec<_> = users
        .into_iter()
        .flat_map(|u| std::iter::once(u).chain(items.next()))
        .collect();

    let outcomes = executor.execute_group(&jobs, None).await.unwrap();
    for table in ["users", "t"] {
        let all = format!("SELECT * FROM {table}");
        assert_eq!(
            TestEnv::rows(&env.source, &all).await,
            TestEnv::rows(&env.dest, &all).await,
            "{table}"
        );
    }
    let deleted: u64 = outcomes.iter().map(|o| o.rows_deleted).sum();
    assert_eq!(deleted, 1 + 1, "the user the source lost and t's extra row");
    assert_eq!(
        outcomes.iter().filter(|o| o.finished_run).count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes.last().unwrap().finished_run);
    let (done, transactions): (i64, i64) = {
        let r = env
            .dest
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'done'), count(DISTINCT started_at) \
                 FROM syncfleet.batches WHERE run_id = $1",
                &[&plan.run_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((done, transactions), (20, 1));

    // A group commits all or nothing: one job that cannot be written leaves
    // every range of the group as it was, and its batches pending.
    env.source
        .batch_execute("UPDATE t SET n = n + 1; UPDATE t SET v = 'bad' WHERE id = 120;")
        .await
        .unwrap();
    let before = TestEnv::rows(&env.dest, "SELECT * FROM t").await;
    let plan = env.plan(&config).await;
    let jobs = env.jobs(plan.run_id, "t").await;
    let error = executor.execute_group(&jobs, None).await.unwrap_err();
    assert!(error.to_string().contains("not_bad"), "{error}");
    assert_eq!(TestEnv::rows(&env.dest, "SELECT * FROM t").await, before);
    let not_pending: i64 = env
        .dest
        .query_one(
            "SELECT count(*) FROM syncfleet.batches WHERE run_id = $1 AND status <> 'pending'",
            &[&plan.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(not_pending, 0);
    // Alone, every other job commits. One at a time: all at once, some
    // would wait for the executor's connections past their deadline.
    let mut alone = Vec::new();
    for job in &jobs {
        alone.push(executor.execute(job).await.map(|_| ()));
    }
    let failed: Vec<_> = alone.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{alone:?}");
    assert!(failed[0].to_string().contains("not_bad"), "{alone:?}");
}

/// Migrations change the source first. A column added there is refused by
/// the next run's planning until the destination has it, and meanwhile the
/// jobs of a run planned before, and event jobs, copy the columns the two
/// sides share; a column dropped under a running run is described again,
/// not a failed batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_changed_on_the_source_alone_fails_no_job() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    env.sync(&config, 1).await;
    let planned_before = env.plan(&config).await;
    env.source
        .batch_execute(
            "ALTER TABLE items ADD COLUMN w text; UPDATE items SET v = 'changed', w = 'w' || id;",
        )
        .await
        .unwrap();
    // A worker that describes the stream now (a new pod, say) sees w.
    let fresh = Executor::connect(config.clone()).await.unwrap();
    for job in env.jobs(planned_before.run_id, "items").await {
        let done = fresh.execute(&job).await;
        assert!(done.is_ok(), "{done:?}");
    }
    let event = Job::selection(
        NO_RUN,
        "items",
        1,
        Selection {
            columns: vec!["id".into()],
            values: vec![vec!["7".into()]],
        },
    );
    env.source
        .batch_execute("UPDATE items SET v = 'event' WHERE id = 7")
        .await
        .unwrap();
    let done = fresh.execute(&event).await;
    assert!(done.is_ok(), "{done:?}");
    env.wait(planned_before.run_id).await;
    env.assert_same_rows("SELECT id, v FROM items").await;
    let refused = env.try_plan(&config).await.unwrap_err().to_string();
    assert!(
        refused.contains("lacks column(s) w that the stream produces"),
        "{refused}"
    );

    env.dest
        .batch_execute("ALTER TABLE items ADD COLUMN w text")
        .await
        .unwrap();
    let with_w = env.plan(&config).await;
    let jobs = env.jobs(with_w.run_id, "items").await;
    let first = fresh.execute(&jobs[0]).await;
    assert!(first.is_ok(), "{first:?}");
    // Dropped under the run: its next jobs describe the stream again.
    env.source
        .batch_execute("ALTER TABLE items DROP COLUMN w; UPDATE items SET v = 'again'")
        .await
        .unwrap();
    for job in &jobs[1..] {
        let done = fresh.execute(job).await;
        assert!(done.is_ok(), "{done:?}");
    }
    env.wait(with_w.run_id).await;
    env.assert_same_rows("SELECT id, v FROM items WHERE id > 100")
        .await;

    // A key column the destination lacks is no passing change: described
    // anew, the job still names it, and is rejected.
    env.dest
        .batch_execute("ALTER TABLE items RENAME COLUMN id TO ident")
        .await
        .unwrap();
    let done = fresh.execute(&event).await;
    assert!(
        matches!(&done, Err(syncfleet_worker::JobError::Reject(e)) if e.contains("described anew")),
        "{done:?}"
    );
}

/// Describing a stream waits behind an app's migration like any statement,
/// and is cancelled with the job at its deadline: no statement of it is
/// left waiting, nor its connection pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_description_waiting_for_a_lock_is_cancelled_at_the_deadline() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\ndeadline = \"2s\"\n",
    );
    let plan = env.plan(&config).await;
    let jobs = env.jobs(plan.run_id, "items").await;
    // A migration holds the table.
    let migration = crate::helpers::connect(&env.source_url).await;
    migration
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let executor = Executor::connect(config.clone()).await.unwrap();
    let done = executor.execute(&jobs[0]).await;
    assert!(
        matches!(&done, Err(syncfleet_worker::JobError::Retry(e)) if e.contains("deadline")),
        "{done:?}"
    );
    // The cancel request takes effect on the server a moment later.
    env.eventually(
        "no statement of the job to wait for the lock",
        30,
        || async {
            let waiting = TestEnv::rows(
                &migration,
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
            )
            .await;
            waiting.is_empty()
        },
    )
    .await;
    migration.batch_execute("COMMIT").await.unwrap();
    // Its 2 s may run out again on a loaded machine (the cancelled
    // attempt's connections were closed, new ones are made): tried again
    // then, as a worker would; any other error (a broken connection
    // pooled, say) fails the test.
    env.eventually("the job to succeed once the lock is gone", 60, || async {
        use syncfleet_worker::JobError;
        match executor.execute(&jobs[0]).await {
            Ok(_) => true,
            Err(JobError::Retry(e)) if e.contains("deadline") => false,
            Err(JobError::NoReadSlot(_)) => false,
            Err(e) => panic!("{e:?}"),
        }
    })
    .await;
}

/// A column added to the source and the destination while the workers run
/// is copied by the first run planned after: a worker describes a stream
/// again for each new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_while_the_workers_run_is_copied_by_the_next_run() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 300) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 100\n");
    let fleet = Fleet::start(&config, 1);
    let first = env.plan(&config).await;
    env.wait(first.run_id).await;

    env.source
        .batch_execute("ALTER TABLE items ADD COLUMN w text; UPDATE items SET w = 'w' || id;")
        .await
        .unwrap();
    env.dest
        .batch_execute("ALTER TABLE items ADD COLUMN w text")
        .await
        .unwrap();
    let second = env.plan(&config).await;
    env.wait(second.run_id).await;
    fleet.stop().await;
    env.assert_same_rows("SELECT * FROM items").await;
}
