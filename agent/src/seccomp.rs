//! The seccomp filters bubblewrap installs on the user's code (`--add-seccomp-fd`), built here with
//! `seccompiler` so no policy file has to ship with the agent.
//!
//! A deny list, not an allow list: the code is an arbitrary shell script using whatever tools the image
//! has, so the filter refuses only what no such script needs and what widens the kernel's attack
//! surface or reaches outside the sandbox:
//!
//! - [`DENIED`] returns `EPERM`: tracing other processes (`ptrace`, `process_vm_*`), mounting and every
//!   other namespace operation (`mount`, the new mount API, `unshare`, `setns`, `pivot_root`, `chroot`),
//!   the kernel keyring, `bpf`, `perf_event_open`, `userfaultfd`, `io_uring`, kernel modules, `kexec`,
//!   swap, reboot, accounting, quotas, the kernel log, raw I/O ports, file handles.
//! - `clone` with any namespace flag returns `EPERM` (a plain `fork` or thread still works).
//! - `clone3` returns `ENOSYS`: its flags sit in memory a filter cannot read, and on `ENOSYS` the C
//!   library falls back to `clone`, which the filter can check.
//! - On x86-64, every x32-ABI system call (number with bit 30 set) returns `ENOSYS`: those numbers
//!   would otherwise reach the same kernel functions past a list of x86-64 numbers.
//!
//! Any other architecture's calls (e.g. 32-bit `int 0x80` on x86-64) kill the process
//! (seccompiler's architecture check). Each program is handed to bubblewrap as raw `struct
//! sock_filter` bytes.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A filter that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler does not support this machine's architecture.
    #[error("no seccomp filter for architecture {arch}")]
    Architecture {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
        /// seccompiler's refusal.
        #[source]
        source: seccompiler::BackendError,
    },
    /// seccompiler refused a rule or the filter (a bug in the lists below).
    #[error("building the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
}

/// System calls the code may not make (`EPERM`), by name (for the README and tests) and number.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

/// The namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// The x32 ABI marks its system call numbers with this bit (x86-64 only).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The filters, each as the bytes of a BPF program for one `--add-seccomp-fd`.
pub fn programs() -> Result<Vec<Vec<u8>>, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|source| {
        SeccompError::Architecture {
            arch: std::env::consts::ARCH,
            source,
        }
    })?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|flag| {
            let flag = u64::from(flag.unsigned_abs());
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|condition| SeccompRule::new(vec![condition]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Build)?;
    denied.insert(libc::SYS_clone, clone_rules);
    let eperm = errno(libc::EPERM);
    let denied = SeccompFilter::new(denied, SeccompAction::Allow, eperm, arch)
        .map_err(SeccompError::Build)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        errno(libc::ENOSYS),
        arch,
    )
    .map_err(SeccompError::Build)?;
    let mut programs = Vec::new();
    for filter in [denied, clone3] {
        let program = BpfProgram::try_from(filter).map_err(SeccompError::Build)?;
        programs.push(bytes(&program));
    }
    if arch == TargetArch::x86_64 {
        programs.push(bytes(&x32_guard()));
    }
    Ok(programs)
}

fn errno(code: libc::c_int) -> SeccompAction {
    SeccompAction::Errno(code.unsigned_abs())
}

/// `ENOSYS` for every x32 system call; everything else passes to the other filters.
fn x32_guard() -> BpfProgram {
    const NR_OFFSET: u32 = 0; // struct seccomp_data: int nr; __u32 arch; ...
    let stmt = |code: u32, k: u32| seccompiler::sock_filter {
        code: u16::try_from(code).unwrap_or_default(),
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| seccompiler::sock_filter {
        code: u16::try_from(code).unwrap_or_default(),
        jt,
        jf,
        k,
    };
    vec![
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, NR_OFFSET),
        jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            X32_SYSCALL_BIT,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS.unsigned_abs(),
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The program as the kernel's `struct sock_filter` array, which is what bubblewrap reads.
fn bytes(program: &[seccompiler::sock_filter]) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for instruction in program {
        out.extend_from_slice(&instruction.code.to_ne_bytes());
        out.push(instruction.jt);
        out.push(instruction.jf);
        out.extend_from_slice(&instruction.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_whole_instructions_ending_in_a_return() {
        let programs = programs().expect("this machine's architecture is supported");
        assert!(programs.len() >= 2);
        for program in &programs {
            assert!(!program.is_empty());
            assert_eq!(program.len() % 8, 0, "sock_filter is 8 bytes");
            let last = u16::from_ne_bytes([program[program.len() - 8], program[program.len() - 7]]);
            assert_eq!(u32::from(last) & 0x07, libc::BPF_RET, "ends in a return");
        }
    }
}
