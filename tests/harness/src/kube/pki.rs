//! Certificates and keys for the test control plane, made with the `openssl` command line tool.
//!
//! Layout of the `pki/` directory this writes:
//! - `ca.crt`/`ca.key`: a throw-away CA that signs everything below and that the API server trusts for
//!   client certificates.
//! - `apiserver.crt`/`.key`: the serving certificate, valid for `127.0.0.1`, `localhost` and the in-cluster
//!   names, so clients verify TLS for real instead of skipping verification.
//! - `admin.crt`/`.key`: a client certificate in `system:masters` (the test's superuser).
//! - `controller-manager.crt`/`.key`: the `system:kube-controller-manager` identity, which RBAC's bootstrap
//!   policy grants exactly what the controller manager needs, so RBAC is exercised for it too.
//! - `sa.key`/`sa.pub`: the service-account token signing key pair.
//!
//! The CLI is used (rather than a Rust crate) because it is already on every machine image here and keeps
//! the harness's dependency tree, and so the CI build, small. Elliptic-curve keys keep generation fast.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Error, Result};

/// Paths of the generated material.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (PEM).
    pub ca_crt: PathBuf,
    /// CA private key.
    pub ca_key: PathBuf,
    /// API server serving certificate.
    pub apiserver_crt: PathBuf,
    /// API server serving key.
    pub apiserver_key: PathBuf,
    /// Admin client certificate (`system:masters`).
    pub admin_crt: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// Controller manager client certificate.
    pub controller_manager_crt: PathBuf,
    /// Controller manager client key.
    pub controller_manager_key: PathBuf,
    /// Service-account signing key (private).
    pub sa_key: PathBuf,
    /// Service-account verification key (public).
    pub sa_pub: PathBuf,
}

fn openssl(args: &[&str], cwd: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(Error::io(
            "running openssl (is the openssl package installed?)",
        ))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Openssl {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Serial numbers must differ between certificates of one CA; the nanosecond clock plus a counter is
/// enough for a CA that lives for one test run.
fn serial(n: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("0x{:x}{:04x}", nanos, n)
}

fn leaf(dir: &Path, name: &str, subject: &str, extensions: &str, n: u32) -> Result<()> {
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), extensions)
        .map_err(Error::io(format!("writing {ext_file}")))?;
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
        dir,
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial(n),
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ],
        dir,
    )
}

impl Pki {
    /// Generates everything into `dir` (created if needed).
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3650",
                "-sha256",
                "-subj",
                "/CN=taskpods-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        )?;
        // 10.0.0.1 is the first address of the API server's default service range: the `kubernetes`
        // Service's ClusterIP, which in-cluster clients would dial.
        leaf(
            dir,
            "apiserver",
            "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,\
             DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\n",
            1,
        )?;
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                          extendedKeyUsage=clientAuth\n";
        leaf(
            dir,
            "admin",
            "/O=system:masters/CN=taskpods-test-admin",
            client_ext,
            2,
        )?;
        leaf(
            dir,
            "controller-manager",
            "/CN=system:kube-controller-manager",
            client_ext,
            3,
        )?;
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "sa.key",
            ],
            dir,
        )?;
        openssl(&["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], dir)?;
        Ok(Self {
            ca_crt: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_crt: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_crt: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            controller_manager_crt: dir.join("controller-manager.crt"),
            controller_manager_key: dir.join("controller-manager.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        })
    }
}
