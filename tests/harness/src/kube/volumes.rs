//! Volumes of simulated pods: made on the host the way the kubelet makes them, then bind-mounted by
//! bubblewrap at each container's `mountPath`s.
//!
//! Layout of this module:
//! - [`PodVolumes::materialize`]: one host directory per volume of the pod, under a root-only directory
//!   of the node (so no pod reaches another pod's volumes through host paths):
//!   - `emptyDir`: an empty directory, mode 0777 (`sizeLimit` is not enforced);
//!   - `secret`, `configMap`: the object's keys (or the chosen `items`) as files, read from the API;
//!   - `downwardAPI`: the pod's `metadata.*` fields as files;
//!   - `projected`: any of the above plus `serviceAccountToken`, minted through the TokenRequest API for the
//!     pod's ServiceAccount, bound to the pod, with the source's audience and expiry; this is what the
//!     ServiceAccount admission plugin's `kube-api-access-*` volume (token, `kube-root-ca.crt` → `ca.crt`,
//!     namespace) needs.
//!
//!   A missing object that is not `optional` is a [`MountFailure::NotYet`]: the pod stays
//!   `ContainerCreating` and the simulator tries again, as the kubelet's volume manager does, so a Secret
//!   created after its pod is mounted once it exists. Any other volume type is refused
//!   ([`MountFailure::Unsupported`]). File modes follow the kubelet: `items[].mode`, else `defaultMode`,
//!   else 0644; with `fsGroup`, files belong to that group and are group-readable. Secret, configMap,
//!   downwardAPI and projected volumes are always mounted read-only.
//! - [`bwrap_mounts`]: the bubblewrap arguments for one container: the host's root is rebuilt on
//!   bubblewrap's empty root (each top-level entry bound back, devices included), and a directory that
//!   must receive a new mount point is rebuilt the same way on a tmpfs, so no directory is ever created
//!   on the host; then each volume is bound (read-only when asked) at its `mountPath` (`subPath` honoured).
//!   The host stays visible, as a container's network and processes are here: the point is the files the
//!   pod's processes see at their mount paths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount,
};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Why a pod's volumes could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MountFailure {
    /// Something the volume needs is not there yet (a Secret, a ConfigMap, the ServiceAccount); the
    /// kubelet keeps trying, and so does the simulator. The text is the kubelet's `FailedMount` message.
    NotYet(String),
    /// The pod asks for something the simulator cannot provide (a volume type, an invalid path).
    Unsupported(String),
}

impl std::fmt::Display for MountFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MountFailure::NotYet(m) | MountFailure::Unsupported(m) => f.write_str(m),
        }
    }
}

/// One materialized volume.
#[derive(Debug, Clone)]
struct HostVolume {
    dir: PathBuf,
    /// Secret, configMap, downwardAPI and projected volumes: read-only whatever the mount says.
    always_read_only: bool,
}

/// The host directories of one pod's volumes, by volume name.
#[derive(Debug, Default)]
pub(crate) struct PodVolumes {
    volumes: HashMap<String, HostVolume>,
}

/// Who owns a volume's files: the pod's `fsGroup`, when the simulator may change ownership (as root).
#[derive(Debug, Clone, Copy)]
struct Ownership {
    fs_group: Option<u32>,
}

