//! `watch`: inotify events as JSON frames on the data connection until the agent closes it.

use crate::errors::OpError;
use crate::frame::{self, Frame};
use serde_json::json;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF;

pub struct Watch {
    fd: OwnedFd,
    dirs: HashMap<i32, String>,
    recursive: bool,
}

impl Watch {
    pub fn new(path: &str, recursive: bool) -> Result<Watch, OpError> {
        let md = fs::metadata(path).map_err(|e| OpError::io(&e, "watch", path))?;
        // SAFETY: a fresh inotify descriptor, owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(OpError::errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
                "inotify",
                path,
            ));
        }
        // SAFETY: fd is fresh.
        let mut w = Watch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: HashMap::new(),
            recursive,
        };
        w.add(path)?;
        if recursive && md.is_dir() {
            w.add_tree(path);
        }
        Ok(w)
    }

    fn add(&mut self, path: &str) -> Result<(), OpError> {
        let c = CString::new(path).map_err(|_| OpError::invalid("path contains a NUL byte"))?;
        // SAFETY: inotify_add_watch with a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(OpError::errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
                "watch",
                path,
            ));
        }
        self.dirs.insert(wd, path.to_owned());
        Ok(())
    }

    fn add_tree(&mut self, dir: &str) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for de in rd.flatten() {
            if de.file_type().is_ok_and(|t| t.is_dir()) {
                let p = de.path().to_string_lossy().into_owned();
                if self.add(&p).is_ok() {
                    self.add_tree(&p);
                }
            }
        }
    }

    /// Streams events to `conn` until it closes (or fails).
    pub fn run(mut self, conn: UnixStream) {
        let Ok(mut reader) = conn.try_clone() else {
            return;
        };
        let mut writer = conn;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut pfds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: reader.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            if unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) } < 0 {
                continue;
            }
            if pfds[1].revents != 0 {
                // The agent sends nothing on a watch; readable means closed (or a stray frame).
                match frame::read_frame(&mut reader) {
                    Ok(Some(Frame::Json(_) | Frame::Bytes(..) | Frame::Eof)) => {}
                    _ => return,
                }
            }
            if pfds[0].revents == 0 {
                continue;
            }
            // SAFETY: read into buf; inotify returns whole events.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let mut off = 0usize;
            while off + 16 <= n as usize {
                let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap());
                let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                let raw = &buf[off + 16..off + 16 + len];
                off += 16 + len;
                let name = String::from_utf8_lossy(
                    &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())],
                )
                .into_owned();
                if mask & libc::IN_IGNORED != 0 {
                    self.dirs.remove(&wd);
                    continue;
                }
                let Some(dir) = self.dirs.get(&wd).cloned() else {
                    continue;
                };
                let path = if name.is_empty() {
                    dir.clone()
                } else if dir == "/" {
                    format!("/{name}")
                } else {
                    format!("{dir}/{name}")
                };
                let is_dir = mask & libc::IN_ISDIR != 0;
                let event = if mask & libc::IN_CREATE != 0 {
                    "create"
                } else if mask & libc::IN_MODIFY != 0 {
                    "write"
                } else if mask & (libc::IN_DELETE | libc::IN_DELETE_SELF) != 0 {
                    "remove"
                } else if mask & (libc::IN_MOVED_FROM | libc::IN_MOVED_TO) != 0 {
                    "rename"
                } else if mask & libc::IN_ATTRIB != 0 {
                    "chmod"
                } else {
                    continue;
                };
                if self.recursive
                    && is_dir
                    && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                    && self.add(&path).is_ok()
                {
                    self.add_tree(&path);
                }
                let ty = if is_dir || (name.is_empty() && mask & libc::IN_DELETE_SELF != 0) {
                    "dir"
                } else {
                    "file"
                };
                let v = json!({"event": event, "path": path, "type": ty});
                if frame::write_json(&mut writer, &v).is_err() {
                    return;
                }
            }
        }
    }
}
