-- The seed app's tables, with realistic columns and every kind of value a
-- sync must carry: enums, domains, arrays, jsonb, numeric, intervals, uuid
-- keys, composite keys, NULLs and non-ASCII text. $1 is the user count.
CREATE TYPE user_role AS ENUM ('student', 'instructor', 'admin');
CREATE DOMAIN email_address AS text CHECK (VALUE LIKE '%_@_%');

CREATE TABLE users (
    id            bigint PRIMARY KEY,
    email         email_address NOT NULL UNIQUE,
    first_name    text NOT NULL,
    last_name     text NOT NULL,
    role          user_role NOT NULL,
    created_at    timestamptz NOT NULL,
    last_login_at timestamptz
);
CREATE TABLE user_profiles (
    id         bigint PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id),
    bio        text,
    timezone   text NOT NULL,
    interests  text[] NOT NULL,
    settings   jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE quiz_responses (
    id          uuid PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    quiz_id     integer NOT NULL,
    question_no smallint NOT NULL,
    answer      jsonb NOT NULL,
    score       numeric(5, 2),
    correct     boolean NOT NULL,
    answered_at timestamptz NOT NULL
);
CREATE TABLE engagement_logs (
    id          bigint PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    event       text NOT NULL,
    duration    interval NOT NULL,
    metadata    jsonb,
    occurred_at timestamptz NOT NULL
);
CREATE TABLE chat_logs (
    conversation_id bigint NOT NULL,
    message_no      integer NOT NULL,
    user_id         bigint NOT NULL REFERENCES users (id),
    sender          text NOT NULL,
    content         text NOT NULL,
    sent_at         timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, message_no)
);
CREATE TABLE course_progress (
    user_id           bigint NOT NULL REFERENCES users (id),
    course_id         integer NOT NULL,
    percent_complete  real NOT NULL,
    completed_lessons integer[] NOT NULL,
    started_on        date NOT NULL,
    last_activity     timestamp,
    PRIMARY KEY (user_id, course_id)
);
