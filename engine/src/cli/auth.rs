//! `taskpods auth init DIR`: generate the NATS identities of an installation (operator, taskpods account
//! with JetStream, system account, the admin/engine/brain/operator credentials, the task signer, the
//! seal key) and the nats-server configuration that trusts them.

use std::path::PathBuf;
use std::process::ExitCode;

use taskpods_auth::Material;
use taskpods_auth::material::files;

use crate::cli::Global;

/// Arguments of `taskpods auth`.
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AuthCommand {
    /// Write fresh material into DIR (created, mode 0700; every file 0600).
    Init {
        /// Where to write it.
        dir: PathBuf,
        /// Replace material already in DIR (every existing identity stops working).
        #[arg(long)]
        force: bool,
    },
}

/// Runs `taskpods auth`.
pub fn run(global: &Global, args: AuthArgs) -> ExitCode {
    let AuthCommand::Init { dir, force } = args.command;
    let written = Material::generate().and_then(|m| m.write(&dir, &global.names, force));
    match written {
        Ok(files_written) => {
            for path in &files_written {
                println!("wrote {}", path.display());
            }
            println!(
                "auth init: {} files in {}. Start nats-server with `include {}` in its configuration; \
                 run the engine with --creds {d}/engine.creds --task-signer {d}/{} --seal-key {d}/{}; \
                 Brains use {d}/brain.creds, operators {d}/operator.creds.",
                files_written.len(),
                dir.display(),
                files::SERVER_CONFIG,
                files::TASK_SIGNER,
                files::SEAL_KEY,
                d = dir.display(),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
