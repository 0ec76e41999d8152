//! Locating the control plane binaries.
//!
//! `tests/kube-env/build.sh` compiles them from the Go modules pinned in `tests/kube-env/go.mod` into
//! `${TASKPODS_CACHE:-$HOME/.cache/taskpods}/kube-<version>/bin`. The version is read from that same
//! `go.mod` (embedded at compile time), so bumping Kubernetes is a one-file change and the harness can
//! never pick up binaries of another version by accident. `TASKPODS_KUBE_BIN` overrides the directory.

use std::path::{Path, PathBuf};

use super::{Error, Result};

/// The pinned go.mod; the single source of the Kubernetes version.
const GO_MOD: &str = include_str!("../../../kube-env/go.mod");

/// Paths of the three programs a control plane needs.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// `etcd` server.
    pub etcd: PathBuf,
    /// `kube-apiserver`.
    pub apiserver: PathBuf,
    /// `kube-controller-manager`.
    pub controller_manager: PathBuf,
}

/// The `k8s.io/kubernetes` version pinned in `tests/kube-env/go.mod`, e.g. `v1.37.2`.
pub fn kubernetes_version() -> &'static str {
    GO_MOD
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("k8s.io/kubernetes"))
                .then(|| words.next())
                .flatten()
        })
        .next()
        // The go.mod is ours and checked in; a missing line is a build-time bug, caught by the tests.
        .unwrap_or("unknown")
}

impl KubeBinaries {
    /// The cache directory `build.sh` fills, honouring `TASKPODS_KUBE_BIN` and `TASKPODS_CACHE`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("TASKPODS_KUBE_BIN") {
            return PathBuf::from(dir);
        }
        let root = std::env::var_os("TASKPODS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/root"));
                home.join(".cache").join("taskpods")
            });
        root.join(format!("kube-{}", kubernetes_version()))
            .join("bin")
    }

    /// Finds the binaries in [`KubeBinaries::default_dir`].
    pub fn locate() -> Result<Self> {
        Self::in_dir(&Self::default_dir())
    }

    /// Finds the binaries in `dir`, failing with a hint to run `build.sh` if one is missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::BinariesMissing {
                    dir: dir.to_path_buf(),
                    missing: name.to_string(),
                })
            }
        };
        Ok(Self {
            etcd: find("etcd")?,
            apiserver: find("kube-apiserver")?,
            controller_manager: find("kube-controller-manager")?,
        })
    }
}
