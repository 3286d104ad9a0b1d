//! The hostname of a warm sandbox, set from inside it (`start_main`'s `hostname`).
//!
//! A warm slot is made before its sandbox id is known, so its UTS namespace carries the slot's
//! name until the claim. Setting it needs CAP_SYS_ADMIN, which no sandbox process may keep. So
//! the agent gives a warm container CAP_SYS_ADMIN in PID 1's bounding/effective/permitted sets
//! only, and at startup — still single-threaded, before any channel, thread or child — the
//! supervisor forks one helper that keeps it and then drops it from its own sets for good:
//!
//! - Capabilities are per thread; a drop made once every thread exists would have to reach each
//!   of them. Made while the supervisor is its only thread, it is the whole process's, and
//!   every thread and child made later inherits the reduced sets.
//! - The helper does nothing but wait on a pipe for one hostname, call sethostname(2), answer
//!   the errno and exit. `start_main` reaps it before the main process starts, so no process
//!   holding CAP_SYS_ADMIN exists once anything of the user's runs, and the supervisor itself
//!   never held it past startup. It is not dumpable (PR_SET_DUMPABLE 0 is kept across fork),
//!   and dies with the supervisor (PR_SET_PDEATHSIG).
//! - Without CAP_SYS_ADMIN at startup (a cold sandbox, an old agent's slot, a test) there is no
//!   helper; a `start_main` naming a hostname is then refused with EPERM.

use crate::errors::OpError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

pub const CAP_SYS_ADMIN: u32 = 21;
/// The kernel's HOST_NAME_MAX.
pub const MAX_HOSTNAME: usize = 64;
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> std::io::Result<[CapData; 2]> {
    let mut head = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a v3 header and the two data words v3 needs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut head, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data)
}

fn has(data: &[CapData; 2], cap: u32, pick: fn(&CapData) -> u32) -> bool {
    pick(&data[(cap / 32) as usize]) >> (cap % 32) & 1 == 1
}

/// Whether this thread holds `cap` in its effective set.
pub fn effective(cap: u32) -> bool {
    capget().is_ok_and(|d| has(&d, cap, |c| c.effective))
}

