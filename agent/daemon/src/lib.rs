//! The pure parts of the geomx agent, as a library beside the `geomx-agent` binary (which
//! uses them through `daemon::convert`), so that the fuzz targets in `tests/fuzz` and their
//! stable replay tests (`tests/fuzz_regressions.rs`) reach exactly the code the agent runs:
//!
//! * [`convert`]: between the wire (`geomx.v1`) and the agent's crates: the desired state
//!   into networks and container specs, the runtime's statuses back into messages;
//! * [`report`]: keeping a `HostReport` under the controller's message limit by leaving out
//!   optional detail, in a fixed order, and saying so in the report.

#![warn(missing_docs)]

pub mod convert;
pub mod report;
