//! Fidelity: every listed type arrives unchanged, including the enum and
//! domain types the destination did not have.

use crate::helpers::TestEnv;

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE DOMAIN mood_domain AS mood;
CREATE SCHEMA app;
CREATE TYPE app.level AS ENUM ('low', 'high');
CREATE TABLE by_mood (m mood PRIMARY KEY, n int);
INSERT INTO by_mood SELECT m, array_position(enum_range(NULL::mood), m) FROM unnest(enum_range(NULL::mood)) m;
CREATE TABLE everything (
    id          bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric, num_p numeric(12, 4),
    f4 real, f8 double precision,
    b boolean,
    t text, vc varchar(12), ch char(5),
    by bytea,
    u uuid,
    d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz(3), iv interval,
    j json, jb jsonb,
    ai integer[], at text[], a2 float8[][],
    e mood, ea mood[], dom positive, dome mood_domain, lvl app.level
);
INSERT INTO everything VALUES
 (1, -32768, -2147483648, -9223372036854775808,
  '-123456789012345678901234567890.123456789012345678901234567890', 12345678.1234,
  3.4028235e38, 1.7976931348623157e308, true,
  'plain', 'varchar', 'ab',
  '\x00ff10deadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '4713-01-01 BC', '00:00:00', '23:59:59.999999+14:59', '0001-01-01 00:00:00', '1970-01-01 00:00:00.123+00',
  '-178000000 years -1 mon -1 day -00:00:00.000001',
  '{"b": 1,   "a": [1, 2], "b": 2}', '{"nested": {"k": [true, null, 1.5e3]}}',
  '{1, NULL, -3}', '{"a b", "c,d", "\"q\"", "\\back", NULL, ""}', '{{1.5, -0}, {NaN, Infinity}}',
  'ok', '{sad, happy}', 42, 'happy', 'high'),
 (2, 32767, 2147483647, 9223372036854775807, 'NaN', -0.0001,
  1.4e-45, 5e-324, false,
  E'Ünïcødé ✓ 🚀 עִבְרִית e\u0301 tab\there\nnew line \\N literal "quotes" ''single''', 'x', 'abcde',
  '\x', '00000000-0000-0000-0000-000000000000',
  'infinity', '24:00:00', '00:00:00-15:59', 'infinity', '-infinity', '0',
  '[]', '[]', '{}', '{}', '{}',
  'it''s "complicated"', '{}', 1, 'sad', 'low'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 0, '0.000000000000000000001', 0, '-Infinity', -0.0, true,
  '', ' ', ' ', '\x5c4e', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
  '2024-02-29', '12:34:56.789', '12:00+00', '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.999+05:30',
  '1 year 2 mons 3 days 04:05:06.789',
  'null', '"just a string"', '{2147483647}', '{"{}"}', '{{1}}',
  'sad', '{ok, NULL}', 2147483647, NULL, NULL);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_unchanged() {
    let env = TestEnv::new().await;
    env.source.batch_execute(SCHEMA).await.unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"everything\"\ntable = \"everything\"\nbatch_size = 2\n\
         destination_table = \"copy_of_everything\"\n\
         [[stream]]\nname = \"by_mood\"\ntable = \"by_mood\"\nbatch_size = 1\n",
    );
    env.sync(&config, 1).await;
    // An enum key, its labels in the same order on both sides.
    env.assert_same_rows("SELECT * FROM by_mood").await;

    // Same column types, created by syncfleet (with the enum and domains).
    let types = "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = '{t}'::regclass AND attnum > 0 AND NOT attisdropped";
    assert_eq!(
        TestEnv::rows(&env.source, &types.replace("{t}", "everything")).await,
        TestEnv::rows(&env.dest, &types.replace("{t}", "copy_of_everything")).await
    );
    let labels =
        "SELECT enumlabel FROM pg_enum WHERE enumtypid = 'mood'::regtype ORDER BY enumsortorder";
    assert_eq!(
        TestEnv::rows(&env.source, labels).await,
        TestEnv::rows(&env.dest, labels).await
    );

    // Every value, compared as the server prints it with every float digit,
    // and every byte of the binary form, column by column.
    for client in [&env.source, &env.dest] {
        client
            .batch_execute("SET extra_float_digits = 3; SET TimeZone = 'UTC'")
            .await
            .unwrap();
    }
    let columns: Vec<String> = env
        .source
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = 'everything'::regclass \
             AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for c in &columns {
        let text = format!("SELECT id, \"{c}\"::text FROM {{t}}");
        assert_eq!(
            TestEnv::rows(&env.source, &text.replace("{t}", "everything")).await,
            TestEnv::rows(&env.dest, &text.replace("{t}", "copy_of_everything")).await,
            "column {c}"
        );
    }
    let nulls = "SELECT count(*) FROM {t} WHERE ROW(i2, t, j::text, e) IS NULL";
    assert_eq!(
        TestEnv::rows(&env.source, &nulls.replace("{t}", "everything")).await,
        TestEnv::rows(&env.dest, &nulls.replace("{t}", "copy_of_everything")).await
    );
    let binary = "SELECT id, md5(float8send(f8)) || md5(float4send(f4)) || md5(numeric_send(num)) FROM {t} WHERE f8 IS NOT NULL";
    assert_eq!(
        TestEnv::rows(&env.source, &binary.replace("{t}", "everything")).await,
        TestEnv::rows(&env.dest, &binary.replace("{t}", "copy_of_everything")).await,
        "floats and numerics are bit-identical"
    );

    let config_path = env.dir.join("syncfleet.toml");
    let out = env.cli(&config_path, &["verify"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_syncfleet_cannot_create_is_named_with_what_to_do() {
    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TYPE pair AS (a int, b text);
             CREATE TABLE odd (id int PRIMARY KEY, p pair);",
        )
        .await
        .unwrap();
    env.migrate().await;
    let path = env.write(
        "odd.toml",
        &env.config_text("[[stream]]\nname = \"odd\"\ntable = \"odd\"\n"),
    );
    let out = env.cli(&path, &["sync"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stream 'odd'")
            && stderr.contains("column 'p'")
            && stderr.contains("create pair"),
        "{stderr}"
    );
    assert_eq!(env.queue_depth().await, 0);
}

/// Keys whose type is a domain: over an enum, whose `<` and `=` PostgreSQL
/// finds only for the enum itself, not for a domain over it, and over a
/// type with a modifier, which the key's index must still serve. Planned
/// (the key walk), copied, re-synced with updates and deletes, refreshed by
/// an event and by incremental runs, and verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_domain_types_sync_like_any_other() {
    use crate::helpers::{Fleet, Producer};
    use syncfleet_core::job::KeyRange;
    use syncfleet_db::sql::{Binding, RangePredicate, bind};

    let env = TestEnv::new().await;
    env.source
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
             CREATE DOMAIN mood_domain AS mood;
             CREATE DOMAIN mood_again AS mood_domain;
             CREATE DOMAIN code AS varchar(8);
             CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
             CREATE DOMAIN stamp AS timestamptz;
             CREATE TABLE moods (m mood_again, c code, n positive NOT NULL, v text,
                                 at stamp NOT NULL DEFAULT '2026-01-01', PRIMARY KEY (m, c));
             INSERT INTO moods (m, c, n, v)
             SELECT m, lpad(i::text, 3, '0'), i, 'v' || i
             FROM unnest(enum_range(NULL::mood)) m, generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    env.migrate().await;
    let config = env.config(
        "[[stream]]\nname = \"moods\"\ntable = \"moods\"\nbatch_size = 64\n\
         cursor = \"at\"\ncursor_overlap = \"0s\"\n",
    );

    // A range of the key is read through the key's index.
    let shape = syncfleet_db::StreamShape::describe(&env.source, &config.streams[0])
        .await
        .unwrap();
    let range = KeyRange {
        lower: Some(vec!["ok".into(), "050".into()]),
        upper: Some(vec!["ok".into(), "060".into()]),
    };
    let predicate = RangePredicate::new(&shape, "d", &range, Binding::Params { first: 1 });
    env.source
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = env
        .source
        .query(
            &format!("EXPLAIN SELECT * FROM moods AS d WHERE {}", predicate.sql),
            &bind(&predicate.params),
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    env.source
        .batch_execute("RESET enable_seqscan")
        .await
        .unwrap();
    assert!(
        plan.iter().any(|l| l.contains("Index Cond")),
        "{}: {plan:#?}",
        predicate.sql
    );

    let all = "SELECT * FROM moods";
    env.sync(&config, 1).await;
    env.assert_same_rows(all).await;

    env.source
        .batch_execute(
            "UPDATE moods SET v = 'changed' WHERE n % 3 = 0;
             DELETE FROM moods WHERE n = 5 OR (m::mood = 'ok' AND n > 90);",
        )
        .await
        .unwrap();
    env.sync(&config, 1).await;
    env.assert_same_rows(all).await;

    let fleet = Fleet::start(&config, 1);
    let producer = Producer::start(&config);
    env.source
        .batch_execute("UPDATE moods SET v = 'by event' WHERE m::mood = 'happy' AND n = 7")
        .await
        .unwrap();
    env.publish_event(
        "moods",
        r#"{"table": "moods", "op": "upsert", "ids": [["happy", "007"]]}"#,
    )
    .await;
    env.eventually("the event's change to arrive", 60, || async {
        TestEnv::rows(
            &env.dest,
            "SELECT v FROM moods WHERE m::mood = 'happy' AND n = 7",
        )
        .await
            == ["(\"by event\")"]
    })
    .await;
    producer.stop().await;

    // The second incremental run starts after the first one's last
    // (cursor, key): a comparison of the key.
    for (n, at) in [(8, "2026-02-01"), (9, "2026-03-01")] {
        env.source
            .execute(
                "UPDATE moods SET v = 'later', at = $2::text::timestamptz WHERE n = $1",
                &[&n, &at],
            )
            .await
            .unwrap();
        let plan = env.plan_incremental(&config).await;
        env.wait(plan.run_id).await;
        env.assert_same_rows(all).await;
    }
    fleet.stop().await;

    let out = env.cli(&env.dir.join("syncfleet.toml"), &["verify"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
