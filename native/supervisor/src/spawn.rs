//! fork + execve with everything prepared before the fork (the child of a multithreaded process
//! may only make async-signal-safe calls: no allocation, no locks). The child reports a failure
//! as (stage, errno) through a close-on-exec pipe; EOF on that pipe means execve succeeded.

use crate::errors::{OpError, strerror};
use crate::users::Cred;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

/// Forks and execs `spec`; returns once execve succeeded in the child (or with its error).
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

    // SAFETY: the child branch below only makes async-signal-safe calls on memory prepared
    // above, and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(OpError::errno(last_errno(), "fork", argv0));
    }
    if pid == 0 {
        unsafe {
            let report = |stage: u8, errno: i32| -> ! {
                let mut msg = [0u8; 5];
                msg[0] = stage;
                msg[1..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(err_w_fd, msg.as_ptr().cast(), 5);
                libc::_exit(if stage == STAGE_EXEC && errno == libc::EACCES {
                    126
                } else {
                    127
                });
            };
            let errno = || *libc::__errno_location();
            // Dispositions and the mask the supervisor uses are not the process's.
            for sig in 1..65 {
                libc::signal(sig, libc::SIG_DFL);
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if pty {
                if libc::setsid() < 0 || libc::ioctl(pty_slave, libc::TIOCSCTTY, 0) < 0 {
                    report(STAGE_TTY, errno());
                }
                for fd in 0..3 {
                    libc::dup2(pty_slave, fd);
                }
            } else if !inherit {
                libc::setpgid(0, 0);
                for (target, fd) in child_fds.iter().enumerate() {
                    libc::dup2(*fd, target as i32);
                }
            } else if own_group {
                libc::setpgid(0, 0);
            }
            if let Some((uid, gid)) = cred
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                report(STAGE_CRED, errno());
            }
            if chdir && libc::chdir(cwd.as_ptr()) < 0 {
                report(STAGE_CWD, errno());
            }
            let mut saw_eacces = false;
            let mut last = libc::ENOENT;
            for c in &cands {
                libc::execve(c.as_ptr(), argv_p.as_ptr(), env_p.as_ptr());
                last = errno();
                match last {
                    libc::EACCES => saw_eacces = true,
                    libc::ENOENT
                    | libc::ENOTDIR
                    | libc::ESTALE
                    | libc::ENODEV
                    | libc::ETIMEDOUT => {}
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
    if own_group && !pty {
        // Also from this side, so a signal to the group right after spawn cannot miss it.
        // SAFETY: plain syscall; EACCES after the child's exec is harmless.
        unsafe { libc::setpgid(pid, pid) };
    }
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
}
