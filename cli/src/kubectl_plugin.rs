//! `kubectl-toolgate`: kubectl finds plugins by name on PATH; this runs the `toolgate`
//! binary installed next to it with the same arguments (`kubectl toolgate approvals`).
#![forbid(unsafe_code)]

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let exe = std::env::current_exe().ok();
    let sibling = exe.as_deref().and_then(|p| p.parent()).map(|d| d.join("toolgate"));
    let program = sibling.filter(|p| p.exists()).unwrap_or_else(|| "toolgate".into());
    match Command::new(&program).args(std::env::args_os().skip(1)).status() {
        Ok(status) => ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("kubectl-toolgate: cannot run {}: {e}", program.display());
            ExitCode::FAILURE
        }
    }
}
