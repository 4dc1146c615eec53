//! toolgate-proxy: puts a toolgate policy in front of an MCP server.
//!
//! ```text
//! toolgate-proxy (--policy FILE | --operator https://HOST:PORT --token-file PATH
//!                 [--ca-file PEM] [--state-dir DIR])
//!                [--listen 127.0.0.1:8080] [--admin-listen 127.0.0.1:9090]
//!                (--upstream http://HOST:PORT/PATH | [--stdio] -- CMD ARGS...)
//! ```
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    toolgate_proxy::run::main()
}
