//! File operations. Paths are absolute; errors are errno names with messages naming the path.

use crate::errors::OpError;
use crate::users::Cred;
use serde_json::{Value, json};
use std::ffi::CString;
use std::fs::{self, File, Metadata};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

pub const LIST_MAX: usize = 10_000;

pub fn check_abs<'a>(path: &'a str, field: &str) -> Result<&'a str, OpError> {
    if !path.starts_with('/') {
        return Err(OpError::new(
            "EINVAL",
            format!("field \"{field}\" must be an absolute path, got \"{path}\""),
            Some(path),
        ));
    }
    if path.contains('\0') {
        return Err(OpError::new(
            "EINVAL",
            format!("field \"{field}\" contains a NUL byte"),
            Some(path),
        ));
    }
    Ok(path)
}

fn cpath(path: &str) -> CString {
    CString::new(path).expect("checked by check_abs")
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

pub fn entry(path: &str, md: &Metadata) -> Value {
    let ft = md.file_type();
    let ty = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    let name = Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let mut e = json!({
        "name": name, "path": path, "type": ty, "size": md.size(), "mode": md.mode() & 0o7777,
        "uid": md.uid(), "gid": md.gid(),
        "mtime": md.mtime() as f64 + md.mtime_nsec() as f64 / 1e9,
    });
    if ft.is_symlink()
        && let Ok(t) = fs::read_link(path)
    {
        e["target"] = json!(t.to_string_lossy());
    }
    e
}

pub fn lstat_entry(path: &str, what: &str) -> Result<Value, OpError> {
    let md = fs::symlink_metadata(path).map_err(|e| OpError::io(&e, what, path))?;
    Ok(entry(path, &md))
}

pub fn stat(path: &str) -> Result<Value, OpError> {
    Ok(json!({"entry": lstat_entry(path, "stat")?}))
}

pub fn list(path: &str, depth: u64) -> Result<Value, OpError> {
    if depth < 1 {
        return Err(OpError::new(
            "EINVAL",
            format!("field \"depth\" must be at least 1, got {depth}"),
            Some(path),
        ));
    }
    let md = fs::metadata(path).map_err(|e| OpError::io(&e, "list", path))?;
    if !md.is_dir() {
        return Err(OpError::errno(libc::ENOTDIR, "list", path));
    }
    let mut out: Vec<(String, Value)> = Vec::new();
    let mut pending: Vec<(PathBuf, u64)> = vec![(PathBuf::from(path), 1)];
    while let Some((dir, level)) = pending.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if level == 1 => return Err(OpError::io(&e, "list", path)),
            Err(_) => continue, // an unreadable subdirectory is listed, not descended into
        };
        for de in rd.flatten() {
            let p = de.path();
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            let ps = p.to_string_lossy().into_owned();
            if md.is_dir() && level < depth {
                pending.push((p, level + 1));
            }
            out.push((ps.clone(), entry(&ps, &md)));
            if out.len() > LIST_MAX {
                return Err(OpError::new(
                    "E2BIG",
                    format!("list {path}: more than {LIST_MAX} entries (use a smaller depth)"),
                    Some(path),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(json!({"entries": out.into_iter().map(|(_, e)| e).collect::<Vec<_>>()}))
}

fn chown(path: &str, cred: Option<&Cred>) -> Result<(), OpError> {
    if let Some(c) = cred {
        // SAFETY: lchown on a NUL-terminated path.
        if unsafe { libc::lchown(cpath(path).as_ptr(), c.uid, c.gid) } < 0 {
            return Err(OpError::errno(last_errno(), "chown", path));
        }
    }
    Ok(())
}

fn mkdir_one(path: &str, mode: u32, cred: Option<&Cred>) -> Result<bool, OpError> {
    match fs::create_dir(path) {
        Ok(()) => {
            // Explicitly, so the process umask does not change the mode asked for.
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| OpError::io(&e, "chmod", path))?;
            chown(path, cred)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && Path::new(path).is_dir() => {
            Ok(false)
        }
        Err(e) => Err(OpError::io(&e, "mkdir", path)),
    }
}

/// mkdir (-p when `parents`): true when `path` was created, false when it already was a dir.
pub fn mkdir(path: &str, mode: u32, parents: bool, cred: Option<&Cred>) -> Result<bool, OpError> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => return Ok(false),
        Ok(_) => return Err(OpError::errno(libc::EEXIST, "mkdir", path)),
        Err(_) => {}
    }
    if parents {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (i, part) in parts.iter().enumerate() {
            prefix.push('/');
            prefix.push_str(part);
            if i + 1 < parts.len() {
                if !Path::new(&prefix).is_dir() {
                    mkdir_one(&prefix, 0o755, cred)?;
                }
            } else {
                return mkdir_one(&prefix, mode, cred);
            }
        }
        Ok(false) // "/" itself
    } else {
        mkdir_one(path, mode, cred)
    }
}

fn copy_tree(src: &str, dst: &str) -> Result<(), OpError> {
    let md = fs::symlink_metadata(src).map_err(|e| OpError::io(&e, "move", src))?;
    let ft = md.file_type();
    if ft.is_symlink() {
        let t = fs::read_link(src).map_err(|e| OpError::io(&e, "readlink", src))?;
        symlink(&t, dst).map_err(|e| OpError::io(&e, "symlink", dst))?;
    } else if ft.is_dir() {
        fs::create_dir(dst).map_err(|e| OpError::io(&e, "mkdir", dst))?;
        for de in fs::read_dir(src)
            .map_err(|e| OpError::io(&e, "list", src))?
            .flatten()
        {
            let name = de.file_name().to_string_lossy().into_owned();
            copy_tree(&format!("{src}/{name}"), &format!("{dst}/{name}"))?;
        }
    } else if ft.is_file() {
        fs::copy(src, dst).map_err(|e| OpError::io(&e, "copy", dst))?;
    } else {
        return Err(OpError::new(
            "EXDEV",
            format!("move {src}: cannot copy a special file across filesystems"),
            Some(src),
        ));
    }
    if !ft.is_symlink() {
        let _ = fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777));
    }
    // SAFETY: lchown on a NUL-terminated path; failure (not root) keeps our ownership.
    unsafe { libc::lchown(cpath(dst).as_ptr(), md.uid(), md.gid()) };
    set_mtime(dst, md.mtime(), md.mtime_nsec())?;
    Ok(())
}

