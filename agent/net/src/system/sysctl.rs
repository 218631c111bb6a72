//! [`Sysctl`] through /proc/sys.

use std::path::PathBuf;

use crate::error::{NetError, Result};
use crate::kernel::Sysctl;

/// Kernel parameters of the namespace the process runs in, under `/proc/sys`.
#[derive(Clone, Debug, Default)]
pub struct ProcSysctl;

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

impl Sysctl for ProcSysctl {
    fn read(&self, key: &str) -> Result<String> {
        std::fs::read_to_string(path(key))
            .map(|s| s.trim().to_string())
            .map_err(|source| NetError::Sysctl {
                key: key.to_string(),
                source,
            })
    }

    fn write(&self, key: &str, value: &str) -> Result<()> {
        std::fs::write(path(key), value).map_err(|source| NetError::Sysctl {
            key: key.to_string(),
            source,
        })
    }
}
