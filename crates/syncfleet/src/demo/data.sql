INSERT INTO users
SELECT i,
       'user' || i || '@example.com',
       (ARRAY['Ada','Grace','Linus','Zoë','José','Søren','Aiko','Chidi','Priya','Ørjan'])[1 + i % 10],
       (ARRAY['Lovelace','Hopper','Torvalds','Ngũgĩ','García','Kierkegaard','Tanaka','Okafor','Patel','Ødegård'])[1 + (i / 10) % 10],
       (ARRAY['student','student','student','instructor','admin']::user_role[])[1 + i % 5],
       timestamptz '2024-01-01 00:00:00+00' + i * interval '37 minutes',
       CASE WHEN i % 7 = 0 THEN NULL ELSE timestamptz '2025-06-01 12:00:00+00' + i * interval '11 minutes' END
FROM generate_series(1, $1) AS i;

INSERT INTO user_profiles
SELECT i, i,
       CASE WHEN i % 5 = 0 THEN NULL ELSE 'Learner #' || i || ' — likes ' || (ARRAY['SQL','Rust','maths','design'])[1 + i % 4] || ' ✨' END,
       (ARRAY['UTC','Europe/Berlin','Asia/Tokyo','America/New_York'])[1 + i % 4],
       ARRAY[(ARRAY['sql','rust','math','art'])[1 + i % 4], (ARRAY['music','chess','go'])[1 + i % 3]],
       jsonb_build_object('theme', CASE WHEN i % 2 = 0 THEN 'dark' ELSE 'light' END, 'notifications', i % 3 <> 0, 'level', i % 10),
       timestamptz '2025-01-01 00:00:00+00' + i * interval '1 minute'
FROM generate_series(1, $1) AS i;

INSERT INTO quiz_responses
SELECT md5('quiz' || i)::uuid,
       1 + i % $1,
       1 + i % 40,
       (1 + i % 20)::smallint,
       jsonb_build_object('choice', (ARRAY['a','b','c','d'])[1 + i % 4], 'seconds', i % 90),
       CASE WHEN i % 11 = 0 THEN NULL ELSE round(((i * 7919) % 10001) / 100.0, 2) END,
       i % 3 = 0,
       timestamptz '2025-03-01 08:00:00+00' + i * interval '13 seconds'
FROM generate_series(1, $1 * 3) AS i;

INSERT INTO engagement_logs
SELECT i,
       1 + i % $1,
       (ARRAY['login','logout','view_lesson','submit_quiz','open_chat'])[1 + i % 5],
       (i % 3600) * interval '1 second',
       CASE WHEN i % 4 = 0 THEN NULL ELSE jsonb_build_object('page', '/lesson/' || (i % 200), 'ua', 'Mozilla/5.0') END,
       timestamptz '2025-02-01 00:00:00+00' + i * interval '7 seconds'
FROM generate_series(1, $1 * 5) AS i;

INSERT INTO chat_logs
SELECT 1 + i / 8,
       i % 8,
       1 + i % $1,
       CASE WHEN i % 2 = 0 THEN 'user' ELSE 'assistant' END,
       (ARRAY['Hello! 👋', 'Comment ça va ?', '你好，今天学什么？', 'Can you explain JOINs?', 'Sure — a JOIN combines rows…', 'Привет', E'line one\nline two\ttabbed', 'back\\slash and "quotes"'])[1 + i % 8],
       timestamptz '2025-04-01 00:00:00+00' + i * interval '5 seconds'
FROM generate_series(0, $1 * 4 - 1) AS i;

INSERT INTO course_progress
SELECT u, c,
       ((u * 31 + c * 17) % 1000) / 10.0,
       ARRAY(SELECT generate_series(1, 1 + (u + c) % 6)),
       date '2024-09-01' + (u % 120),
       CASE WHEN u % 9 = 0 THEN NULL ELSE timestamp '2025-05-01 10:00:00' + u * interval '3 minutes' END
FROM generate_series(1, $1) AS u, generate_series(1, 2) AS c;

ANALYZE;