fn set_mtime(path: &str, secs: i64, nsec: i64) -> Result<(), OpError> {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: utimensat with a NUL-terminated path and two timespecs.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(path).as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } < 0
    {
        return Err(OpError::errno(last_errno(), "utimes", path));
    }
    Ok(())
}

pub fn split_mtime(mtime: f64) -> (i64, i64) {
    let secs = mtime.floor();
    (
        secs as i64,
        ((mtime - secs) * 1e9).round().min(999_999_999.0) as i64,
    )
}

pub fn move_(src: &str, dst: &str) -> Result<Value, OpError> {
    match fs::rename(src, dst) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            if let Err(err) = copy_tree(src, dst) {
                let _ = remove(dst, true);
                return Err(err);
            }
            remove(src, true)?;
        }
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            let message = format!("move {src} to {dst}: {}", crate::errors::strerror(errno));
            return Err(OpError::new(
                crate::errors::errno_name(errno),
                message,
                Some(src),
            ));
        }
    }
    Ok(json!({"entry": lstat_entry(dst, "stat")?}))
}

pub fn remove(path: &str, recursive: bool) -> Result<Value, OpError> {
    let md = fs::symlink_metadata(path).map_err(|e| OpError::io(&e, "remove", path))?;
    let r = if md.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    r.map_err(|e| OpError::io(&e, "remove", path))?;
    Ok(json!({}))
}

pub fn setattr(path: &str, mode: Option<u32>, mtime: Option<f64>) -> Result<Value, OpError> {
    fs::symlink_metadata(path).map_err(|e| OpError::io(&e, "setattr", path))?;
    if let Some(m) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(m & 0o7777))
            .map_err(|e| OpError::io(&e, "chmod", path))?;
    }
    if let Some(t) = mtime {
        let (s, ns) = split_mtime(t);
        set_mtime(path, s, ns)?;
    }
    Ok(json!({"entry": lstat_entry(path, "stat")?}))
}

/// Opens a regular file for a read stream, positioned at `offset`.
pub fn open_read(path: &str, offset: u64) -> Result<(File, Value), OpError> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).map_err(|e| OpError::io(&e, "open", path))?;
    let md = f.metadata().map_err(|e| OpError::io(&e, "stat", path))?;
    if md.is_dir() {
        return Err(OpError::errno(libc::EISDIR, "read", path));
    }
    if !md.is_file() {
        return Err(OpError::new(
            "EINVAL",
            format!("read {path}: not a regular file"),
            Some(path),
        ));
    }
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| OpError::io(&e, "seek", path))?;
    Ok((f, entry(path, &md)))
}

/// A write in progress: a temporary file in the target's directory, renamed into place on
/// commit and removed when dropped uncommitted (so a lost upload leaves the old file alone).
pub struct Upload {
    pub path: String,
    tmp: String,
    pub file: Option<File>,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: Option<f64>,
}

