//! clone(CLONE_VM | CLONE_VFORK) + execve with everything prepared before the clone (the child
//! shares the memory of a multithreaded process: only plain syscalls, no allocation, no locks).
//! The child reports a failure as (stage, errno) through a close-on-exec pipe; EOF on that pipe
//! means execve succeeded.

use crate::errors::{OpError, strerror};
use crate::users::Cred;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub enum Stdio {
    /// The supervisor's own stdin/stdout/stderr (the main process). Own process group unless
    /// stdin is a terminal (a background group would stop on its first tty read).
    Inherit,
    /// Pipes (stdin may be /dev/null) and its own process group.
    Pipes { stdin: bool },
    /// A new session whose controlling terminal is a fresh PTY of this size.
    Pty { cols: u16, rows: u16 },
}

pub struct Spec {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub cred: Option<Cred>,
    pub stdio: Stdio,
}

/// The parent's ends of a started process's stdio.
pub struct Started {
    pub pid: i32,
    /// Whether kill(-pid) reaches it (it leads its own process group).
    pub own_group: bool,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The PTY master (read = output, write = input, ioctl = resize).
    pub master: Option<File>,
}

const STAGE_EXEC: u8 = 1;
const STAGE_CWD: u8 = 2;
const STAGE_CRED: u8 = 3;
const STAGE_TTY: u8 = 4;

fn cstr(s: &str, what: &str) -> Result<CString, OpError> {
    CString::new(s).map_err(|_| OpError::invalid(format!("{what} contains a NUL byte")))
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), OpError> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(OpError::errno(last_errno(), "pipe", "(exec)"));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Candidate paths for argv[0], as execvp would try them.
fn candidates(argv0: &str, env: &[String]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_owned()];
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|d| {
            if d.is_empty() {
                format!("./{argv0}")
            } else {
                format!("{}/{argv0}", d.trim_end_matches('/'))
            }
        })
        .collect()
}

/// Signals whose disposition the supervisor inherited or set as SIG_IGN (Rust's runtime ignores
/// SIGPIPE; a runtime may hand more), read once: the supervisor installs no handler and changes
/// no disposition after start-up (it takes signals with sigwaitinfo), and execve resets handlers
/// by itself, so these are all a child must put back to SIG_DFL. Read once because inside gVisor
/// (ptrace platform) every syscall traps to the Sentry: resetting all 64 in each child cost
/// ≈ 1.5 ms of a process start there.
pub fn ignored() -> &'static [i32] {
    static IGNORED: OnceLock<Vec<i32>> = OnceLock::new();
    IGNORED.get_or_init(|| {
        (1..65)
            .filter(|&sig| {
                let mut old = KernelSigaction::default();
                // SAFETY: reads the disposition only (no new action) into `old`.
                let read = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        std::ptr::null::<KernelSigaction>(),
                        &mut old,
                        SIGSET_BYTES,
                    )
                };
                read == 0 && old.handler == libc::SIG_IGN
            })
            .collect()
    })
}

/// The kernel's `struct sigaction` (x86_64). Raw rt_sigaction, not glibc's wrapper: that one
/// refuses the signals it reserves (32, 33), which a runtime may still hand us ignored.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

const SIGSET_BYTES: usize = 8;

/// What the child needs, all prepared before the clone (it shares our memory and must not
/// allocate or take a lock).
struct Child<'a> {
    err_w: RawFd,
    pty: bool,
    pty_slave: RawFd,
    inherit: bool,
    own_group: bool,
    child_fds: [RawFd; 3],
    cred: Option<(u32, u32)>,
    groups: &'a [libc::gid_t],
    chdir: bool,
    cwd: &'a CString,
    cands: &'a [CString],
    argv: *const *const libc::c_char,
    env: *const *const libc::c_char,
    ignored: &'a [i32],
}

const CHILD_STACK: usize = 256 * 1024;

/// The child's stack: mapped once (with a guard page below it) and reused, under a lock, so a
/// process start pays neither the mapping nor its page faults (each a trap inside gVisor).
static STACK: Mutex<usize> = Mutex::new(0);

/// clone(CLONE_VM | CLONE_VFORK) running `child_main`, as posix_spawn does: no copy of the
/// supervisor's address space (a fork's copy, and the copy-on-write faults it leaves the
/// supervisor, cost ≈ 2.5 ms per process start inside gVisor, measured), and the calling thread
/// waits until the child has exec'd or exited. Returns the pid, or -1 with errno set.
fn clone_vfork(child: &Child<'_>) -> i32 {
    let mut stack = STACK.lock().unwrap_or_else(|p| p.into_inner());
    if *stack == 0 {
        let page = 4096;
        // SAFETY: a fresh anonymous mapping; its lowest page becomes the guard.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK + page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return -1;
        }
        // SAFETY: the first page of the mapping just made.
        unsafe { libc::mprotect(base, page, libc::PROT_NONE) };
        *stack = base as usize + page + CHILD_STACK;
    }
    // SAFETY: the stack is ours alone while the lock is held, and CLONE_VFORK keeps this frame
    // (which `child` points into) alive until the child no longer uses it.
    unsafe {
        libc::clone(
            child_main,
            *stack as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (child as *const Child<'_>).cast_mut().cast(),
        )
    }
}

