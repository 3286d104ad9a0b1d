//! Warm mode (`--warm`): the sandbox is fully made (rootfs, cgroup, namespaces, this supervisor
//! connected to its agent) but has no main process yet. The agent's `start_main` names it; from
//! then on the supervisor behaves exactly as if it had been started with that command: the main
//! process gets PID 1's own stdout/stderr (the sandbox log), signals are forwarded to its group,
//! and its exit ends the sandbox with its status.

use crate::errors::OpError;
use crate::hostname::Hostname;
use crate::procs::{ExecReq, Proc, Table};
use crate::spawn::{Spec, Stdio};
use crate::users;
use serde_json::Value;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// The one main process a warm supervisor may start.
#[derive(Default)]
pub struct WarmMain {
    /// Held while the main process is being started, so a second `start_main` waits and then
    /// sees it started (EBUSY) instead of racing the first.
    starting: Mutex<()>,
    main: OnceLock<Arc<Proc>>,
    /// The exit code the supervisor must end with after the reply (the main process could not
    /// be executed: 126/127, as a cold start would).
    fatal: OnceLock<i32>,
    /// Set once the reply of the start_main that started the main process is written (never
    /// by a refused one): PID 1 must not exit (its main process may end at once) before the
    /// agent knows the main process started, or the agent could not tell a claim that ran
    /// from one that never did.
    replied: Mutex<bool>,
    replied_cv: Condvar,
    /// Sets `start_main`'s hostname from inside the sandbox (hostname.rs).
    hostname: Hostname,
}

/// The main process's spec from a `start_main` request. `own_home` is the supervisor's own
/// `HOME` (runc sets it from the image's passwd for the container's user), given to the main
/// process when `env` has none, as a cold start's main process inherits it.
pub fn parse(req: &Value, own_home: Option<&str>) -> Result<Spec, OpError> {
    let list = |name: &str, required: bool| -> Result<Vec<String>, OpError> {
        let bad = || OpError::invalid(format!("field \"{name}\" must be a list of strings"));
        match req.get(name) {
            None | Some(Value::Null) if !required => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
                .collect(),
            _ => Err(bad()),
        }
    };
    let text = |name: &str| -> Result<String, OpError> {
        match req.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(OpError::invalid(format!(
                "field \"{name}\" must be a string"
            ))),
        }
    };
    let argv = list("argv", true)?;
    if argv.is_empty() {
        return Err(OpError::invalid("field \"argv\" must not be empty"));
    }
    let mut env = list("env", false)?;
    let cwd = text("cwd")?;
    if !cwd.is_empty() && !cwd.starts_with('/') {
        return Err(OpError::invalid(format!(
            "field \"cwd\" must be an absolute path, not {cwd:?}"
        )));
    }
    let cred = users::resolve_system(&text("user")?)?;
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let home = cred
            .as_ref()
            .and_then(|c| c.home.clone())
            .or_else(|| own_home.map(str::to_owned));
        if let Some(home) = home {
            env.push(format!("HOME={home}"));
        }
    }
    Ok(Spec {
        argv,
        env,
        cwd,
        cred,
        stdio: Stdio::Inherit,
    })
}

/// `start_main`'s optional `hostname` (absent or null: the hostname stays as it is).
pub fn hostname_of(req: &Value) -> Result<Option<String>, OpError> {
    match req.get("hostname") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            Hostname::check(s)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(OpError::invalid("field \"hostname\" must be a string")),
    }
}

impl WarmMain {
    /// A warm supervisor's state; `hostname` is made at startup (`Hostname::start`).
    pub fn new(hostname: Hostname) -> WarmMain {
        WarmMain {
            hostname,
            ..WarmMain::default()
        }
    }

    pub fn main(&self) -> Option<Arc<Proc>> {
        self.main.get().cloned()
    }

    pub fn fatal(&self) -> Option<i32> {
        self.fatal.get().copied()
    }

    pub fn mark_replied(&self) {
        *self.replied.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.replied_cv.notify_all();
    }

    /// Until the start_main reply is written (bounded: a dead agent must not keep a finished
    /// sandbox up).
    pub fn wait_replied(&self, bound: Duration) {
        let guard = self.replied.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.replied_cv.wait_timeout_while(guard, bound, |r| !*r);
    }

