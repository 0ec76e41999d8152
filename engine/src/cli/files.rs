//! `taskpods artifacts`: list and fetch a task's artifacts; and the `--input` part of `taskpods launch`
//! (putting local files into the files bucket before the launch names them).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use taskpods_client::Client;
use taskpods_client::files::FilesError;
use taskpods_events::TaskId;
use taskpods_events::files::{InputFile, check_relative_path};

use crate::cli::Global;

/// Arguments of `taskpods artifacts`.
#[derive(clap::Args, Debug)]
pub struct ArtifactsArgs {
    /// The task id.
    pub task: TaskId,
    /// Write this artifact (its path under /tmp/out) to standard output.
    #[arg(long, conflicts_with = "all")]
    pub get: Option<String>,
    /// Write every artifact under this directory (created if missing), keeping their paths.
    #[arg(long)]
    pub all: Option<PathBuf>,
    /// Print the list as JSON.
    #[arg(long)]
    pub json: bool,
}

/// An `--input NAME=PATH` of `taskpods launch`: the input's name (its path under /tmp/in) and the
/// local file.
pub fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    let (name, file) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=PATH"))?;
    check_relative_path(name).map_err(|e| format!("input name {name:?} {e}"))?;
    Ok((name.to_owned(), PathBuf::from(file)))
}

/// Puts each local file as an input of `task`, saying so on standard error; returns the launch's inputs.
pub async fn put_inputs(
    client: &Client,
    task: TaskId,
    inputs: &[(String, PathBuf)],
) -> Result<Vec<InputFile>, String> {
    let mut stored = Vec::new();
    for (i, (name, path)) in inputs.iter().enumerate() {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("input {name}: {}: {e}", path.display()))?;
        let input = client
            .put_input(task, name, &mut file)
            .await
            .map_err(|e| format!("input {name}: {e}"))?;
        eprintln!(
            "input {}/{}: {name} ({} bytes, {}) stored as {}",
            i + 1,
            inputs.len(),
            input.size.unwrap_or_default(),
            input.digest.as_deref().unwrap_or("-"),
            input.object
        );
        stored.push(input);
    }
    Ok(stored)
}

fn fail(error: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::FAILURE
}

/// `taskpods artifacts`.
pub async fn run(global: Global, args: ArtifactsArgs) -> ExitCode {
    let client = match crate::cli::task::connect(&global).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Some(path) = &args.get {
        // A duplicate of descriptor 1 as a file: artifacts stream through, however large.
        let stdout = std::os::fd::AsFd::as_fd(&std::io::stdout()).try_clone_to_owned();
        let mut stdout = match stdout {
            Ok(fd) => tokio::fs::File::from_std(std::fs::File::from(fd)),
            Err(e) => return fail(format!("standard output: {e}")),
        };
        return match client.get_artifact(args.task, path, &mut stdout).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(FilesError::NotFound(_)) => fail(format!(
                "task {} has no artifact {path:?} (taskpods artifacts {} lists them)",
                args.task, args.task
            )),
            Err(e) => fail(e),
        };
    }
    let artifacts = match client.artifacts(args.task).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let total: u64 = artifacts.iter().map(|a| a.size).sum();
    if let Some(dir) = &args.all {
        for (i, artifact) in artifacts.iter().enumerate() {
            if let Err(e) = write_one(&client, args.task, dir, &artifact.path).await {
                return fail(e);
            }
            eprintln!(
                "[{}/{}] {} ({} bytes)",
                i + 1,
                artifacts.len(),
                artifact.path,
                artifact.size
            );
        }
        eprintln!(
            "{} artifacts, {total} bytes written to {}",
            artifacts.len(),
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    if args.json {
        match serde_json::to_string(&artifacts) {
            Ok(json) => println!("{json}"),
            Err(e) => return fail(e),
        }
        return ExitCode::SUCCESS;
    }
    for artifact in &artifacts {
        println!(
            "{:>12}  {}  {}",
            artifact.size, artifact.digest, artifact.path
        );
    }
    eprintln!("{} artifacts, {total} bytes", artifacts.len());
    ExitCode::SUCCESS
}

async fn write_one(client: &Client, task: TaskId, dir: &Path, path: &str) -> Result<(), String> {
    // Paths come from the bucket: check them again before they name a local file.
    check_relative_path(path).map_err(|e| format!("artifact path {path:?} {e}"))?;
    let target = dir.join(path);
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let mut file = tokio::fs::File::create(&target)
        .await
        .map_err(|e| format!("{}: {e}", target.display()))?;
    client
        .get_artifact(task, path, &mut file)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}
