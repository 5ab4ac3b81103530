//! Planning: keyset batches over integer, text and composite keys, an empty
//! table, and more boundaries than one planner chunk.

use serde_json::Value;

use syncfleet_db::sql::Pace;

use crate::helpers::TestEnv;

/// The run's batches as (lower, upper) JSON, in batch order.
async fn batches(env: &TestEnv, run_id: i64, stream: &str) -> Vec<(Value, Value)> {
    env.dest
        .query(
            "SELECT coalesce(lower_key, 'null'), coalesce(upper_key, 'null') FROM syncfleet.batches \
             WHERE run_id = $1 AND stream = $2 ORDER BY batch_no",
            &[&run_id, &stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn keys(values: &[(Value, Value)]) -> Vec<String> {
    values.iter().map(|(l, u)| format!("{l}..{u}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_keys_split_into_keyset_ranges() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text);
             INSERT INTO items SELECT i * 10, 'v' || i FROM generate_series(1, 10) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"items\"\ntable = \"items\"\nbatch_size = 3\n");
    let plan = env.plan(&config).await;
    assert_eq!(plan.batches, vec![("items".to_string(), 4)]);
    assert_eq!(
        keys(&batches(&env, plan.run_id, "items").await),
        vec![
            "null..[\"30\"]",
            "[\"30\"]..[\"60\"]",
            "[\"60\"]..[\"90\"]",
            "[\"90\"]..null"
        ]
    );
    assert_eq!(env.queue_depth().await, 4, "one message per batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_follow_the_source_order_and_sync() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE tags (name text PRIMARY KEY, n int);
             INSERT INTO tags VALUES ('b', 1), ('A', 2), ('a''b', 3), ('zeta', 4), ('Ärger', 5),
               ('ünïcødé ✓', 6), ('', 7), ('with space', 8), ('\\back', 9);",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"tags\"\ntable = \"tags\"\nbatch_size = 2\n");
    let run = env.sync(&config, 1).await;
    let b = batches(&env, run, "tags").await;
    assert_eq!(
        b.len(),
        5,
        "9 rows in batches of 2: 4 bounded and one open range"
    );
    // Boundaries are every second key in the source's own order.
    let ordered: Vec<String> = env
        .source
        .query("SELECT name FROM tags ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let uppers: Vec<String> = b
        .iter()
        .filter_map(|(_, u)| u.get(0).and_then(Value::as_str).map(str::to_string))
        .collect();
    assert_eq!(
        uppers,
        vec![
            ordered[1].clone(),
            ordered[3].clone(),
            ordered[5].clone(),
            ordered[7].clone()
        ]
    );
    env.assert_same_rows("SELECT * FROM tags").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_and_uuid_keys_sync_exactly() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE messages (conversation text, seq int, body text, PRIMARY KEY (conversation, seq));
             INSERT INTO messages SELECT 'c' || (i % 7), i, 'm' || i FROM generate_series(1, 100) i;
             CREATE TABLE events (id uuid PRIMARY KEY, at timestamptz);
             INSERT INTO events SELECT md5(i::text)::uuid, now() FROM generate_series(1, 50) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"messages\"\ntable = \"messages\"\nbatch_size = 9\n\
         [[stream]]\nname = \"events\"\ntable = \"events\"\nbatch_size = 7\n",
    );
    let run = env.sync(&config, 2).await;
    let b = batches(&env, run, "messages").await;
    assert_eq!(
        b.len(),
        12,
        "100 rows / 9 = 11 full batches + the open tail"
    );
    assert_eq!(
        b[0].1.as_array().unwrap().len(),
        2,
        "bounds carry both key columns"
    );
    assert_eq!(batches(&env, run, "events").await.len(), 8);
    for table in ["messages", "events"] {
        assert_eq!(
            TestEnv::rows(&env.source, &format!("SELECT * FROM {table}")).await,
            TestEnv::rows(&env.dest, &format!("SELECT * FROM {table}")).await,
            "{table}"
        );
    }
}

/// Every `every`-th key of a stream after `after`, as the planner finds
/// them, and whether it walked the key's index to find them.
/// The boundaries a scan of `stream` finds, and whether it walked the
/// key's index. Paced (as at the throttle's lowest levels), it must have
/// paused at least once.
async fn boundaries(
    env: &TestEnv,
    config: &syncfleet_core::config::Config,
    stream: &str,
    every: u32,
    after: Option<&Vec<String>>,
    pace: Option<Pace>,
) -> (bool, Vec<Vec<String>>) {
    let mut client = crate::helpers::connect(&env.source_url).await;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let shape = syncfleet_db::shape::StreamShape::describe(&tx, config.stream(stream).unwrap())
        .await
        .unwrap();
    let mut scan = syncfleet_db::scan::KeyScan::start(&tx, &shape, every, after, pace)
        .await
        .unwrap();
    let mut all = Vec::new();
    while let Some(chunk) = scan.next_chunk().await.unwrap() {
        all.extend(chunk);
    }
    // The pacing notes when it last woke from a pause.
    let woke: Option<String> = tx
        .query_one("SELECT current_setting('syncfleet.pace_wake', true)", &[])
        .await
        .unwrap()
        .get(0);
    let paused = woke.is_some_and(|w| !w.is_empty());
    assert_eq!(
        paused,
        pace.is_some(),
        "{stream}: paused {paused}, paced {pace:?}"
    );
    (scan.walks(), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walking_the_key_index_finds_the_keys_numbering_finds() {
    // A table is walked along its key's index; the same rows read through a
    // query, or a table whose only index on the key runs the other way, are
    // numbered in key order. All must find the same boundaries, from the
    // start and after a key, in the source's collation, paced or not.
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE pairs (org text, n int, v text, PRIMARY KEY (org, n));
             INSERT INTO pairs SELECT (ARRAY['b', 'A', 'a', 'Ärger', 'z z', ''])[1 + i % 6], i, 'v'
               FROM generate_series(1, 2500) i;
             CREATE TABLE downward (org text NOT NULL, n int NOT NULL, v text);
             CREATE UNIQUE INDEX ON downward (org DESC, n DESC);
             INSERT INTO downward SELECT * FROM pairs;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let key = "key = [\"org\", \"n\"]\n";
    let config = env.config(&format!(
        "[[stream]]\nname = \"walked\"\ntable = \"pairs\"\n\
         [[stream]]\nname = \"numbered\"\nquery = \"SELECT * FROM pairs\"\n{key}\
         [[stream]]\nname = \"downward\"\ntable = \"downward\"\n{key}"
    ));
    let after = vec!["a".to_string(), "1000".to_string()];
    // Working a hundredth of the time: a pause every ~10 µs of work.
    let paced = Some(Pace::at(0.01, Pace::PERIOD));
    for (every, after) in [
        (64, None),
        (70, None),
        (70, Some(&after)),
        (1000, None),
        (5000, None),
    ] {
        let (walks, walked) = boundaries(&env, &config, "walked", every, after, None).await;
        assert!(walks, "the primary key's index is walked");
        if after.is_none() {
            assert_eq!(walked.len(), 2500 / every as usize, "every {every}");
        } else {
            assert!(!walked.is_empty() && walked.len() < 2500 / every as usize);
        }
        if every == 64 {
            let (walks, _) = boundaries(&env, &config, "walked", 63, after, None).await;
            assert!(!walks, "a few rows per boundary are numbered");
        }
        for other in ["numbered", "downward"] {
            let (walks, numbered) = boundaries(&env, &config, other, every, after, None).await;
            assert!(!walks, "{other} is numbered");
            assert_eq!(numbered, walked, "{other}, every {every}, after {after:?}");
        }
        // Paced, as the planner walks while the fleet is throttled.
        for other in ["walked", "numbered"] {
            let (_, found) = boundaries(&env, &config, other, every, after, paced).await;
            assert_eq!(
                found, walked,
                "{other} paced, every {every}, after {after:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_table_is_one_open_batch() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute("CREATE TABLE nothing (id bigint PRIMARY KEY, v text);")
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"nothing\"\ntable = \"nothing\"\n");
    let run = env.sync(&config, 1).await;
    assert_eq!(
        keys(&batches(&env, run, "nothing").await),
        vec!["null..null"]
    );
    let n: i64 = env
        .dest
        .query_one("SELECT count(*) FROM nothing", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_streams_boundaries_in_chunks() {
    // 2,500 rows in batches of 2 is 1,250 boundaries: more than one chunk
    // of the planner's portal, so the chunk hand-over is exercised.
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE big (id bigint PRIMARY KEY);
             INSERT INTO big SELECT generate_series(1, 2500);",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"big\"\ntable = \"big\"\nbatch_size = 2\n");
    let plan = env.plan(&config).await;
    assert_eq!(plan.batches, vec![("big".to_string(), 1251)]);
    let b = batches(&env, plan.run_id, "big").await;
    for pair in b.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "consecutive ranges meet exactly");
    }
    assert_eq!(b[999].1, serde_json::json!(["2000"]));
    assert_eq!(b[1000].1, serde_json::json!(["2002"]));
    assert_eq!(env.queue_depth().await, 1251);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_finished_check_reads_only_pending_batches() {
    // Every job asks whether its run is done. Once the table's statistics
    // say the run's batches are pending, a plain "is any pending?" is
    // planned as a scan from the finished batches on: a cost per job that
    // grows with the run. The check must read the pending-batches index.
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 3000);",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\nbatch_size = 1\n");
    let run_id = env.plan(&config).await.run_id;
    env.dest
        .batch_execute(
            "ANALYZE syncfleet.batches;
             UPDATE syncfleet.batches SET status = 'done' WHERE batch_no < 2900;",
        )
        .await
        .unwrap();
    let plan =
        crate::helpers::explain(&env.dest, syncfleet_db::control::TRY_FINISH_RUN, &[&run_id]).await;
    assert!(plan.contains("batches_pending"), "{plan}");
    assert!(!plan.contains("Seq Scan on batches"), "{plan}");
}

/// Every job asks whether its run still holds its stream: with a year of
/// runs behind the stream, that must stay a probe of the claims index,
/// not a scan of every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_holder_checks_read_the_claims_index() {
    let env = TestEnv::new().await;
    env.migrate().await;
    env.dest
        .batch_execute(
            "INSERT INTO syncfleet.runs (kind, status) SELECT 'full', 'succeeded' FROM generate_series(1, 20000);
             INSERT INTO syncfleet.run_streams (run_id, stream)
               SELECT id, s FROM syncfleet.runs, unnest(ARRAY['a', 'b', 'c', 'd', 'e']) s;
             ANALYZE syncfleet.runs; ANALYZE syncfleet.run_streams;",
        )
        .await
        .unwrap();
    let runs = vec![17i64];
    let streams = vec!["c"];
    let plan = crate::helpers::explain(
        &env.dest,
        syncfleet_db::control::SUPERSEDED,
        &[&runs, &streams],
    )
    .await;
    assert!(plan.contains("run_streams_claims"), "{plan}");
    assert!(!plan.contains("Seq Scan on run_streams"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_control_schema_upgrades_with_its_runs() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50);",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config("[[stream]]\nname = \"t\"\ntable = \"t\"\nbatch_size = 10\n");
    let run_id = env.plan(&config).await.run_id;
    // Back to version 2 as an older syncfleet left it, with a run planned.
    env.dest
        .batch_execute(
            "DELETE FROM syncfleet.schema_version WHERE version >= 3;
             ALTER TABLE syncfleet.batches DROP COLUMN rows_unchanged;
             DROP TABLE syncfleet.fleet_reads;
             DROP TABLE syncfleet.standby_reads;
             ALTER TABLE syncfleet.runs DROP COLUMN reopened_at;
             ALTER TABLE syncfleet.run_streams DROP COLUMN claim;
             ALTER TABLE syncfleet.runs DROP COLUMN created_by;
             DROP SEQUENCE syncfleet.claims;
             DROP FUNCTION syncfleet.take_read_slot(int, text);
             DROP INDEX syncfleet.batches_pending;
             CREATE INDEX batches_pending ON syncfleet.batches (run_id) WHERE status <> 'done';",
        )
        .await
        .unwrap();
    let mut dest = crate::helpers::connect(&env.dest_url).await;
    assert_eq!(
        syncfleet_db::control::migrate(&mut dest).await.unwrap(),
        vec![3, 4, 5, 6, 7, 8, 9]
    );
    let index: String = env
        .dest
        .query_one(
            "SELECT pg_get_indexdef('syncfleet.batches_pending'::regclass)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("(run_id, stream, batch_no)"), "{index}");
    assert_eq!(batches(&env, run_id, "t").await.len(), 6);
    // And the run completes under the new schema.
    let fleet = crate::helpers::Fleet::start(&config, 1);
    env.wait(run_id).await;
    fleet.stop().await;
}