impl Ownership {
    fn apply(&self, path: &Path, mode: u32, dir: bool) -> std::io::Result<()> {
        let mut mode = mode;
        if let Some(gid) = self.fs_group {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            // The kubelet's SetVolumeOwnership: group-readable, directories group-searchable + setgid.
            mode |= if dir { 0o2550 } else { 0o440 };
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }
}

/// Whether this process may change file ownership (runs as root, as in CI).
pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of this process: a dependency-free "am I root?".
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn io_failure(what: &str, path: &Path, e: std::io::Error) -> MountFailure {
    MountFailure::Unsupported(format!("{what} {}: {e}", path.display()))
}

/// A relative file path of a volume item: no absolute path, no `..`, as the API server validates.
fn item_path(dir: &Path, relative: &str) -> Result<PathBuf, MountFailure> {
    let path = Path::new(relative);
    let clean =
        !relative.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if clean {
        Ok(dir.join(path))
    } else {
        Err(MountFailure::Unsupported(format!(
            "volume item path {relative:?} must be relative without '..'"
        )))
    }
}

fn write_item(
    dir: &Path,
    relative: &str,
    bytes: &[u8],
    mode: u32,
    owner: Ownership,
) -> Result<(), MountFailure> {
    let path = item_path(dir, relative)?;
    if let Some(parent) = path.parent()
        && parent != dir
    {
        std::fs::create_dir_all(parent).map_err(|e| io_failure("creating", parent, e))?;
        owner
            .apply(parent, 0o755, true)
            .map_err(|e| io_failure("setting ownership of", parent, e))?;
    }
    std::fs::write(&path, bytes).map_err(|e| io_failure("writing", &path, e))?;
    owner
        .apply(&path, mode, false)
        .map_err(|e| io_failure("setting ownership of", &path, e))
}

/// Writes `data` (key → bytes) as files: every key, or only `items` (a listed key that is missing is an
/// error unless the source is optional, as the kubelet has it).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    owner: Ownership,
    what: &str,
) -> Result<(), MountFailure> {
    match items {
        None => {
            for (key, bytes) in data {
                write_item(dir, key, bytes, default_mode, owner)?;
            }
        }
        Some(items) => {
            for item in items {
                let Some(bytes) = data.get(&item.key) else {
                    return Err(MountFailure::NotYet(format!(
                        "{what}: configured key {:?} not found",
                        item.key
                    )));
                };
                let mode = item.mode.map_or(default_mode, |m| m as u32);
                write_item(dir, &item.path, bytes, mode, owner)?;
            }
        }
    }
    Ok(())
}

/// A downward API file's content: `metadata.{name,namespace,uid}`, `metadata.labels`/`annotations`
/// (`key="value"` lines, as the kubelet writes them) or one label or annotation.
fn downward_value(pod: &Pod, file: &DownwardAPIVolumeFile) -> Result<String, MountFailure> {
    let Some(field) = &file.field_ref else {
        return Err(MountFailure::Unsupported(format!(
            "downward API file {:?}: only fieldRef is supported",
            file.path
        )));
    };
    let meta = &pod.metadata;
    let lines = |map: Option<&BTreeMap<String, String>>| {
        map.into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={}", serde_json::Value::String(v.clone())))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let indexed = |prefix: &str, map: Option<&BTreeMap<String, String>>| {
        field
            .field_path
            .strip_prefix(prefix)
            .and_then(|k| k.strip_suffix("']"))
            .map(|k| map.and_then(|m| m.get(k)).cloned().unwrap_or_default())
    };
    Ok(match field.field_path.as_str() {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => lines(meta.labels.as_ref()),
        "metadata.annotations" => lines(meta.annotations.as_ref()),
        path => indexed("metadata.labels['", meta.labels.as_ref())
            .or_else(|| indexed("metadata.annotations['", meta.annotations.as_ref()))
            .ok_or_else(|| {
                MountFailure::Unsupported(format!("downward API field {path:?} is not supported"))
            })?,
    })
}

/// Reads an object, telling "not there (yet)" apart: `Ok(None)`.
async fn read<K>(api: &Api<K>, name: &str) -> Result<Option<K>, MountFailure>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| MountFailure::NotYet(format!("reading {name:?}: {e}")))
}

fn secret_data(secret: Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in secret.string_data.unwrap_or_default() {
        data.insert(k, v.into_bytes());
    }
    data
}

fn config_map_data(cm: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.unwrap_or_default() {
        data.insert(k, v.0);
    }
    data
}

