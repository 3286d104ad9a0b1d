//! Processes this supervisor started: their table (shared with the reaper), output pumping to
//! the attached data connection or into a ring buffer, stdin/signal/resize from the agent.

use crate::errors::OpError;
use crate::frame::{self, Frame};
use crate::spawn::{self, Spec, Started, Stdio};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const RING_BYTES: usize = 1 << 20;
const KEEP_EXITED: Duration = Duration::from_secs(600);
/// After the process has exited, output that stays quiet this long counts as drained, so a
/// background grandchild holding the pipe open cannot hold the exit report back forever.
const DRAIN_QUIET_MS: i32 = 100;
/// How long a finished stream waits for the agent to close its side.
const LINGER: Duration = Duration::from_secs(5);

/// The newest RING_BYTES of output not delivered to any attachment, as (frame type, bytes).
#[derive(Default)]
pub struct Ring {
    chunks: VecDeque<(u8, Vec<u8>)>,
    bytes: usize,
}

impl Ring {
    pub fn push(&mut self, ty: u8, data: &[u8]) {
        let data = if data.len() > RING_BYTES {
            &data[data.len() - RING_BYTES..]
        } else {
            data
        };
        self.chunks.push_back((ty, data.to_vec()));
        self.bytes += data.len();
        while self.bytes > RING_BYTES {
            let over = self.bytes - RING_BYTES;
            let front = self.chunks.front_mut().expect("bytes > 0 means a chunk");
            if front.1.len() <= over {
                self.bytes -= front.1.len();
                self.chunks.pop_front();
            } else {
                front.1.drain(..over);
                self.bytes -= over;
            }
        }
    }

    pub fn take(&mut self) -> VecDeque<(u8, Vec<u8>)> {
        self.bytes = 0;
        std::mem::take(&mut self.chunks)
    }
}

#[derive(Default)]
struct ExitState {
    status: Option<i32>,
    timed_out: bool,
    at: Option<Instant>,
}

struct Output {
    ring: Ring,
    conn: Option<(u64, UnixStream)>,
    drained: bool,
}

pub struct Proc {
    pub pid: i32,
    pub argv: Vec<String>,
    pub tag: String,
    pub pty: bool,
    pub main: bool,
    pub started_at: f64,
    own_group: bool,
    exit: Mutex<ExitState>,
    exited: Condvar,
    /// eventfd the reaper writes so the pump learns of the exit; closed by the pump when it
    /// is done. An exited process is kept (its status) for KEEP_EXITED, its descriptors not:
    /// every one still held per exec would end in EMFILE after a few hundred back-to-back execs.
    wake: Mutex<Option<OwnedFd>>,
    stdin: Mutex<Option<Arc<File>>>,
    master: Mutex<Option<Arc<File>>>,
    /// Held while the pump writes (possibly blocked by a slow agent): never taken by the
    /// reaper, ps or the table's pruning, which read `attached` instead.
    out: Mutex<Output>,
    attached: AtomicBool,
    /// A duplicate of the attached socket, outside `out`, so a new attach can shut a stalled
    /// connection down (unblocking the pump's write) without waiting for the pump.
    current: Mutex<Option<(u64, UnixStream)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn exit_code(status: i32) -> (i32, Option<i32>) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status), Some(libc::WTERMSIG(status)))
    } else {
        (1, None)
    }
}

impl Proc {
    fn exit_json(&self) -> Value {
        let st = lock(&self.exit);
        let (code, signal) = exit_code(st.status.unwrap_or(0));
        json!({"exit": {"code": code, "signal": signal, "timed_out": st.timed_out}})
    }

    pub fn running(&self) -> bool {
        lock(&self.exit).status.is_none()
    }

    /// Signal to the process group (the process alone when it has none of its own).
    pub fn signal(&self, sig: i32) -> Result<(), OpError> {
        if !self.running() {
            return Err(OpError::new(
                "ESRCH",
                format!("process {} has exited", self.pid),
                None,
            ));
        }
        let target = if self.own_group { -self.pid } else { self.pid };
        // SAFETY: plain kill(2).
        if unsafe { libc::kill(target, sig) } < 0 {
            let e = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            return Err(OpError::new(
                crate::errors::errno_name(e),
                format!(
                    "signal {sig} to process {}: {}",
                    self.pid,
                    crate::errors::strerror(e)
                ),
                None,
            ));
        }
        Ok(())
    }

