/**
 * The default seccomp filter of flotilla's containers (OCI `linux.seccomp`, applied by runc).
 *
 * Docker's default profile is an allow-list of ~350 system calls. This one is a deny-list with the
 * same aim: everything a normal program uses works, and the calls that reach kernel state shared with
 * the host, or that have been the way out of containers, fail with EPERM. Namespaces first: without it
 * a root process in a container without CAP_SYS_ADMIN can still `unshare(CLONE_NEWUSER)` and regain
 * every capability inside a user namespace, the first step of many escapes. Several of the calls below
 * already need a capability the default set does not grant (the filter is the second lock); others
 * (keyrings, bpf, userfaultfd, io_uring, perf, clone3) need none.
 */

/** What the filter refuses, and why: documentation and the test's checklist. */
export const DENIED_SYSCALLS: Record<string, string[]> = {
  'namespaces (user namespaces give back every capability)': ['unshare', 'setns'],
  'kernel modules and kexec': ['init_module', 'finit_module', 'delete_module', 'create_module', 'kexec_load', 'kexec_file_load'],
  'kernel keyrings (not namespaced)': ['add_key', 'request_key', 'keyctl'],
  'mounts, including the new mount API': ['mount', 'umount', 'umount2', 'pivot_root', 'fsopen', 'fsconfig', 'fsmount', 'fspick', 'move_mount', 'open_tree', 'mount_setattr'],
  'file handles (the "shocker" escape)': ['open_by_handle_at', 'name_to_handle_at'],
  'tracing and profiling the kernel': ['bpf', 'perf_event_open', 'lookup_dcookie', 'kcmp'],
  'page-fault handling from user space (used to win kernel races)': ['userfaultfd'],
  'io_uring (a large attack surface, off in Docker since 2023)': ['io_uring_setup', 'io_uring_enter', 'io_uring_register'],
  'host clock, swap, accounting, reboot, console, quotas': [
    'settimeofday',
    'clock_settime',
    'clock_adjtime',
    'adjtimex',
    'stime',
    'swapon',
    'swapoff',
    'acct',
    'reboot',
    'syslog',
    'vhangup',
    'quotactl',
    'quotactl_fd',
  ],
  'raw I/O ports and obsolete calls': ['iopl', 'ioperm', 'uselib', 'ustat', 'sysfs', '_sysctl', 'nfsservctl', 'get_kernel_syms', 'query_module'],
  'NUMA placement of other processes': ['move_pages', 'migrate_pages'],
};

/** clone() flags that make a new namespace: clone with any of them is refused like unshare. */
export const NAMESPACE_CLONE_FLAGS: Record<string, number> = {
  CLONE_NEWNS: 0x00020000,
  CLONE_NEWCGROUP: 0x02000000,
  CLONE_NEWUTS: 0x04000000,
  CLONE_NEWIPC: 0x08000000,
  CLONE_NEWUSER: 0x10000000,
  CLONE_NEWPID: 0x20000000,
  CLONE_NEWNET: 0x40000000,
};

const EPERM = 1;
const ENOSYS = 38;

export interface OciSeccomp {
  defaultAction: string;
  architectures: string[];
  syscalls: { names: string[]; action: string; errnoRet?: number; args?: { index: number; value: number; valueTwo?: number; op: string }[] }[];
}

/** The filter for x86-64 hosts (with their 32-bit ABIs): allow everything but the calls above. */
export function defaultSeccomp(): OciSeccomp {
  return {
    defaultAction: 'SCMP_ACT_ALLOW',
    architectures: ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32'],
    syscalls: [
      { names: Object.values(DENIED_SYSCALLS).flat(), action: 'SCMP_ACT_ERRNO', errnoRet: EPERM },
      // clone's flags are its first argument on x86; one rule per flag (rules are OR-ed)
      ...Object.values(NAMESPACE_CLONE_FLAGS).map((flag) => ({
        names: ['clone'],
        action: 'SCMP_ACT_ERRNO',
        errnoRet: EPERM,
        args: [{ index: 0, value: flag, valueTwo: flag, op: 'SCMP_CMP_MASKED_EQ' }],
      })),
      // clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libc fall back to clone
      { names: ['clone3'], action: 'SCMP_ACT_ERRNO', errnoRet: ENOSYS },
    ],
  };
}