impl PodVolumes {
    /// Makes every volume of `pod` under `root` (a fresh directory per attempt, mode 0700: only the
    /// simulator, which binds them, reaches them through the host). See the module docs.
    pub(crate) async fn materialize(
        client: &Client,
        pod: &Pod,
        root: &Path,
    ) -> Result<Self, MountFailure> {
        let ns = pod.namespace().unwrap_or_else(|| "default".into());
        let spec = pod.spec.clone().unwrap_or_default();
        let owner = Ownership {
            fs_group: spec
                .security_context
                .as_ref()
                .and_then(|s| s.fs_group)
                .filter(|_| is_root())
                .and_then(|g| u32::try_from(g).ok()),
        };
        if root.exists() {
            std::fs::remove_dir_all(root).map_err(|e| io_failure("clearing", root, e))?;
        }
        std::fs::create_dir_all(root).map_err(|e| io_failure("creating", root, e))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_failure("restricting", root, e))?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
        let mut volumes = HashMap::new();
        for volume in spec.volumes.iter().flatten() {
            let dir = root.join(&volume.name);
            std::fs::create_dir_all(&dir).map_err(|e| io_failure("creating", &dir, e))?;
            let mut always_read_only = true;
            let mut default_dir_mode = 0o755;
            if let Some(_empty) = &volume.empty_dir {
                always_read_only = false;
                default_dir_mode = 0o777;
            } else if let Some(source) = &volume.secret {
                let name = source.secret_name.clone().unwrap_or_default();
                let mode = source.default_mode.map_or(0o644, |m| m as u32);
                match read(&secrets, &name).await? {
                    Some(secret) => write_keys(
                        &dir,
                        &secret_data(secret),
                        source.items.as_ref(),
                        mode,
                        owner,
                        &format!("secret {name:?}"),
                    )?,
                    None if source.optional == Some(true) => {}
                    None => {
                        return Err(MountFailure::NotYet(format!(
                            "MountVolume.SetUp failed for volume {:?} : secret {name:?} not found",
                            volume.name
                        )));
                    }
                }
            } else if let Some(source) = &volume.config_map {
                let name = source.name.clone();
                let mode = source.default_mode.map_or(0o644, |m| m as u32);
                match read(&config_maps, &name).await? {
                    Some(cm) => write_keys(
                        &dir,
                        &config_map_data(cm),
                        source.items.as_ref(),
                        mode,
                        owner,
                        &format!("configmap {name:?}"),
                    )?,
                    None if source.optional == Some(true) => {}
                    None => {
                        return Err(MountFailure::NotYet(format!(
                            "MountVolume.SetUp failed for volume {:?} : configmap {name:?} not found",
                            volume.name
                        )));
                    }
                }
            } else if let Some(source) = &volume.downward_api {
                let mode = source.default_mode.map_or(0o644, |m| m as u32);
                for file in source.items.iter().flatten() {
                    let value = downward_value(pod, file)?;
                    let mode = file.mode.map_or(mode, |m| m as u32);
                    write_item(&dir, &file.path, value.as_bytes(), mode, owner)?;
                }
            } else if let Some(projected) = &volume.projected {
                let mode = projected.default_mode.map_or(0o644, |m| m as u32);
                for source in projected.sources.iter().flatten() {
                    if let Some(s) = &source.secret {
                        match read(&secrets, &s.name).await? {
                            Some(secret) => write_keys(
                                &dir,
                                &secret_data(secret),
                                s.items.as_ref(),
                                mode,
                                owner,
                                &format!("secret {:?}", s.name),
                            )?,
                            None if s.optional == Some(true) => {}
                            None => {
                                return Err(MountFailure::NotYet(format!(
                                    "MountVolume.SetUp failed for volume {:?} : secret {:?} not found",
                                    volume.name, s.name
                                )));
                            }
                        }
                    }
                    if let Some(c) = &source.config_map {
                        match read(&config_maps, &c.name).await? {
                            Some(cm) => write_keys(
                                &dir,
                                &config_map_data(cm),
                                c.items.as_ref(),
                                mode,
                                owner,
                                &format!("configmap {:?}", c.name),
                            )?,
                            None if c.optional == Some(true) => {}
                            None => {
                                return Err(MountFailure::NotYet(format!(
                                    "MountVolume.SetUp failed for volume {:?} : configmap {:?} not found",
                                    volume.name, c.name
                                )));
                            }
                        }
                    }
                    if let Some(d) = &source.downward_api {
                        for file in d.items.iter().flatten() {
                            let value = downward_value(pod, file)?;
                            let mode = file.mode.map_or(mode, |m| m as u32);
                            write_item(&dir, &file.path, value.as_bytes(), mode, owner)?;
                        }
                    }
                    if let Some(t) = &source.service_account_token {
                        let token = service_account_token(
                            client,
                            pod,
                            &ns,
                            t.audience.as_deref(),
                            t.expiration_seconds,
                        )
                        .await?;
                        write_item(&dir, &t.path, token.as_bytes(), mode, owner)?;
                    }
                    if source.cluster_trust_bundle.is_some() || source.pod_certificate.is_some() {
                        return Err(MountFailure::Unsupported(format!(
                            "volume {:?}: only secret, configMap, downwardAPI and serviceAccountToken \
                             projections are simulated",
                            volume.name
                        )));
                    }
                }
            } else {
                return Err(MountFailure::Unsupported(format!(
                    "volume {:?}: the node simulator supports emptyDir, secret, configMap, downwardAPI and \
                     projected volumes only",
                    volume.name
                )));
            }
            owner
                .apply(&dir, default_dir_mode, true)
                .map_err(|e| io_failure("setting ownership of", &dir, e))?;
            volumes.insert(
                volume.name.clone(),
                HostVolume {
                    dir,
                    always_read_only,
                },
            );
        }
        Ok(Self { volumes })
    }

    /// The (mountPath, host source, read-only) triples of `container`'s volume mounts.
    pub(crate) fn mounts_of(
        &self,
        container: &Container,
    ) -> Result<Vec<(PathBuf, PathBuf, bool)>, MountFailure> {
        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let Some(volume) = self.volumes.get(&m.name) else {
                return Err(MountFailure::Unsupported(format!(
                    "container {:?} mounts volume {:?}, which the pod does not have",
                    container.name, m.name
                )));
            };
            let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sub) => {
                    let path = item_path(&volume.dir, sub)?;
                    if !path.exists() {
                        std::fs::create_dir_all(&path)
                            .map_err(|e| io_failure("creating", &path, e))?;
                    }
                    path
                }
                None => volume.dir.clone(),
            };
            let read_only = volume.always_read_only || m.read_only == Some(true);
            mounts.push((PathBuf::from(&m.mount_path), source, read_only));
        }
        Ok(mounts)
    }
}

