//! toolgate-operator: McpPolicy controller, admission webhook and policy push (work in progress).
#![forbid(unsafe_code)]

fn main() {
    eprintln!("toolgate-operator: not implemented yet");
    std::process::exit(2);
}
