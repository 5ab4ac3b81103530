//! Bad input gets a clear error, exit code 2 (1 for an unreachable
//! server), no password in the output, and nothing published.

use syncfleet_db::{Pool, Role};

use crate::helpers::{TestEnv, amqp_url};

const APP: &str = "CREATE TABLE users (id bigint PRIMARY KEY, email text);
     CREATE TABLE no_pk (id bigint, v text);
     INSERT INTO users VALUES (1, 'a@example.com');
     CREATE TABLE tags (name text COLLATE \"C\" PRIMARY KEY);
     CREATE TABLE words (w text COLLATE \"und-x-icu\" PRIMARY KEY);
     CREATE TYPE level AS ENUM ('low', 'mid', 'high');
     CREATE TABLE levels (l level PRIMARY KEY);
     CREATE TYPE tier AS ENUM ('gold', 'silver');
     CREATE DOMAIN tier_d AS tier;
     CREATE TABLE tiers (t tier_d PRIMARY KEY);
     CREATE TABLE ranks (r level[] PRIMARY KEY);
     CREATE DOMAIN level_d AS level;
     CREATE TABLE dlevels (l level_d PRIMARY KEY);";

/// Destination tables made beforehand, outside `public`.
const DESTINATION: &str = "CREATE SCHEMA pre;
     CREATE TABLE pre.tags_icu (name text COLLATE \"und-x-icu\" PRIMARY KEY);
     CREATE TABLE pre.tags_posix (name text COLLATE \"POSIX\" PRIMARY KEY);
     CREATE TYPE level AS ENUM ('low', 'high');
     ALTER TYPE level ADD VALUE 'mid';
     CREATE TYPE tier AS ENUM ('platinum', 'gold', 'bronze', 'silver');";

struct Case {
    name: &'static str,
    streams: &'static str,
    code: i32,
    /// Every one of these must appear in stderr.
    expect: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown config key",
        streams: "[[stream]]\nname = \"users\"\ntable = \"users\"\nbatch_sise = 10\n",
        code: 2,
        expect: &["unknown field `batch_sise`", "bad.toml"],
    },
    Case {
        name: "key column that does not exist",
        streams: "[[stream]]\nname = \"users\"\ntable = \"users\"\nkey = [\"user_id\"]\n",
        code: 2,
        expect: &["stream 'users'", "key", "column 'user_id' is not among"],
    },
    Case {
        name: "no key and no primary key",
        streams: "[[stream]]\nname = \"nopk\"\ntable = \"no_pk\"\n",
        code: 2,
        expect: &["stream 'nopk'", "key", "has no primary key"],
    },
    Case {
        name: "query stream without key",
        streams: "[[stream]]\nname = \"q\"\nquery = \"SELECT id FROM users\"\n",
        code: 2,
        expect: &["stream[0] ('q').key", "bad.toml"],
    },
    Case {
        name: "table that does not exist",
        streams: "[[stream]]\nname = \"ghost\"\ntable = \"ghosts\"\n",
        code: 2,
        expect: &["stream 'ghost'", "table", "\"ghosts\" does not exist"],
    },
    Case {
        name: "column that does not exist",
        streams: "[[stream]]\nname = \"q\"\nquery = \"SELECT id, nickname FROM users\"\nkey = [\"id\"]\n",
        code: 2,
        expect: &["stream 'q'", "query", "nickname"],
    },
    Case {
        name: "a statement that is not a SELECT",
        streams: "[[stream]]\nname = \"q\"\nquery = \"DELETE FROM users RETURNING id\"\nkey = [\"id\"]\n",
        code: 2,
        expect: &["stream 'q'", "query", "single SELECT"],
    },
    Case {
        name: "two statements",
        streams: "[[stream]]\nname = \"q\"\nquery = \"SELECT id FROM users; DROP TABLE users\"\nkey = [\"id\"]\n",
        code: 2,
        expect: &["stream 'q'", "query", "single SELECT"],
    },
    Case {
        name: "a destination key column in another collation",
        streams: "[[stream]]\nname = \"tags\"\ntable = \"tags\"\ndestination_table = \"pre.tags_icu\"\n",
        code: 2,
        expect: &[
            "stream 'tags'",
            "key column \"name\" sorts by collation c:C in the source but i:und",
            "tags_icu",
        ],
    },
    Case {
        name: "a destination database in another locale",
        streams: "[[stream]]\nname = \"words\"\ntable = \"words\"\n",
        code: 2,
        expect: &[
            "stream 'words'",
            "key column \"w\" sorts by collation i:und in the source but c:",
        ],
    },
    Case {
        name: "a destination enum key whose labels sort in another order",
        streams: "[[stream]]\nname = \"levels\"\ntable = \"levels\"\n",
        code: 2,
        expect: &[
            "stream 'levels'",
            r#"key column "l" is an enum whose labels sort as ["low", "mid", "high"] in the source but ["low", "high", "mid"]"#,
        ],
    },
    Case {
        name: "a domain over an enum whose labels sort in another order",
        streams: "[[stream]]\nname = \"dlevels\"\ntable = \"dlevels\"\n",
        code: 2,
        expect: &["stream 'dlevels'", r#"key column "l" is an enum"#],
    },
    Case {
        name: "an array of an enum whose labels sort in another order",
        streams: "[[stream]]\nname = \"ranks\"\ntable = \"ranks\"\n",
        code: 2,
        expect: &["stream 'ranks'", r#"key column "r" is an enum"#],
    },
    Case {
        name: "an unknown stream on the command line",
        streams: "[[stream]]\nname = \"users\"\ntable = \"users\"\n",
        code: 2,
        expect: &["--stream", "no stream named 'nope'", "configured: users"],
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_is_named_and_publishes_nothing() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.dest.batch_execute(DESTINATION).await.unwrap();
    env.migrate().await;
    for case in CASES {
        let path = env.write("bad.toml", &env.config_text(case.streams));
        let args: &[&str] = if case.name.contains("command line") {
            &["sync", "--stream", "nope"]
        } else {
            &["sync"]
        };
        let out = env.cli(&path, args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(case.code),
            "{}: {stderr}",
            case.name
        );
        for e in case.expect {
            assert!(
                stderr.contains(e),
                "{}: expected {e:?} in: {stderr}",
                case.name
            );
        }
        assert!(!stderr.contains("panicked"), "{}: {stderr}", case.name);
    }
    assert_eq!(env.queue_depth().await, 0, "nothing was published");
    let runs: i64 = env
        .dest
        .query_one("SELECT count(*) FROM syncfleet.runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 0, "no run was recorded");
    let tables: i64 = env
        .dest
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "no destination table was created");

    // Collations that order text alike pass: C in the source, POSIX in
    // the destination.
    let config = env.config(
        "[[stream]]\nname = \"tags\"\ntable = \"tags\"\ndestination_table = \"pre.tags_posix\"\n",
    );
    let source = Pool::connect(Role::Source, &config.source).await.unwrap();
    let dest = Pool::connect(Role::Destination, &config.destination)
        .await
        .unwrap();
    let streams = config.select_streams(&[]).unwrap();
    syncfleet_producer::prepare(&source, &dest, &streams)
        .await
        .unwrap();
    // So does an enum key (under a domain) whose type on the destination
    // has more labels, the source's in the same order among them.
    let config = env.config("[[stream]]\nname = \"tiers\"\ntable = \"tiers\"\n");
    let streams = config.select_streams(&[]).unwrap();
    syncfleet_producer::prepare(&source, &dest, &streams)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_servers_are_named_without_passwords() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let stream = "[[stream]]\nname = \"users\"\ntable = \"users\"\n";
    let good = env.config_text(stream);
    let cases = [
        (
            "source",
            good.replacen(
                &env.source_url,
                // A password holding `/` is masked whole too.
                "postgres://app:hunter2/secret@127.0.0.1:1/app",
                1,
            ),
            "cannot connect to the source database postgres://app:***@127.0.0.1:1/app",
        ),
        (
            "destination",
            good.replacen(
                &env.dest_url,
                "postgres://rep:hunter2secret@127.0.0.1:1/rep",
                1,
            ),
            "cannot connect to the destination database postgres://rep:***@127.0.0.1:1/rep",
        ),
        (
            "broker",
            good.replacen(&amqp_url(), "amqp://mq:hunter2secret@127.0.0.1:1/%2f", 1),
            "cannot connect to the broker at amqp://mq:***@127.0.0.1:1/%2f",
        ),
    ];
    for (what, text, expected) in &cases {
        let path = env.write("down.toml", text);
        for command in [&["sync"][..], &["worker"][..], &["verify"][..]] {
            if *what == "broker" && command == ["verify"] {
                continue; // verify does not use the broker
            }
            let out = env.cli(&path, command).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what} {command:?}: {stderr}");
            assert!(stderr.contains(expected), "{what} {command:?}: {stderr}");
            assert!(
                !stderr.contains("hunter2"),
                "{what} {command:?} leaked: {stderr}"
            );
        }
    }
    // status reads the destination; the broker it cannot ask, it names.
    let path = env.write("down.toml", &cases[2].1);
    let out = env.cli(&path, &["status", "--json"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = v["queues_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot connect to the broker at amqp://mq:***@"),
        "{v}"
    );
    assert!(!stdout.contains("hunter2"), "leaked: {stdout}");
    assert_eq!(env.queue_depth().await, 0);
}

/// A URL its driver cannot read is bad config (exit 2), named by its field
/// (or variable), without its password, before anything connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_its_driver_cannot_read_is_a_config_error() {
    let env = TestEnv::new().await;
    let good = env.config_text("[[stream]]\nname = \"users\"\ntable = \"users\"\n");
    let cases = [
        (
            good.replacen(
                &env.source_url,
                "postgres://app:hunter2@127.0.0.1:notaport/app",
                1,
            ),
            None,
            &["source.url:", "port"][..],
        ),
        (
            good.replacen(&env.dest_url, &format!("{}?sslmode=bogus", env.dest_url), 1),
            None,
            &["destination.url:", "sslmode", "'bogus'"],
        ),
        (
            good.clone(),
            Some((
                "SYNCFLEET_SOURCE_URL",
                "postgres://app:hunter2@127.0.0.1/app?sslmode=verify-full&sslrootcert=/nonexistent.pem",
            )),
            &[
                "source.url (from SYNCFLEET_SOURCE_URL):",
                "/nonexistent.pem",
            ],
        ),
        (
            good.replacen(
                &amqp_url(),
                "amqp://mq:hunter2@127.0.0.1:5672/%2f?heartbeat=abc",
                1,
            ),
            None,
            &["broker.url:", "expected amqp[s]://", "invalid digit"],
        ),
    ];
    for (text, env_var, expected) in &cases {
        let path = env.write("urls.toml", text);
        let mut command = crate::helpers::syncfleet();
        command.arg("--config").arg(&path).arg("sync");
        if let Some((name, value)) = env_var {
            command.env(name, value);
        }
        let out = command.output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{expected:?}: {stderr}");
        for e in *expected {
            assert!(stderr.contains(e), "expected {e:?} in: {stderr}");
        }
        assert!(!stderr.contains("hunter2"), "leaked: {stderr}");
    }
    // A command checks only the URLs it uses: migrate, not the broker's.
    let path = env.write("urls.toml", &cases[3].0);
    let out = env.cli(&path, &["migrate"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A run id that does not exist is bad usage (exit 2), for `sync --resume`
/// and for `status`, in text or JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_run_id_is_a_usage_error() {
    let env = TestEnv::new().await;
    env.source.batch_execute(APP).await.unwrap();
    env.migrate().await;
    let path = env.write(
        "runs.toml",
        &env.config_text("[[stream]]\nname = \"users\"\ntable = \"users\"\n"),
    );
    for command in [
        &["sync", "--resume", "424242"][..],
        &["status", "424242"][..],
        &["status", "--json", "424242"][..],
    ] {
        let out = env.cli(&path, command).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
        assert!(stderr.contains("424242"), "{command:?}: {stderr}");
    }
    assert_eq!(env.queue_depth().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_a_deadline_near_the_consumer_timeout() {
    let env = TestEnv::new().await;
    let path = env.write(
        "long.toml",
        &env.config_text("[[stream]]\nname = \"users\"\ntable = \"users\"\ndeadline = \"20m\"\n"),
    );
    let out = env.cli(&path, &["worker"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stream 'users' deadline") && stderr.contains("consumer_timeout"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unreadable_config_is_a_usage_error() {
    let env = TestEnv::new().await;
    let out = env.cli(&env.dir.join("nope.toml"), &["migrate"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
    let path = env.write("broken.toml", "[source\nurl = 1");
    let out = env.cli(&path, &["migrate"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("broken.toml") && stderr.contains("line 1"),
        "{stderr}"
    );
    let out = env.cli(&path, &["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}
