//! Errors of the container runtime.

/// Everything that can go wrong driving role containers.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A Docker API call failed.
    #[error("docker {op}: {source}")]
    Docker {
        /// What was being done (e.g. "create geomx.job1.worker-0").
        op: String,
        /// The underlying error.
        #[source]
        source: bollard::errors::Error,
    },
    /// The image a container needs is not present on this host and the job does not let
    /// the agent pull it (`image_pull = "never"`): it has to be built, loaded or pulled
    /// on the host first.
    #[error("image {image} is not present on this host and the job's image_pull is \"never\"")]
    ImageMissing {
        /// The image reference.
        image: String,
    },
    /// Docker's answer about a registry (a pull or a resolve failed there): Docker's
    /// message, classified by [`crate::pull::classify`].
    #[error("docker {op}: {message}")]
    Registry {
        /// What was being done ("pull 10.1.1.253:5000/geomx/test@sha256:...").
        op: String,
        /// Docker's message.
        message: String,
    },
    /// An image cannot be resolved (or pulled) from its registry.
    #[error("image {image} on registry {registry}: {cause} ({message})")]
    ImageUnavailable {
        /// The reference.
        image: String,
        /// Its registry.
        registry: String,
        /// Why, in words.
        cause: crate::pull::PullCause,
        /// Docker's message (bounded).
        message: String,
    },
    /// The registry credentials file cannot be used.
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialsError),
    /// Docker refused the container's configuration (bad command, bad device request ...).
    #[error("docker refused {what}: {message}")]
    Refused {
        /// What was refused.
        what: String,
        /// Docker's message.
        message: String,
    },
    /// A container spec cannot be turned into a container.
    #[error("invalid container spec {job}/{node}: {reason}")]
    InvalidSpec {
        /// Job name.
        job: String,
        /// Node name.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// A bind mount's host path does not exist on this host: Docker would create it as an
    /// empty root-owned directory and the job would train on nothing.
    #[error(
        "bind mount source {path} does not exist on this host (create it, or fix [[mount]].source)"
    )]
    BindSourceMissing {
        /// The host path.
        path: String,
    },
    /// A bind mount's host path leads (through a symlink) where no bind mount may go: the
    /// host's system directories, Docker's or geomx's state, the Docker socket.
    #[error("bind mount source {path} resolves to {real}, which {why}: refused")]
    BindSourceRefused {
        /// The host path as given.
        path: String,
        /// Where it leads.
        real: String,
        /// Why that is refused.
        why: String,
    },
    /// No container of this job and node exists on this host.
    #[error("no container for node {node} of job {job} on this host")]
    NoSuchNode {
        /// Job name.
        job: String,
        /// Node name.
        node: String,
    },
    /// The progress regular expression of a spec does not compile.
    #[error("progress regex {regex:?}: {source}")]
    InvalidRegex {
        /// The expression.
        regex: String,
        /// The compile error.
        #[source]
        source: Box<regex::Error>,
    },
    /// This build has no pause binary for network sandboxes (it was built without a C
    /// compiler or static libc): sandboxes use the job's image and a shell loop instead.
    #[error(
        "this geomx build has no pause binary (no C compiler or static libc when it was built); network sandboxes use a shell loop in the job's image"
    )]
    PauseUnavailable,
    /// An I/O error (binding the heartbeat endpoint, ...).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub(crate) fn docker(op: impl Into<String>, source: bollard::errors::Error) -> Self {
        RuntimeError::Docker {
            op: op.into(),
            source,
        }
    }

    /// Whether retrying the same operation later may succeed (Docker unreachable or
    /// overloaded) as opposed to a definitive refusal (missing image, invalid spec).
    pub fn is_transient(&self) -> bool {
        match self {
            RuntimeError::Docker { source, .. } => match source {
                bollard::errors::Error::DockerResponseServerError { status_code, .. } => {
                    *status_code >= 500
                }
                _ => true,
            },
            RuntimeError::Io { .. } => true,
            _ => false,
        }
    }
}

/// Result alias of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
