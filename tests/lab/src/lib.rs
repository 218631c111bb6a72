//! geomx-lab: several hosts on one machine, for geomx's integration tests and for trying
//! geomx by hand.
//!
//! A [`Lab`] is a set of network namespaces — one per host, each with `eth0` on an underlay
//! bridge that lives in a namespace of its own — and one dockerd per host. Nothing touches
//! the machine's own routes, iptables or docker0.
//!
//! ```no_run
//! use geomx_lab::{Lab, LabSpec};
//! let lab = Lab::up(LabSpec::for_test().seed_hosts())?;
//! let a = lab.host("a")?;
//! a.run(&["ip", "route"])?;
//! # Ok::<(), geomx_lab::LabError>(())
//! ```

#![warn(missing_docs)]

pub mod cluster;
pub mod cmd;
pub mod delayline;
mod dockerd;
mod error;
pub mod images;
pub mod jobfile;
mod lab;
pub mod machine;
pub mod measure;
mod mountns;
mod netns;
pub mod nfqueue;
mod process;
pub mod registry;
mod rootfs;
pub mod topology;
pub mod wan;

pub use cluster::{
    Binaries, CONTROLLER_PORT, Cluster, ClusterSpec, GEOMX_IMAGE, LAB_TOKEN_FILE, LAB_TOKEN_NAME,
    MXNET_IMAGE, Packages, seed_subnet,
};
pub use dockerd::Dockerd;
pub use error::{LabError, Result};
pub use images::{PSNODE_IMAGE, build_psnode_image, find_psnode_binary};
pub use lab::{
    DEFAULT_ROOT, HostSpec, Lab, LabHost, LabSpec, OUTSIDE_IP, SEED_HOSTS, UNDERLAY_PREFIX,
    lab_binary, sweep_stale,
};
pub use machine::Machine;
pub use netns::{Netns, normalize_iptables_save};
pub use process::{LabProcess, alive, gone};
pub use registry::{
    MXNET_CACHE, REGISTRY_MXNET_IMAGE, REGISTRY_PORT, REGISTRY_TEST_IMAGE, Registry, RegistrySpec,
};
pub use rootfs::{Rootfs, shared_libraries};
pub use topology::{DataCenter, Link, Shape, Topology, TopologyFile, read_topology};