/// Removes `cap` from this thread's bounding, effective, permitted and inheritable sets (and
/// so its ambient set), and checks that it is gone. Irrevocable: nothing can raise it again.
pub fn drop_for_good(cap: u32) -> std::io::Result<()> {
    // SAFETY: plain prctl(2); needs CAP_SETPCAP, which every sandbox's PID 1 holds.
    if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut data = capget()?;
    let word = &mut data[(cap / 32) as usize];
    let bit = !(1u32 << (cap % 32));
    word.effective &= bit;
    word.permitted &= bit;
    word.inheritable &= bit;
    let mut head = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    // SAFETY: capset(2) with a v3 header and the two data words read above.
    if unsafe { libc::syscall(libc::SYS_capset, &mut head, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let after = capget()?;
    // SAFETY: plain prctl(2) query.
    let bounding = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
    if bounding != 0
        || has(&after, cap, |c| c.effective)
        || has(&after, cap, |c| c.permitted)
        || has(&after, cap, |c| c.inheritable)
    {
        return Err(std::io::Error::other(format!(
            "capability {cap} is still held after dropping it"
        )));
    }
    Ok(())
}

/// The parent's end of the helper.
struct Helper {
    pid: i32,
    ask: OwnedFd,
    answer: OwnedFd,
}

/// The helper, once forked; taken (and reaped) by the first `finish`.
#[derive(Default)]
pub struct Hostname {
    helper: Mutex<Option<Helper>>,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just made and are owned here only.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The helper's whole life (in the forked child): one request, one sethostname, one answer.
fn helper_main(ask: OwnedFd, answer: OwnedFd) -> ! {
    // SAFETY: plain syscalls on fds this child owns; the process was single-threaded at fork.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        for fd in 0..3 {
            libc::close(fd);
        }
        let mut buf = [0u8; 1 + MAX_HOSTNAME];
        let mut got = 0usize;
        while got < buf.len() {
            let n = libc::read(
                ask.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            );
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n as usize;
            if got >= 1 && got > buf[0] as usize {
                break;
            }
        }
        let len = buf[0] as usize;
        if got == 0 || len == 0 || got <= len {
            // Nothing asked (the supervisor let go of us): end without touching anything.
            libc::_exit(0);
        }
        let errno = if libc::sethostname(buf[1..=len].as_ptr().cast(), len) == 0 {
            0i32
        } else {
            *libc::__errno_location()
        };
        let out = errno.to_ne_bytes();
        libc::write(answer.as_raw_fd(), out.as_ptr().cast(), out.len());
        libc::_exit(0);
    }
}

impl Hostname {
    /// In a warm supervisor, at startup while it is single-threaded: when it holds
    /// CAP_SYS_ADMIN, fork the helper that keeps it and drop it from the supervisor's own sets.
    /// Any failure ends the supervisor: it must never run on holding the capability.
    pub fn start() -> Result<Hostname, String> {
        if !effective(CAP_SYS_ADMIN) {
            return Ok(Hostname::default());
        }
        let (ask_r, ask_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        let (ans_r, ans_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        // SAFETY: single-threaded (see the module doc); the child runs helper_main only.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            drop(ask_w);
            drop(ans_r);
            helper_main(ask_r, ans_w);
        }
        drop(ask_r);
        drop(ans_w);
        drop_for_good(CAP_SYS_ADMIN).map_err(|e| format!("dropping CAP_SYS_ADMIN: {e}"))?;
        Ok(Hostname {
            helper: Mutex::new(Some(Helper {
                pid,
                ask: ask_w,
                answer: ans_r,
            })),
        })
    }

    /// Checks a requested hostname as the kernel would (1..=64 bytes, no NUL).
    pub fn check(name: &str) -> Result<(), OpError> {
        if name.is_empty() || name.len() > MAX_HOSTNAME || name.contains('\0') {
            return Err(OpError::invalid(format!(
                "field \"hostname\" must be 1 to {MAX_HOSTNAME} bytes without NUL, not {name:?}"
            )));
        }
        Ok(())
    }

    /// Sets the hostname through the helper (when `name` is given), then ends and reaps the
    /// helper either way: after this returns no process of the sandbox holds CAP_SYS_ADMIN.
    /// Called once, by `start_main`, before the main process starts.
    pub fn finish(&self, name: Option<&str>) -> Result<(), OpError> {
        let helper = self.helper.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(helper) = helper else {
            return match name {
                None => Ok(()),
                Some(_) => Err(OpError::new(
                    "EPERM",
                    "sethostname: this supervisor started without CAP_SYS_ADMIN, so it \
                     cannot set the hostname (the warm container must grant it to PID 1)",
                    None,
                )),
            };
        };
        let result = match name {
            Some(name) => ask(&helper, name),
            None => Ok(()),
        };
        let Helper { pid, ask, answer } = helper;
        drop(ask); // a helper still reading sees EOF and ends
        drop(answer);
        let mut status = 0;
        // SAFETY: plain waitpid(2) of our own child; ECHILD means the reaper took it first,
        // which equally means it is gone.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
        result
    }
}

fn ask(helper: &Helper, name: &str) -> Result<(), OpError> {
    let mut req = vec![name.len() as u8];
    req.extend_from_slice(name.as_bytes());
    let io = |e: std::io::Error| OpError::new("EIO", format!("sethostname helper: {e}"), None);
    let mut ask = std::fs::File::from(helper.ask.try_clone().map_err(io)?);
    std::io::Write::write_all(&mut ask, &req).map_err(io)?;
    let mut out = [0u8; 4];
    let mut answer = std::fs::File::from(helper.answer.try_clone().map_err(io)?);
    std::io::Read::read_exact(&mut answer, &mut out).map_err(io)?;
    match i32::from_ne_bytes(out) {
        0 => Ok(()),
        errno => Err(OpError::errno(errno, "sethostname", name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_checked_as_the_kernel_would() {
        assert!(Hostname::check("sbx-1").is_ok());
        assert!(Hostname::check(&"a".repeat(64)).is_ok());
        for bad in ["", "a\0b", &"a".repeat(65)] {
            let err = Hostname::check(bad).err().unwrap();
            assert_eq!(err.code, "EINVAL");
            assert!(err.message.contains("hostname"), "{}", err.message);
        }
    }

    #[test]
    fn without_a_helper_a_hostname_is_refused_and_none_is_fine() {
        let h = Hostname::default();
        assert_eq!(h.finish(Some("x")).err().unwrap().code, "EPERM");
        assert!(h.finish(None).is_ok());
    }
}