    /// Called by the reaper (with the table locked); never blocks on output.
    fn set_exited(&self, status: i32) {
        let mut st = lock(&self.exit);
        st.status = Some(status);
        st.at = Some(Instant::now());
        self.exited.notify_all();
        let one: u64 = 1;
        if let Some(wake) = lock(&self.wake).as_ref() {
            // SAFETY: an 8-byte write to our eventfd.
            unsafe { libc::write(wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn emit(&self, ty: u8, data: &[u8]) {
        let mut out = lock(&self.out);
        if let Some((_, conn)) = out.conn.as_mut() {
            // Blocking write: a slow agent slows the process down (the kernel's flow control).
            if frame::write_frame(conn, ty, data).is_ok() {
                return;
            }
            let _ = conn.shutdown(Shutdown::Both);
            out.conn = None;
            self.attached.store(false, Ordering::Relaxed);
        }
        out.ring.push(ty, data);
    }

    fn finish(&self) {
        let exit = self.exit_json();
        let mut out = lock(&self.out);
        out.drained = true;
        if let Some((_, mut conn)) = out.conn.take() {
            self.attached.store(false, Ordering::Relaxed);
            let _ = frame::write_json(&mut conn, &exit);
            end_stream(&conn);
        }
        drop(out);
        // Exited and drained: nothing can be written to it or resized any more.
        lock(&self.stdin).take();
        lock(&self.master).take();
    }

    pub fn describe(&self) -> Value {
        let st = lock(&self.exit);
        let attached = self.attached.load(Ordering::Relaxed);
        json!({
            "pid": self.pid, "argv": self.argv, "tag": self.tag, "pty": self.pty,
            "started_at": self.started_at, "attached": attached, "running": st.status.is_none(),
            "exit_code": st.status.map(|s| exit_code(s).0), "main": self.main,
        })
    }

    /// Serves one data connection for this process until it closes or is replaced: replays the
    /// ring, then output flows from the pump; agent frames go to stdin, signal, resize.
    pub fn attach(self: &Arc<Self>, conn: UnixStream) {
        static GEN: AtomicU64 = AtomicU64::new(1);
        let generation = GEN.fetch_add(1, Ordering::Relaxed);
        let Ok(mut reader) = conn.try_clone() else {
            return;
        };
        let Ok(ctl) = conn.try_clone() else { return };
        {
            let mut current = lock(&self.current);
            if let Some((_, old)) = current.replace((generation, ctl)) {
                let _ = old.shutdown(Shutdown::Both);
            }
        }
        {
            let mut out = lock(&self.out);
            if let Some((_, old)) = out.conn.take() {
                let _ = old.shutdown(Shutdown::Both);
            }
            let mut conn = conn;
            for (ty, data) in out.ring.take() {
                if frame::write_frame(&mut conn, ty, &data).is_err() {
                    return;
                }
            }
            if out.drained {
                let _ = frame::write_json(&mut conn, &self.exit_json());
                end_stream(&conn);
                drop(out);
                drain_until_closed(&mut reader);
                self.release(generation);
                return;
            }
            out.conn = Some((generation, conn));
            self.attached.store(true, Ordering::Relaxed);
        }
        loop {
            match frame::read_frame(&mut reader) {
                Ok(Some(Frame::Bytes(frame::DATA, data))) => self.write_stdin(&data),
                Ok(Some(Frame::Eof)) => {
                    if self.pty {
                        self.write_stdin(b"\x04"); // the terminal's end-of-file character
                    } else {
                        lock(&self.stdin).take();
                    }
                }
                Ok(Some(Frame::Json(v))) => {
                    if let Some(sig) = v.get("signal").and_then(Value::as_i64) {
                        let _ = self.signal(sig as i32);
                    }
                    if let Some(r) = v.get("resize") {
                        let cols = r.get("cols").and_then(Value::as_u64).unwrap_or(80) as u16;
                        let rows = r.get("rows").and_then(Value::as_u64).unwrap_or(24) as u16;
                        self.resize(cols, rows);
                    }
                }
                Ok(Some(Frame::Bytes(..))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let mut out = lock(&self.out);
        if out.conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            out.conn = None;
            self.attached.store(false, Ordering::Relaxed);
        }
        drop(out);
        self.release(generation);
    }

    /// The attachment `generation` is over: drop our duplicate of its socket (unless a newer
    /// attach has replaced it already).
    fn release(&self, generation: u64) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            current.take();
        }
    }

    fn write_stdin(&self, data: &[u8]) {
        let f = lock(&self.stdin).clone();
        if let Some(f) = f
            && (&*f).write_all(data).is_err()
            && !self.pty
        {
            lock(&self.stdin).take();
        }
    }

    pub fn resize(&self, cols: u16, rows: u16) {
        if let Some(m) = lock(&self.master).as_ref() {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a winsize; the kernel sends SIGWINCH to the foreground group.
            unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    fn start_timeout(self: &Arc<Self>, timeout: Duration) {
        let p = Arc::clone(self);
        thread_small(move || {
            let st = lock(&p.exit);
            let (mut st, res) = p
                .exited
                .wait_timeout_while(st, timeout, |s| s.status.is_none())
                .unwrap_or_else(|e| e.into_inner());
            if res.timed_out() && st.status.is_none() {
                st.timed_out = true;
                drop(st);
                // SAFETY: plain kill(2) of the process group.
                unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            }
        });
    }

    /// Moves stdout/stderr (or the PTY) into frames until the process has exited and its
    /// output is drained, then reports the exit.
    pub fn pump(self: &Arc<Self>, stdout: File, stderr: Option<File>) {
        let Some(wake) = lock(&self.wake).as_ref().map(|w| w.as_raw_fd()) else {
            return; // a second pump for one process: never started
        };
        let mut fds: Vec<(Option<File>, u8)> =
            vec![(Some(stdout), frame::STDOUT), (stderr, frame::STDERR)];
        let mut buf = vec![0u8; frame::CHUNK];
        let mut exited = false;
        loop {
            let mut pfds: Vec<libc::pollfd> = vec![libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            }];
            let mut which = Vec::new();
            for (i, (f, _)) in fds.iter().enumerate() {
                if let Some(f) = f {
                    pfds.push(libc::pollfd {
                        fd: f.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push(i);
                }
            }
            if which.is_empty() && exited {
                break;
            }
            let timeout = if exited { DRAIN_QUIET_MS } else { -1 };
            // SAFETY: pfds is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                continue; // EINTR
            }
            if n == 0 {
                break; // exited and quiet: drained
            }
            if pfds[0].revents != 0 {
                let mut v = 0u64;
                // SAFETY: an 8-byte read from our eventfd.
                unsafe { libc::read(wake, (&mut v as *mut u64).cast(), 8) };
                exited = !self.running();
            }
            for (k, &i) in which.iter().enumerate() {
                if pfds[k + 1].revents == 0 {
                    continue;
                }
                let (f, ty) = &mut fds[i];
                let got = f.as_mut().map(|f| f.read(&mut buf));
                match got {
                    Some(Ok(n)) if n > 0 => self.emit(*ty, &buf[..n]),
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    _ => *f = None, // EOF, or EIO from a PTY whose slave side is all closed
                }
            }
        }
        self.finish();
        // The reaper has reported the exit (we saw it): nothing writes the eventfd any more.
        lock(&self.wake).take();
    }
}

/// After the exit report: half-close, so the agent reads everything up to our EOF, while the
/// reader keeps consuming what the agent still sends (stdin it wrote before it saw the exit)
/// for a bounded time. Closing at once would make those late writes fail with EPIPE, and some
/// clients (asyncio) then drop output they have received but not yet read.
fn end_stream(conn: &UnixStream) {
    let _ = conn.shutdown(Shutdown::Write);
    let _ = conn.set_read_timeout(Some(LINGER));
}

fn drain_until_closed(reader: &mut UnixStream) {
    let _ = reader.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 4096];
    while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
}

pub fn thread_small(f: impl FnOnce() + Send + 'static) {
    // Small stacks: only touched pages count towards RSS, but a small reserve keeps many
    // concurrent streams cheap in address space too.
    if let Err(e) = std::thread::Builder::new().stack_size(256 * 1024).spawn(f) {
        eprintln!("fsb-supervisor: cannot start a thread: {e}");
    }
}

/// A started process and its output ends (stdout or the PTY master, stderr) for `pump`.
pub type Launched = (Arc<Proc>, Option<File>, Option<File>);

pub struct ExecReq {
    pub spec: Spec,
    pub tag: String,
    pub timeout_ms: u64,
}

#[derive(Default)]
pub struct Table {
    procs: Mutex<HashMap<i32, Arc<Proc>>>,
}

impl Table {
    /// Starts a process; the reply may be sent once this returns Ok (execve succeeded).
    /// Returns the process and its output ends for `pump`.
    pub fn start(&self, req: ExecReq, main: bool) -> Result<Launched, OpError> {
        // SAFETY: a fresh eventfd, owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(OpError::errno(libc::EMFILE, "eventfd", "(exec)"));
        }
        // SAFETY: efd is fresh.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let pty = matches!(req.spec.stdio, Stdio::Pty { .. });
        let mut table = lock(&self.procs);
        Self::prune(&mut table);
        // The table stays locked across fork and the exec report, so the reaper cannot collect
        // the pid before it is registered; every fork in this process happens under this lock,
        // which also keeps PTY fds (between openpty and fcntl) from leaking into another child.
        let started: Result<Started, OpError> = spawn::spawn(&req.spec);
        let Started {
            pid,
            own_group,
            stdin,
            stdout,
            stderr,
            master,
        } = match started {
            Ok(s) => s,
            Err(e) => {
                drop(table);
                return Err(e);
            }
        };
        let master = master.map(Arc::new);
        let stdin = if pty {
            master.clone()
        } else {
            stdin.map(Arc::new)
        };
        let out_reader = match &master {
            Some(m) => m.try_clone().ok(),
            None => stdout,
        };
        let proc = Arc::new(Proc {
            pid,
            argv: req.spec.argv.clone(),
            tag: req.tag,
            pty,
            main,
            started_at: now_unix(),
            own_group,
            exit: Mutex::new(ExitState::default()),
            exited: Condvar::new(),
            wake: Mutex::new(Some(wake)),
            stdin: Mutex::new(stdin),
            master: Mutex::new(master),
            out: Mutex::new(Output {
                ring: Ring::default(),
                conn: None,
                drained: main,
            }),
            attached: AtomicBool::new(false),
            current: Mutex::new(None),
        });
        table.insert(pid, Arc::clone(&proc));
        drop(table);
        if req.timeout_ms > 0 {
            proc.start_timeout(Duration::from_millis(req.timeout_ms));
        }
        Ok((proc, out_reader, stderr))
    }

    pub fn get(&self, pid: i32) -> Option<Arc<Proc>> {
        let mut table = lock(&self.procs);
        Self::prune(&mut table);
        table.get(&pid).cloned()
    }

    pub fn list(&self) -> Vec<Value> {
        let mut table = lock(&self.procs);
        Self::prune(&mut table);
        let mut procs: Vec<&Arc<Proc>> = table.values().collect();
        procs.sort_by_key(|p| p.pid);
        procs.iter().map(|p| p.describe()).collect()
    }

    fn prune(table: &mut HashMap<i32, Arc<Proc>>) {
        table.retain(|_, p| {
            let at = lock(&p.exit).at;
            at.is_none_or(|t| t.elapsed() < KEEP_EXITED) || p.attached.load(Ordering::Relaxed)
        });
    }

    /// Reaps every exited child (ours or adopted orphans); returns the pids reaped with status.
    pub fn reap(&self) -> Vec<(i32, i32)> {
        let table = lock(&self.procs);
        let mut reaped = Vec::new();
        loop {
            let mut status = 0;
            // SAFETY: plain waitpid(2).
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                if let Some(p) = table.get(&pid) {
                    p.set_exited(status);
                }
                reaped.push((pid, status));
                continue;
            }
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return reaped;
        }
    }

    /// SIGKILL to every process group we started (used when the main process ends, or an idle
    /// supervisor is stopped, and we are not PID 1, where kill(-1) would reach far beyond the
    /// sandbox). Exited leaders too: their background children may still be in the group.
    pub fn kill_all(&self) {
        for p in lock(&self.procs).values() {
            if p.own_group {
                // SAFETY: plain kill(2) of a process group we created.
                unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            } else if p.running() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes_in_order() {
        let mut r = Ring::default();
        r.push(frame::STDOUT, &vec![1u8; RING_BYTES - 10]);
        r.push(frame::STDERR, &[2u8; 20]);
        let chunks = r.take();
        let total: usize = chunks.iter().map(|c| c.1.len()).sum();
        assert_eq!(total, RING_BYTES);
        assert_eq!(chunks[0].1.len(), RING_BYTES - 20);
        assert_eq!(chunks[1], (frame::STDERR, vec![2u8; 20]));
        assert!(r.take().is_empty());
    }

    #[test]
    fn ring_trims_a_single_oversize_chunk() {
        let mut r = Ring::default();
        let mut big = vec![0u8; RING_BYTES + 5];
        big[RING_BYTES + 4] = 9;
        r.push(frame::STDOUT, &big);
        let chunks = r.take();
        assert_eq!(chunks[0].1.len(), RING_BYTES);
        assert_eq!(*chunks[0].1.last().unwrap(), 9);
    }

    #[test]
    fn exit_codes_map_signals_to_128_plus_n() {
        assert_eq!(exit_code(3 << 8), (3, None));
        assert_eq!(exit_code(9), (137, Some(9)));
    }
}