pub fn begin_write(
    path: &str,
    mode: Option<u32>,
    mtime: Option<f64>,
    parents: bool,
    cred: Option<&Cred>,
) -> Result<Upload, OpError> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = Path::new(path);
    let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(OpError::errno(libc::EISDIR, "write", path));
    };
    let dir = dir.to_string_lossy().into_owned();
    let name = name.to_string_lossy().into_owned();
    if parents {
        mkdir(&dir, 0o755, true, cred)?;
    } else {
        match fs::metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(OpError::errno(libc::ENOTDIR, "write", &dir)),
            Err(e) => return Err(OpError::io(&e, "write", &dir)),
        }
    }
    let existing = fs::metadata(path).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(OpError::errno(libc::EISDIR, "write", path));
    }
    let mode = mode
        .map(|m| m & 0o7777)
        .or(existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let owner = cred
        .map(|c| (c.uid, c.gid))
        .or(existing.as_ref().map(|m| (m.uid(), m.gid())));
    let suffix = crate::auth::hex(&crate::auth::random_bytes(6));
    let base = if dir == "/" { String::new() } else { dir };
    let tmp = format!("{base}/.{name}.fsb-{suffix}");
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| OpError::io(&e, "create", &tmp))?;
    Ok(Upload {
        path: path.to_owned(),
        tmp,
        file: Some(file),
        mode,
        owner,
        mtime,
    })
}

impl Upload {
    pub fn commit(mut self) -> Result<Value, OpError> {
        use std::os::fd::AsRawFd;
        let file = self.file.take().expect("commit once");
        let fd = file.as_raw_fd();
        // SAFETY: fchmod/fchown on our open descriptor.
        if unsafe { libc::fchmod(fd, self.mode) } < 0 {
            return Err(OpError::errno(last_errno(), "chmod", &self.path));
        }
        if let Some((uid, gid)) = self.owner {
            // SAFETY: as above; chown may clear setuid bits, so mode is applied again after.
            if unsafe { libc::fchown(fd, uid, gid) } < 0 && unsafe { libc::geteuid() } == 0 {
                return Err(OpError::errno(last_errno(), "chown", &self.path));
            }
            unsafe { libc::fchmod(fd, self.mode) };
        }
        if let Some(t) = self.mtime {
            let (s, ns) = split_mtime(t);
            let times = [
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                libc::timespec {
                    tv_sec: s,
                    tv_nsec: ns,
                },
            ];
            // SAFETY: futimens on our descriptor with two timespecs.
            if unsafe { libc::futimens(fd, times.as_ptr()) } < 0 {
                return Err(OpError::errno(last_errno(), "utimes", &self.path));
            }
        }
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(|e| OpError::io(&e, "rename", &self.path))?;
        self.tmp.clear();
        Ok(json!({"ok": true, "entry": lstat_entry(&self.path, "stat")?}))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.tmp.is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> String {
        let d = std::env::temp_dir().join(format!("fsb-sup-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d.to_string_lossy().into_owned()
    }

    #[test]
    fn relative_paths_are_einval() {
        assert_eq!(check_abs("x", "path").unwrap_err().code, "EINVAL");
        assert!(check_abs("/x", "path").is_ok());
    }

    #[test]
    fn mkdir_parents_then_list_depth_sorted() {
        let d = tmpdir("mk");
        assert!(mkdir(&format!("{d}/a/b/c"), 0o700, true, None).unwrap());
        assert!(!mkdir(&format!("{d}/a/b/c"), 0o700, true, None).unwrap());
        fs::write(format!("{d}/a/f"), b"x").unwrap();
        let v = list(&d, 2).unwrap();
        let paths: Vec<&str> = v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            paths,
            vec![format!("{d}/a"), format!("{d}/a/b"), format!("{d}/a/f")]
        );
        let c = lstat_entry(&format!("{d}/a/b/c"), "stat").unwrap();
        assert_eq!(c["mode"], 0o700);
        assert_eq!(
            mkdir(&format!("{d}/a/f"), 0o755, true, None)
                .unwrap_err()
                .code,
            "EEXIST"
        );
        assert_eq!(
            mkdir(&format!("{d}/x/y"), 0o755, false, None)
                .unwrap_err()
                .code,
            "ENOENT"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn upload_dropped_before_commit_leaves_the_old_file() {
        let d = tmpdir("up");
        let target = format!("{d}/t.txt");
        fs::write(&target, b"old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        {
            use std::io::Write;
            let mut u = begin_write(&target, None, None, true, None).unwrap();
            u.file.as_mut().unwrap().write_all(b"half").unwrap();
        }
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        let mut u = begin_write(&target, None, Some(1_000_000.5), true, None).unwrap();
        use std::io::Write;
        u.file.as_mut().unwrap().write_all(b"new").unwrap();
        let v = u.commit().unwrap();
        assert_eq!(v["entry"]["mode"], 0o640);
        assert_eq!(v["entry"]["mtime"], 1_000_000.5);
        assert_eq!(fs::read(&target).unwrap(), b"new");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mtime_split() {
        assert_eq!(split_mtime(1.25), (1, 250_000_000));
        assert_eq!(split_mtime(5.0), (5, 0));
    }
}
