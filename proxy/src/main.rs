//! toolgate-proxy: the sidecar / standalone MCP proxy (work in progress).
#![forbid(unsafe_code)]

fn main() {
    eprintln!("toolgate-proxy: not implemented yet");
    std::process::exit(2);
}
