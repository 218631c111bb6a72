//! The geomx gRPC API.
//!
//! * [`v1`]: messages and tonic clients/servers generated from `proto/geomx/v1/*.proto`:
//!   `AgentService` (agents → controller), `AgentNodeService` (controller → agent),
//!   `JobService` and `HostService` (users → controller).
//! * [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! * [`tls`]: loading PEM files into tonic TLS configs, the caller's certificate identity,
//!   bearer tokens.
//! * [`credentials`]: user tokens (named, with a role, kept as hashes) and the revocation
//!   list of certificate serials and token names.
//! * [`config_file`]: TOML configuration files with errors at line and column.
//! * [`pki`]: a small CA and the controller and agent certificates (for labs and tests, and
//!   behind `geomxctl certs`).
//! * [`logging`]: the daemons' log: journald with structured fields under systemd, stderr
//!   otherwise.
//! * [`templates`]: what the containers of a desired state share, sent once and expanded
//!   by the agent.
//! * [`exposition`]: a metrics registry in the Prometheus text format.
//! * [`web`]: a small bounded HTTP/HTTPS server for `/metrics` (and later the dashboard).

#![warn(missing_docs)]

/// Generated code of the `geomx.v1` protobuf package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("geomx.v1");
}

pub mod config_file;
pub mod credentials;
pub mod exposition;
pub mod incoming;
pub mod json;
pub mod logging;
pub mod pki;
pub mod pulls;
pub mod templates;
pub mod tls;
pub mod web;

/// An error with its sources, on one line (`a: b: c`); a source whose text the message
/// already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// Encoded `FileDescriptorSet` of the geomx API, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("geomx_descriptor");

/// Largest `DesiredState` an agent decodes (and the controller may send): the agent's
/// gRPC decoding limit and the controller's encoding limit. The controller refuses at
/// submit a job that would bring a host's desired state (its containers shared with
/// [`templates::share`]) past [`MAX_DESIRED_STATE_LEN`] / 2, so what it sends stays well
/// below it.
pub const MAX_DESIRED_STATE_LEN: usize = 16 << 20;
