//! `crdgen [DIR]`: writes the CRD YAML files into DIR (`make crds` passes `crds`), or prints
//! them to standard output without an argument.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args_os().nth(1).map(PathBuf::from) {
        Some(dir) => match toolgate_operator::crdgen::write_all(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("crdgen: cannot write {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        None => {
            for (_, content) in toolgate_operator::crdgen::crd_files() {
                print!("---\n{content}");
            }
            ExitCode::SUCCESS
        }
    }
}
