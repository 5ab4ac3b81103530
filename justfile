# syncfleet task runner — run `just` to list recipes.

# List available recipes.
default:
    @just --list

# Build every crate in the workspace.
build:
    cargo build --workspace

# Run the end-to-end demo (starts local PostgreSQL/RabbitMQ if needed).
demo *args: _services
    cargo run --release -p syncfleet -- demo {{ args }}

# Run all tests, including integration tests against local services.
test *args: _services
    cargo test --workspace --all-targets {{ args }}

# Chaos: a 300,000-row sync while workers are killed, the broker restarts and
# database backends are terminated; prints lost/duplicated counts (both must be 0).
chaos *args: _services
    cargo build --release -p syncfleet -p syncfleet-chaos
    target/release/syncfleet-chaos {{ args }}

# Benchmarks (release build, about 7 minutes): prints a Markdown report and
# writes it to docs/benchmarks.md.
bench *args: _services
    cargo build --release -p syncfleet -p syncfleet-bench
    target/release/syncfleet-bench {{ args }}

# Check formatting and run clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format all code.
fmt:
    cargo fmt --all

# Run exactly what CI runs: lint, then test.
ci: lint test

# Ensure local PostgreSQL and RabbitMQ are installed and running.
_services:
    bash deploy/local/services.sh
