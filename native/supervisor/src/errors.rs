//! One error shape for every operation: an errno name, a human message naming the path, the path.

use serde_json::{Value, json};
use std::io;

#[derive(Debug, Clone)]
pub struct OpError {
    pub code: &'static str,
    pub message: String,
    pub path: Option<String>,
}

impl OpError {
    pub fn new(code: &'static str, message: impl Into<String>, path: Option<&str>) -> Self {
        OpError {
            code,
            message: message.into(),
            path: path.map(str::to_owned),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("EINVAL", message, None)
    }

    /// `what path: strerror`, e.g. `open /tmp/x: No such file or directory`.
    pub fn errno(errno: i32, what: &str, path: &str) -> Self {
        let message = format!("{what} {path}: {}", strerror(errno));
        Self::new(errno_name(errno), message, Some(path))
    }

    pub fn io(err: &io::Error, what: &str, path: &str) -> Self {
        match err.raw_os_error() {
            Some(e) => Self::errno(e, what, path),
            None => Self::new("EIO", format!("{what} {path}: {err}"), Some(path)),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({"code": self.code, "message": self.message});
        if let Some(p) = &self.path {
            v["path"] = json!(p);
        }
        v
    }
}

/// The text of an errno without Rust's " (os error N)" suffix (strerror itself is not
/// thread-safe; std's formatting uses the reentrant variant).
pub fn strerror(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EISDIR => "EISDIR",
        libc::ENOTDIR => "ENOTDIR",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EEXIST => "EEXIST",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EINVAL => "EINVAL",
        libc::E2BIG => "E2BIG",
        libc::EXDEV => "EXDEV",
        libc::ESRCH => "ESRCH",
        libc::EBUSY => "EBUSY",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ELOOP => "ELOOP",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOEXEC => "ENOEXEC",
        libc::ETXTBSY => "ETXTBSY",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::EFBIG => "EFBIG",
        _ => "EIO",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_path_and_errno() {
        let e = OpError::errno(libc::ENOENT, "open", "/tmp/x");
        assert_eq!(e.code, "ENOENT");
        assert_eq!(e.message, "open /tmp/x: No such file or directory");
        assert_eq!(e.to_json()["path"], "/tmp/x");
    }

    #[test]
    fn unknown_errno_is_eio() {
        assert_eq!(errno_name(libc::ECHILD), "EIO");
    }
}
