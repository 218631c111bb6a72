//! Running external commands with useful errors.

use std::process::{Command, Output};

use crate::error::{LabError, Result};

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion and returns its output whatever its exit status. Standard
/// input is whatever the caller set (nothing by default).
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().map_err(|source| LabError::Spawn {
        command: describe(cmd),
        source,
    })
}

/// Runs `cmd` and returns its standard output; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `run` for a program and arguments.
pub fn sh<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Result<String> {
    run(Command::new(program).args(args))
}
