//! fsb-logger: containerd's `binary://` log driver for one sandbox (see lib.rs for the format).
//!
//! The contract (containerd's shim, `NewBinaryIO`): the container's stdout pipe is fd 3, its
//! stderr fd 4, and fd 5 is a pipe the shim reads until we close it (we are ready); arguments
//! are the URI query's `key value` pairs; CONTAINER_ID and CONTAINER_NAMESPACE are set. When the
//! task is deleted the shim closes its ends of the pipes, then sends SIGTERM and, after 12 s,
//! SIGKILL. SIGTERM is ignored: we stop at end of file on both pipes, after writing everything
//! the container wrote.
//!
//! One thread, `poll(2)` over both pipes: nothing to lock, and an idle line is flushed by the
//! poll timeout. Whatever goes wrong, we keep reading the pipes, so the container never blocks
//! on a full pipe nor dies of a closed one.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use fsb_logger::{parse_args, Config, Logger, STDERR, STDOUT};

/// How long an unfinished line waits for its newline before it is written as a partial record.
const PARTIAL_FLUSH: Duration = Duration::from_millis(200);
const READ_BYTES: usize = 64 * 1024;

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

const POLLIN: i16 = 0x001;
const POLLERR: i16 = 0x008;
const POLLHUP: i16 = 0x010;
const POLLNVAL: i16 = 0x020;
const F_GETFD: i32 = 1;
const SIGTERM: i32 = 15;
const SIG_IGN: usize = 1;

extern "C" {
    fn poll(fds: *mut PollFd, nfds: u64, timeout: i32) -> i32;
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
    fn signal(signum: i32, handler: usize) -> usize;
}

fn fd_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    unsafe { fcntl(fd, F_GETFD) >= 0 }
}

/// Takes ownership of an inherited descriptor, if it is there.
fn inherited(fd: i32) -> Option<File> {
    // SAFETY: the shim handed us this descriptor and nothing else in this process owns it.
    fd_open(fd).then(|| unsafe { File::from_raw_fd(fd) })
}

fn main() -> ExitCode {
    // SAFETY: setting a signal's disposition to "ignore" has no handler to be unsafe in.
    unsafe { signal(SIGTERM, SIG_IGN) };
    let config = parse_args(std::env::args().skip(1));
    let id = std::env::var("CONTAINER_ID").unwrap_or_default();
    let mut logger = match &config {
        Ok(config) => Some(Logger::new(config)),
        Err(err) => {
            // Still drain the pipes below: a container must not die because its logger did.
            eprintln!("fsb-logger ({id}): {err}; output is discarded");
            None
        }
    };
    let streams = [inherited(3), inherited(4)];
    drop(inherited(5)); // ready: the shim goes on to start the container
    run(&mut logger, streams);
    if let (Some(logger), Ok(Config { path, .. })) = (&logger, &config) {
        if logger.file.dropped_total > 0 {
            eprintln!(
                "fsb-logger ({id}): {} bytes dropped in all for {}",
                logger.file.dropped_total,
                path.display()
            );
        }
    }
    if config.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn run(logger: &mut Option<Logger>, mut streams: [Option<File>; 2]) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; READ_BYTES];
    let mut pending_since: [Option<Instant>; 2] = [None, None];
    loop {
        if streams.iter().all(Option::is_none) {
            break;
        }
        let mut fds = [0, 1].map(|i| PollFd {
            fd: streams[i].as_ref().map_or(-1, |f| f.as_raw_fd()),
            events: POLLIN,
            revents: 0,
        });
        let now = Instant::now();
        let timeout = pending_since
            .iter()
            .flatten()
            .map(|since| PARTIAL_FLUSH.saturating_sub(now.duration_since(*since)))
            .min()
            .map_or(-1, |d| d.as_millis() as i32 + 1);
        // SAFETY: `fds` is a live array of two pollfd structs.
        let n = unsafe { poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            eprintln!("fsb-logger: poll: {}", std::io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        for (i, stream) in [STDOUT, STDERR].into_iter().enumerate() {
            if fds[i].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL) == 0 {
                continue;
            }
            let Some(file) = streams[i].as_mut() else {
                continue;
            };
            match file.read(&mut buf) {
                Ok(0) => streams[i] = None,
                Ok(got) => {
                    if let Some(logger) = logger.as_mut() {
                        logger.input(stream, &buf[..got], SystemTime::now());
                        pending_since[i] = match (logger.has_pending(stream), pending_since[i]) {
                            (false, _) => None,
                            (true, None) => Some(Instant::now()),
                            (true, since) => since,
                        };
                    }
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                Err(err) => {
                    eprintln!("fsb-logger: reading {}: {err}", ["stdout", "stderr"][i]);
                    streams[i] = None;
                }
            }
            if streams[i].is_none() {
                // End of the stream: its unfinished last line is all there will be.
                if let Some(logger) = logger.as_mut() {
                    logger.flush_partial(stream, SystemTime::now());
                }
                pending_since[i] = None;
            }
        }
        let now = Instant::now();
        for (i, stream) in [STDOUT, STDERR].into_iter().enumerate() {
            if pending_since[i].is_some_and(|since| now.duration_since(since) >= PARTIAL_FLUSH) {
                if let Some(logger) = logger.as_mut() {
                    logger.flush_partial(stream, SystemTime::now());
                }
                pending_since[i] = None;
            }
        }
    }
}
