//! `taskpods config check FILE | dump [--config FILE] | reference`: the configuration file, checked before
//! an engine is started with it, printed in full, and documented.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config_file::{self, FileConfig};

/// Arguments of `taskpods config`.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigCommand {
    /// Check a configuration file (and the TASKPODS__ overrides in the environment): unknown keys and
    /// wrong values are reported with their path; exit 0 when `taskpods serve --config FILE` would accept it.
    Check {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the complete configuration `taskpods serve` would run with (every key, defaults included),
    /// as a file `config check` accepts.
    Dump {
        /// Start from this file instead of the defaults alone.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the reference of every key with its default (the table in docs/OPERATIONS.md).
    Reference,
}

/// Runs `taskpods config …`.
pub fn run(args: ConfigArgs) -> ExitCode {
    match args.command {
        ConfigCommand::Check { file } => match config_file::load(Some(&file), std::env::vars()) {
            Ok(loaded) => {
                let set = count_keys(&loaded);
                println!("{}: ok ({set} keys set, the rest default)", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        ConfigCommand::Dump { config } => {
            match config_file::load(config.as_deref(), std::env::vars()) {
                Ok(loaded) => {
                    let mut engine = config_file::serve_defaults();
                    loaded.apply(&mut engine);
                    print!("{}", FileConfig::effective(&engine).to_toml());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        ConfigCommand::Reference => {
            print!("{}", config_file::reference());
            ExitCode::SUCCESS
        }
    }
}

fn count_keys(file: &FileConfig) -> usize {
    fn count(value: &toml::Value) -> usize {
        match value {
            toml::Value::Table(t) => t.values().map(count).sum(),
            _ => 1,
        }
    }
    toml::Value::try_from(file).map(|v| count(&v)).unwrap_or(0)
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    let mut text = format!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{text}");
    ExitCode::from(2)
}