    /// Starts the main process once; the reply may be sent when this returns Ok (execve done).
    pub fn start(&self, table: &Table, req: &Value) -> Result<Arc<Proc>, OpError> {
        let _held = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(main) = self.main.get() {
            return Err(OpError::new(
                "EBUSY",
                format!("the main process was already started (pid {})", main.pid),
                None,
            ));
        }
        if self.fatal.get().is_some() {
            return Err(OpError::new(
                "EBUSY",
                "the main process failed to start; the sandbox is ending",
                None,
            ));
        }
        let home = std::env::var("HOME").ok();
        let spec = parse(req, home.as_deref())?;
        let hostname = hostname_of(req)?;
        // Before anything of the user's runs: the hostname is set and the helper holding
        // CAP_SYS_ADMIN is gone (also without a hostname), so the main process and everything
        // after it hold a cold sandbox's capabilities.
        self.hostname.finish(hostname.as_deref())?;
        if !spec.cwd.is_empty() {
            // runc makes a missing working directory (root-owned, 0755) before it starts a
            // container's process; a warm main process must find the same.
            std::fs::create_dir_all(&spec.cwd).map_err(|e| OpError::io(&e, "mkdir", &spec.cwd))?;
        }
        let exec = ExecReq {
            spec,
            tag: "main".into(),
            timeout_ms: 0,
        };
        match table.start(exec, true) {
            Ok((proc, _, _)) => {
                let _ = self.main.set(Arc::clone(&proc));
                Ok(proc)
            }
            Err(e) => {
                // The child already exited 126/127 after reporting; a cold start would have
                // ended the sandbox here, with its message on the sandbox's stderr.
                if e.message.starts_with("exec ") {
                    let _ = self.fatal.set(if e.code == "EACCES" { 126 } else { 127 });
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_takes_argv_env_cwd() {
        let spec = parse(
            &json!({"argv": ["sh", "-c", "x"], "env": ["A=1", "HOME=/h"], "cwd": "/w"}),
            Some("/root"),
        )
        .unwrap();
        assert_eq!(spec.argv, vec!["sh", "-c", "x"]);
        assert_eq!(spec.env, vec!["A=1", "HOME=/h"]);
        assert_eq!(spec.cwd, "/w");
        assert!(spec.cred.is_none());
        assert!(matches!(spec.stdio, Stdio::Inherit));
    }

    #[test]
    fn parse_adds_our_home_when_env_has_none() {
        let spec = parse(&json!({"argv": ["true"], "env": ["A=1"]}), Some("/root")).unwrap();
        assert_eq!(spec.env, vec!["A=1", "HOME=/root"]);
        let spec = parse(&json!({"argv": ["true"]}), None).unwrap();
        assert!(spec.env.is_empty());
    }

    #[test]
    fn parse_takes_numeric_users() {
        let spec = parse(&json!({"argv": ["id"], "user": "1000:1001"}), None).unwrap();
        let cred = spec.cred.unwrap();
        assert_eq!((cred.uid, cred.gid), (1000, 1001));
    }

    #[test]
    fn parse_refuses_bad_fields_naming_them() {
        for (req, field) in [
            (json!({}), "argv"),
            (json!({"argv": []}), "argv"),
            (json!({"argv": ["x"], "env": "A=1"}), "env"),
            (json!({"argv": ["x"], "cwd": "rel"}), "cwd"),
            (json!({"argv": ["x"], "cwd": 3}), "cwd"),
        ] {
            let err = parse(&req, None).err().expect("refused");
            assert_eq!(err.code, "EINVAL");
            assert!(err.message.contains(field), "{} names {field}", err.message);
        }
    }

    #[test]
    fn start_runs_once() {
        let table = Table::default();
        let warm = WarmMain::default();
        let main = warm.start(&table, &json!({"argv": ["/bin/true"]})).unwrap();
        assert!(main.main);
        assert_eq!(warm.main().unwrap().pid, main.pid);
        let again = warm.start(&table, &json!({"argv": ["/bin/true"]}));
        assert_eq!(again.err().unwrap().code, "EBUSY");
        // SAFETY: waits for the child started above.
        unsafe { libc::waitpid(main.pid, std::ptr::null_mut(), 0) };
    }

    #[test]
    fn an_unexecutable_main_is_fatal_with_the_cold_exit_code() {
        let table = Table::default();
        let warm = WarmMain::default();
        let err = warm
            .start(&table, &json!({"argv": ["/nonexistent/fsb-test"]}))
            .err()
            .unwrap();
        assert_eq!(err.code, "ENOENT");
        assert_eq!(warm.fatal(), Some(127));
        table.reap();
    }
}
