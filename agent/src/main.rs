//! `taskpods-agent`: see the library's documentation for its environment and protocol.

fn main() -> std::process::ExitCode {
    taskpods_agent::main()
}