/// A token for the pod's ServiceAccount through the TokenRequest API, bound to the pod (it stops being
/// valid when the pod is deleted), as the kubelet requests it.
async fn service_account_token(
    client: &Client,
    pod: &Pod,
    ns: &str,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> Result<String, MountFailure> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            // Empty: the API server's own audiences, which in-cluster clients present.
            "audiences": audience.filter(|a| !a.is_empty()).map(|a| vec![a]).unwrap_or_default(),
            "expirationSeconds": expiration_seconds.unwrap_or(3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(),
                               "uid": pod.uid().unwrap_or_default()},
        }
    }))
    .map_err(|e| MountFailure::Unsupported(format!("token request: {e}")))?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let issued = accounts
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            MountFailure::NotYet(format!(
                "MountVolume.SetUp failed: failed to fetch token for serviceaccount {account:?}: {e}"
            ))
        })?;
    issued
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| MountFailure::NotYet(format!("no token issued for {account:?}")))
}

/// `path` with `.` and `..` resolved lexically; `None` when it is not absolute or climbs above `/`.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    path.is_absolute().then_some(out)
}

/// Arguments that rebuild host directory `dir` inside the sandbox: (a tmpfs unless it is the root, which
/// bubblewrap starts empty) then each entry bound back from the host, symlinks recreated.
fn rebuild(dir: &Path, args: &mut Vec<OsString>) {
    if dir != Path::new("/") {
        args.extend(["--perms".into(), "0755".into(), "--tmpfs".into()]);
        args.push(dir.into());
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for entry in entries {
        match std::fs::read_link(&entry) {
            Ok(target) => {
                args.push("--symlink".into());
                args.push(target.into());
                args.push(entry.into());
            }
            Err(_) => {
                args.push("--dev-bind".into());
                args.push(entry.clone().into());
                args.push(entry.into());
            }
        }
    }
}

/// The bubblewrap arguments (before `--`) that show the host with `mounts` (mountPath, host source,
/// read-only) bound on top; see the module docs. Mount paths must be absolute.
pub(crate) fn bwrap_mounts(
    mounts: &[(PathBuf, PathBuf, bool)],
) -> Result<Vec<OsString>, MountFailure> {
    let mut sorted: Vec<(PathBuf, &PathBuf, bool)> = Vec::new();
    for (dest, source, read_only) in mounts {
        let dest = normalize(dest).ok_or_else(|| {
            MountFailure::Unsupported(format!("mountPath {} must be absolute", dest.display()))
        })?;
        sorted.push((dest, source, *read_only));
    }
    sorted.sort_by_key(|(dest, ..)| (dest.components().count(), dest.clone()));
    // Directories to rebuild (so new mount points are made on a tmpfs, never on the host), and the
    // directories to create on them first with searchable permissions (bubblewrap makes missing parents
    // 0700, which a non-root container could not traverse).
    let mut rebuilt: BTreeSet<PathBuf> = BTreeSet::from([PathBuf::from("/")]);
    let mut new_dirs: Vec<PathBuf> = Vec::new();
    let mut binds: Vec<(PathBuf, &PathBuf, bool)> = Vec::new();
    for (dest, source, read_only) in sorted {
        let inside_earlier = binds
            .iter()
            .any(|(earlier, ..)| dest.starts_with(earlier) && dest != *earlier);
        if inside_earlier {
            // Made inside an earlier volume's directory, as the runtime would.
            binds.push((dest, source, read_only));
            continue;
        }
        let mut existing = dest.clone();
        let mut missing = Vec::new();
        while !existing.exists() {
            if let Some(name) = existing.file_name() {
                missing.push(name.to_owned());
            }
            if !existing.pop() {
                break;
            }
        }
        // Symlinks on the way (e.g. /var/run → /run) are resolved as the host has them: bubblewrap
        // resolves them outside the sandbox.
        let real = existing
            .canonicalize()
            .map_err(|e| io_failure("resolving", &existing, e))?;
        let mut real_dest = real.clone();
        if !missing.is_empty() {
            rebuilt.insert(real.clone());
            for name in missing.iter().rev().take(missing.len() - 1) {
                real_dest.push(name);
                new_dirs.push(real_dest.clone());
            }
            if let Some(last) = missing.first() {
                real_dest.push(last);
            }
        }
        binds.push((real_dest, source, read_only));
    }
    let mut args = Vec::new();
    let mut order: Vec<&PathBuf> = rebuilt.iter().collect();
    order.sort_by_key(|d| d.components().count());
    for dir in order {
        rebuild(dir, &mut args);
    }
    for dir in new_dirs {
        args.extend(["--perms".into(), "0755".into(), "--dir".into()]);
        args.push(dir.into());
    }
    for (dest, source, read_only) in binds {
        args.push(if read_only { "--ro-bind" } else { "--bind" }.into());
        args.push(source.clone().into());
        args.push(dest.into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_paths_stay_inside_the_volume() {
        let dir = Path::new("/v");
        assert_eq!(item_path(dir, "a/b").unwrap(), Path::new("/v/a/b"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x"] {
            assert!(item_path(dir, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_points_are_made_on_a_tmpfs_not_on_the_host() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let source = tmp.path().join("v");
        let missing = tmp.path().join("no/such/dir");
        let args = bwrap_mounts(&[
            (missing.clone(), source.clone(), true),
            (other.path().to_path_buf(), source.clone(), false),
        ])
        .unwrap();
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = text.join(" ");
        let real = tmp.path().canonicalize().unwrap();
        // The existing parent is rebuilt on a tmpfs, the missing parents made there 0755.
        assert!(
            joined.contains(&format!("--perms 0755 --tmpfs {}", real.display())),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("--perms 0755 --dir {}/no/such", real.display())),
            "{joined}"
        );
        assert!(
            joined.contains(&format!(
                "--ro-bind {} {}/no/such/dir",
                source.display(),
                real.display()
            )),
            "{joined}"
        );
        let other = other.path().canonicalize().unwrap();
        assert!(joined.contains(&format!("--bind {} {}", source.display(), other.display())));
        assert!(!missing.exists(), "nothing is created on the host");
        assert!(bwrap_mounts(&[(PathBuf::from("rel"), source, false)]).is_err());
    }
}
