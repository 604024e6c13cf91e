//! # userq-benches
//!
//! `userq-bench` measures userq against the machine's floors and against peers, in one
//! process tree, one measurement after another, so that the noise of a shared machine
//! cancels out in the ratios. The library holds the measurements; the binary parses flags.
//! `cargo bench -p userq-benches` runs the criterion micro-benchmarks of the host paths.
#![deny(missing_docs)]

pub mod cold;
pub mod device;
pub mod floors;
pub mod observe;
pub mod paging;
pub mod patience;
pub mod peers;
pub mod plot;
pub mod proc;
pub mod report;
pub mod resets;
pub mod round_trip;
pub mod rounds;
pub mod sched;
pub mod stats;
pub mod submit;
