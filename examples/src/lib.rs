//! Runnable userq programs (`examples/`), the `userq-testclient` process the system tests
//! drive, and those tests (`tests/`). Run an example from the workspace root:
//!
//! ```text
//! cargo run --release --example quickstart
//! cargo run --release --example ping_pong
//! ```
#![deny(missing_docs)]