/// The child's whole life: set up, then execve or report (stage, errno) and _exit. It shares
/// the supervisor's memory, so it only makes plain syscalls on memory prepared before the
/// clone; credentials go through raw syscalls, because glibc's setuid/setgid/setgroups would
/// signal the supervisor's other threads to change theirs too (its setxid broadcast).
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` of the suspended parent frame (clone_vfork).
    let c = unsafe { &*arg.cast::<Child<'_>>() };
    unsafe {
        let report = |stage: u8, errno: i32| -> ! {
            let mut msg = [0u8; 5];
            msg[0] = stage;
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(c.err_w, msg.as_ptr().cast(), 5);
            libc::_exit(if stage == STAGE_EXEC && errno == libc::EACCES {
                126
            } else {
                127
            });
        };
        let errno = || *libc::__errno_location();
        // Dispositions and the mask the supervisor uses are not the process's.
        let default = KernelSigaction::default(); // SIG_DFL, no flags, empty mask
        for &sig in c.ignored {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default,
                std::ptr::null_mut::<KernelSigaction>(),
                SIGSET_BYTES,
            );
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if c.pty {
            if libc::setsid() < 0 || libc::ioctl(c.pty_slave, libc::TIOCSCTTY, 0) < 0 {
                report(STAGE_TTY, errno());
            }
            for fd in 0..3 {
                libc::dup2(c.pty_slave, fd);
            }
        } else if !c.inherit {
            libc::setpgid(0, 0);
            for (target, fd) in c.child_fds.iter().enumerate() {
                libc::dup2(*fd, target as i32);
            }
        } else if c.own_group {
            libc::setpgid(0, 0);
        }
        if let Some((uid, gid)) = c.cred
            && (libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, gid) < 0
                || libc::syscall(libc::SYS_setuid, uid) < 0)
        {
            report(STAGE_CRED, errno());
        }
        if c.chdir && libc::chdir(c.cwd.as_ptr()) < 0 {
            report(STAGE_CWD, errno());
        }
        let mut saw_eacces = false;
        let mut last = libc::ENOENT;
        for cand in c.cands {
            libc::execve(cand.as_ptr(), c.argv, c.env);
            last = errno();
            match last {
                libc::EACCES => saw_eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => break,
            }
        }
        report(
            STAGE_EXEC,
            if saw_eacces && last != libc::ENOEXEC {
                libc::EACCES
            } else {
                last
            },
        );
    }
}

/// Starts (clone + execve) `spec`; returns once execve succeeded in the child (or with its error).
pub fn spawn(spec: &Spec) -> Result<Started, OpError> {
    let Some(argv0) = spec.argv.first() else {
        return Err(OpError::invalid("field \"argv\" must not be empty"));
    };
    let argv_c: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a, "argv"))
        .collect::<Result<_, _>>()?;
    let env_c: Vec<CString> = spec
        .env
        .iter()
        .map(|e| cstr(e, "env"))
        .collect::<Result<_, _>>()?;
    let cands: Vec<CString> = candidates(argv0, &spec.env)
        .iter()
        .map(|c| cstr(c, "argv"))
        .collect::<Result<_, _>>()?;
    let cwd = cstr(if spec.cwd.is_empty() { "/" } else { &spec.cwd }, "cwd")?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    env_p.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = spec
        .cred
        .as_ref()
        .map(|c| c.groups.clone())
        .unwrap_or_default();

    // Child-side fds and parent-side ends.
    let (mut child_fds, mut started) = (
        [-1 as RawFd; 3],
        Started {
            pid: 0,
            own_group: true,
            stdin: None,
            stdout: None,
            stderr: None,
            master: None,
        },
    );
    let mut keep: Vec<OwnedFd> = Vec::new(); // child ends, closed in the parent after fork
    let mut pty_slave: RawFd = -1;
    match spec.stdio {
        Stdio::Inherit => {
            // SAFETY: isatty only inspects fd 0.
            started.own_group = unsafe { libc::isatty(0) } == 0;
        }
        Stdio::Pipes { stdin } => {
            if stdin {
                let (r, w) = pipe()?;
                child_fds[0] = r.as_raw_fd();
                keep.push(r);
                started.stdin = Some(File::from(w));
            } else {
                let null =
                    File::open("/dev/null").map_err(|e| OpError::io(&e, "open", "/dev/null"))?;
                let fd: OwnedFd = null.into();
                child_fds[0] = fd.as_raw_fd();
                keep.push(fd);
            }
            let (r, w) = pipe()?;
            child_fds[1] = w.as_raw_fd();
            keep.push(w);
            started.stdout = Some(File::from(r));
            let (r, w) = pipe()?;
            child_fds[2] = w.as_raw_fd();
            keep.push(w);
            started.stderr = Some(File::from(r));
        }
        Stdio::Pty { cols, rows } => {
            let (mut m, mut s) = (0, 0);
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: openpty writes two descriptors; name and termios may be null.
            let r = unsafe {
                libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws)
            };
            if r < 0 {
                return Err(OpError::errno(last_errno(), "openpty", "/dev/ptmx"));
            }
            set_cloexec(m);
            set_cloexec(s);
            // SAFETY: fresh descriptors from openpty.
            let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
            pty_slave = slave.as_raw_fd();
            keep.push(slave);
            started.master = Some(File::from(master));
        }
    }
    let (err_r, err_w) = pipe()?;
    let err_w_fd = err_w.as_raw_fd();
    let pty = pty_slave >= 0;
    let inherit = matches!(spec.stdio, Stdio::Inherit);
    // A cold main process keeps the cwd runc gave PID 1; a warm one (and every exec) is told.
    let chdir = !inherit || !spec.cwd.is_empty();
    let own_group = started.own_group;
    let cred = spec.cred.as_ref().map(|c| (c.uid, c.gid));

    let child = Child {
        err_w: err_w_fd,
        pty,
        pty_slave,
        inherit,
        own_group,
        child_fds,
        cred,
        groups: &groups,
        chdir,
        cwd: &cwd,
        cands: &cands,
        argv: argv_p.as_ptr(),
        env: env_p.as_ptr(),
        ignored: ignored(),
    };
    let pid = clone_vfork(&child);
    if pid < 0 {
        return Err(OpError::errno(last_errno(), "clone", argv0));
    }
    // CLONE_VFORK: this thread resumes only once the child has exec'd or exited, so it already
    // leads its own group (setpgid before execve) when a signal to the group can come.
    started.pid = pid;
    drop(keep);
    drop(err_w);
    let mut msg = Vec::new();
    let _ = File::from(err_r).read_to_end(&mut msg);
    if msg.len() == 5 {
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        return Err(match msg[0] {
            STAGE_CWD => OpError::errno(errno, "cwd", &spec.cwd),
            STAGE_CRED => {
                let c = spec
                    .cred
                    .as_ref()
                    .map(|c| format!("{}:{}", c.uid, c.gid))
                    .unwrap_or_default();
                OpError::new(
                    crate::errors::errno_name(errno),
                    format!("setuid {c}: {}", strerror(errno)),
                    None,
                )
            }
            STAGE_TTY => OpError::errno(errno, "setsid/TIOCSCTTY", "(pty)"),
            _ => OpError::errno(errno, "exec", argv0),
        });
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_uses_env_path_or_the_default() {
        assert_eq!(candidates("/bin/sh", &[]), vec!["/bin/sh"]);
        assert_eq!(candidates("a/b", &[]), vec!["a/b"]);
        assert_eq!(
            candidates("ls", &["PATH=/x/:".into()]),
            vec!["/x/ls", "./ls"]
        );
        assert_eq!(candidates("ls", &[]).len(), DEFAULT_PATH.split(':').count());
    }

    #[test]
    fn a_child_gets_default_dispositions_an_empty_mask_and_its_own_group() {
        // This test process ignores SIGPIPE (Rust's runtime) and blocks SIGUSR1 here: neither
        // may reach the child.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        assert!(ignored().contains(&libc::SIGPIPE));
        let spec = Spec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "grep -E '^(SigIgn|SigBlk)' /proc/self/status; ps -o pgid= -p $$ 2>/dev/null || cut -d' ' -f5 /proc/$$/stat".into(),
            ],
            env: vec![],
            cwd: "/".into(),
            cred: None,
            stdio: Stdio::Pipes { stdin: false },
        };
        let started = spawn(&spec).unwrap();
        let mut out = String::new();
        started.stdout.unwrap().read_to_string(&mut out).unwrap();
        unsafe { libc::waitpid(started.pid, std::ptr::null_mut(), 0) };
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let pgid: i32 = out.lines().last().unwrap().trim().parse().unwrap();
        // sh's $$ is the spawned process itself: it leads its own group.
        assert_eq!(pgid, started.pid, "{out}");
    }
}
