//! The channel to the agent: dial + handshake, the control connection (redialled forever with
//! backoff), one thread per request, and a data connection per stream.

use crate::auth;
use crate::errors::OpError;
use crate::files;
use crate::frame::{self, Frame};
use crate::procs::{ExecReq, Launched, Proc, Table, thread_small};
use crate::spawn::{Spec, Stdio};
use crate::users;
use crate::warm::WarmMain;
use crate::watch::Watch;
use serde_json::{Map, Value, json};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Channel {
    pub socket: PathBuf,
    pub secret: Vec<u8>,
    pub sandbox: String,
    pub table: Arc<Table>,
    /// Set in warm mode (`--warm`): the main process `start_main` starts.
    pub warm: Option<Arc<WarmMain>>,
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Channel {
    /// Dials agent.sock and runs the handshake; `stream` is None for the control connection.
    pub fn connect(&self, stream: Option<&str>) -> io::Result<UnixStream> {
        let mut conn = UnixStream::connect(&self.socket)?;
        conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let hello = match frame::read_frame(&mut conn)? {
            Some(Frame::Json(v)) => v,
            _ => return Err(proto_err("handshake: expected the agent's hello")),
        };
        if hello.get("v").and_then(Value::as_u64) != Some(1) {
            return Err(proto_err(format!(
                "handshake: unsupported version in {hello}"
            )));
        }
        let agent_nonce = hello
            .get("nonce")
            .and_then(Value::as_str)
            .ok_or_else(|| proto_err("handshake: no nonce"))?;
        let nonce = auth::hex(&auth::random_bytes(32));
        let mut msg = json!({
            "v": 1, "role": if stream.is_some() { "data" } else { "control" },
            "sandbox": self.sandbox, "nonce": nonce,
            "proof": auth::proof(&self.secret, "sup:", agent_nonce),
            "version": env!("CARGO_PKG_VERSION"), "pid": std::process::id(),
        });
        if let Some(s) = stream {
            msg["stream"] = json!(s);
        }
        frame::write_json(&mut conn, &msg)?;
        let answer = match frame::read_frame(&mut conn)? {
            Some(Frame::Json(v)) => v,
            _ => return Err(proto_err("handshake: expected the agent's answer")),
        };
        if answer.get("ok").and_then(Value::as_bool) != Some(true) {
            return Err(proto_err(format!(
                "handshake refused by the agent: {}",
                answer.get("error").unwrap_or(&Value::Null)
            )));
        }
        let proof = answer.get("proof").and_then(Value::as_str).unwrap_or("");
        if !auth::verify(&self.secret, "agent:", &nonce, proof) {
            return Err(proto_err(
                "handshake: the agent's proof is wrong (not our agent?)",
            ));
        }
        conn.set_read_timeout(None)?;
        Ok(conn)
    }

    /// The control connection, forever: 50 ms after a loss, then ×2 up to 1 s.
    pub fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        let mut last_error = String::new();
        loop {
            match self.connect(None) {
                Ok(conn) => {
                    backoff = Duration::from_millis(50);
                    last_error.clear();
                    log(&format!(
                        "control connection to {} established",
                        self.socket.display()
                    ));
                    let why = self.serve(conn);
                    log(&format!("control connection lost: {why}; redialling"));
                }
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        log(&format!(
                            "dial {}: {text} (retrying)",
                            self.socket.display()
                        ));
                        last_error = text;
                    }
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn serve(self: &Arc<Self>, conn: UnixStream) -> String {
        let Ok(writer) = conn.try_clone() else {
            return "cannot clone the socket".into();
        };
        let writer = Arc::new(Mutex::new(writer));
        let mut reader = conn;
        loop {
            match frame::read_frame(&mut reader) {
                Ok(Some(Frame::Json(req))) => {
                    let me = Arc::clone(self);
                    let w = Arc::clone(&writer);
                    thread_small(move || me.handle(req, &w));
                }
                Ok(Some(_)) => {} // only JSON means something on the control connection
                Ok(None) => return "closed by the agent".into(),
                Err(e) => return e.to_string(),
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Value, writer: &Mutex<UnixStream>) {
        let Some(id) = req.get("id").and_then(Value::as_u64) else {
            log(&format!("request without a numeric id ignored: {req}"));
            return;
        };
        let (reply, job) = match self.dispatch(&req) {
            Ok((result, job)) => {
                let mut r = Map::new();
                r.insert("id".into(), json!(id));
                r.insert("ok".into(), json!(true));
                if let Value::Object(m) = result {
                    r.extend(m);
                }
                (Value::Object(r), job)
            }
            Err(e) => (json!({"id": id, "ok": false, "error": e.to_json()}), None),
        };
        {
            let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = frame::write_json(&mut *w, &reply);
        }
        let start_main = req.get("op").and_then(Value::as_str) == Some("start_main");
        // Only the reply of the start_main that started the main process: marked after a
        // refused one, a later main process that exits at once would end PID 1 before its own
        // reply is written, and the agent would read EOF for a claim that ran.
        if start_main
            && let Some(w) = &self.warm
            && reply.get("ok") == Some(&Value::Bool(true))
        {
            w.mark_replied();
        }
        if let Some(code) = self
            .warm
            .as_ref()
            .and_then(|w| w.fatal())
            .filter(|_| start_main)
        {
            // The main process could not be executed: end as a cold start would have, with
            // its message on the sandbox's stderr (the agent has the reply already).
            if let Some(msg) = reply.pointer("/error/message").and_then(Value::as_str) {
                eprintln!("fsb-supervisor: {msg}");
            }
            std::process::exit(code);
        }
        if let Some((token, job)) = job {
            let conn = self.connect(Some(&token));
            if let Err(e) = &conn {
                log(&format!("data connection for stream {token}: {e}"));
            }
            job.run(conn.ok());
        }
    }

    fn dispatch(&self, req: &Value) -> Result<(Value, Option<(String, Job)>), OpError> {
        let op = req.get("op").and_then(Value::as_str).unwrap_or("");
        let stream = || {
            str_field(req, "stream").and_then(|s| {
                if s.is_empty() {
                    Err(OpError::invalid(
                        "field \"stream\" must be a non-empty token",
                    ))
                } else {
                    Ok(s.to_owned())
                }
            })
        };
        let path = || files::check_abs(str_field(req, "path")?, "path").map(str::to_owned);
        match op {
            "exec" => {
                let token = stream()?;
                let (proc, out, err) = self.exec(req)?;
                Ok((
                    json!({"pid": proc.pid}),
                    Some((token, Job::Exec(proc, out, err))),
                ))
            }
            "attach" => {
                let token = stream()?;
                let proc = self.proc_of(req)?;
                if proc.main {
                    return Err(OpError::invalid(format!(
                        "process {} is the main process; its output goes to the sandbox log",
                        proc.pid
                    )));
                }
                Ok((json!({}), Some((token, Job::Attach(proc)))))
            }
            "signal" => {
                let sig = req
                    .get("signal")
                    .and_then(Value::as_i64)
                    .filter(|s| (1..=64).contains(s))
                    .ok_or_else(|| {
                        OpError::invalid("field \"signal\" must be a signal number 1..64")
                    })?;
                self.proc_of(req)?.signal(sig as i32)?;
                Ok((json!({}), None))
            }
            "resize" => {
                let proc = self.proc_of(req)?;
                if !proc.pty {
                    return Err(OpError::invalid(format!(
                        "process {} has no PTY to resize",
                        proc.pid
                    )));
                }
                let (cols, rows) = size_of(req)?;
                proc.resize(cols, rows);
                Ok((json!({}), None))
            }
            "start_main" => {
                let Some(warm) = &self.warm else {
                    return Err(OpError::invalid(
                        "start_main: this supervisor was not started with --warm; \
                         its main process is the one on its command line",
                    ));
                };
                let main = warm.start(&self.table, req)?;
                Ok((json!({"pid": main.pid}), None))
            }
            "ps" => Ok((json!({"processes": self.table.list()}), None)),
            "stat" => Ok((files::stat(&path()?)?, None)),
            "list" => {
                let depth = opt_u64(req, "depth")?.unwrap_or(1);
                Ok((files::list(&path()?, depth)?, None))
            }
            "mkdir" => {
                let p = path()?;
                let cred = users::resolve_system(opt_str(req, "user")?.unwrap_or(""))?;
                let mode = opt_u64(req, "mode")?.unwrap_or(0o755) as u32 & 0o7777;
                let created = files::mkdir(
                    &p,
                    mode,
                    opt_bool(req, "parents")?.unwrap_or(true),
                    cred.as_ref(),
                )?;
                Ok((json!({"created": created}), None))
            }
            "move" => {
                let src = files::check_abs(str_field(req, "src")?, "src")?;
                let dst = files::check_abs(str_field(req, "dst")?, "dst")?;
                Ok((files::move_(src, dst)?, None))
            }
            "remove" => Ok((
                files::remove(&path()?, opt_bool(req, "recursive")?.unwrap_or(true))?,
                None,
            )),
            "setattr" => {
                let mode = opt_u64(req, "mode")?.map(|m| m as u32);
                let mtime = opt_f64(req, "mtime")?;
                Ok((files::setattr(&path()?, mode, mtime)?, None))
            }
            "read" => {
                let (p, token) = (path()?, stream()?);
                let (file, entry) = files::open_read(&p, opt_u64(req, "offset")?.unwrap_or(0))?;
                Ok((json!({"entry": entry}), Some((token, Job::Read(file)))))
            }
            "write" => {
                let (p, token) = (path()?, stream()?);
                let cred = users::resolve_system(opt_str(req, "user")?.unwrap_or(""))?;
                let mode = opt_u64(req, "mode")?.map(|m| m as u32);
                let up = files::begin_write(
                    &p,
                    mode,
                    opt_f64(req, "mtime")?,
                    opt_bool(req, "parents")?.unwrap_or(true),
                    cred.as_ref(),
                )?;
                Ok((json!({}), Some((token, Job::Write(up)))))
            }
            "watch" => {
                let (p, token) = (path()?, stream()?);
                let w = Watch::new(&p, opt_bool(req, "recursive")?.unwrap_or(false))?;
                Ok((json!({}), Some((token, Job::Watch(w)))))
            }
            _ => Err(OpError::invalid(format!("unknown op \"{op}\""))),
        }
    }

    fn proc_of(&self, req: &Value) -> Result<Arc<Proc>, OpError> {
        let pid = req
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| OpError::invalid("field \"pid\" must be an integer"))?;
        self.table.get(pid as i32).ok_or_else(|| {
            OpError::new(
                "ESRCH",
                format!("no process {pid} started by this supervisor"),
                None,
            )
        })
    }

    fn exec(&self, req: &Value) -> Result<Launched, OpError> {
        let argv = str_list(req, "argv")?;
        if argv.is_empty() {
            return Err(OpError::invalid("field \"argv\" must not be empty"));
        }
        let mut env = match req.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(_) => str_list(req, "env")?,
        };
        let cred = users::resolve_system(opt_str(req, "user")?.unwrap_or(""))?;
        if let Some(home) = cred.as_ref().and_then(|c| c.home.clone())
            && !env.iter().any(|e| e.starts_with("HOME="))
        {
            env.push(format!("HOME={home}"));
        }
        let cwd = opt_str(req, "cwd")?.unwrap_or("").to_owned();
        let stdio = match req.get("pty") {
            None | Some(Value::Null) => Stdio::Pipes {
                stdin: opt_bool(req, "stdin")?.unwrap_or(true),
            },
            Some(p) if p.is_object() => {
                let (cols, rows) = size_of(p)?;
                Stdio::Pty { cols, rows }
            }
            Some(_) => {
                return Err(OpError::invalid(
                    "field \"pty\" must be null or {\"cols\",\"rows\"}",
                ));
            }
        };
        let exec = ExecReq {
            spec: Spec {
                argv,
                env,
                cwd,
                cred,
                stdio,
            },
            tag: opt_str(req, "tag")?.unwrap_or("").to_owned(),
            timeout_ms: opt_u64(req, "timeout_ms")?.unwrap_or(0),
        };
        self.table.start(exec, false)
    }
}

enum Job {
    Exec(Arc<Proc>, Option<std::fs::File>, Option<std::fs::File>),
    Attach(Arc<Proc>),
    Read(std::fs::File),
    Write(files::Upload),
    Watch(Watch),
}

impl Job {
    /// Runs on the request's thread once the data connection is up (None: it could not be made).
    fn run(self, conn: Option<UnixStream>) {
        match self {
            Job::Exec(proc, out, err) => {
                if let Some(out) = out {
                    let p = Arc::clone(&proc);
                    thread_small(move || p.pump(out, err));
                }
                // Output produced before this point waits in the pipe (or the ring).
                if let Some(c) = conn {
                    proc.attach(c);
                }
            }
            Job::Attach(proc) => {
                if let Some(c) = conn {
                    proc.attach(c);
                }
            }
            Job::Read(mut file) => {
                let Some(mut c) = conn else { return };
                let mut buf = vec![0u8; frame::CHUNK];
                loop {
                    match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if frame::write_frame(&mut c, frame::DATA, &buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            log(&format!("read stream: {e}"));
                            return; // no EOF frame: the agent sees an incomplete download
                        }
                    }
                }
                let _ = frame::write_frame(&mut c, frame::EOF, b"");
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            Job::Write(mut up) => {
                let Some(mut c) = conn else { return }; // dropping `up` removes the temp file
                let mut failed: Option<OpError> = None;
                loop {
                    match frame::read_frame(&mut c) {
                        Ok(Some(Frame::Bytes(frame::DATA, data))) => {
                            if failed.is_none()
                                && let Err(e) = std::io::Write::write_all(
                                    up.file.as_mut().expect("open until commit"),
                                    &data,
                                )
                            {
                                failed = Some(OpError::io(&e, "write", &up.path));
                            }
                        }
                        Ok(Some(Frame::Eof)) => break,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => return, // dropped before EOF: the old file stays
                    }
                }
                let result = match failed {
                    Some(e) => Err(e),
                    None => up.commit(),
                };
                let answer = match result {
                    Ok(v) => v,
                    Err(e) => json!({"ok": false, "error": e.to_json()}),
                };
                let _ = frame::write_json(&mut c, &answer);
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            Job::Watch(w) => {
                if let Some(c) = conn {
                    w.run(c);
                }
            }
        }
    }
}

static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Channel diagnostics on (`FSB_SUPERVISOR_DEBUG=1` given to PID 1).
pub fn set_debug(on: bool) {
    DEBUG.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A channel diagnostic. PID 1's stderr is the sandbox's own stderr — what `fsb logs` shows
/// the user — so connects, losses and redials (every agent restart makes some) stay out of it
/// unless debugging was asked for; the agent logs the channel's state on its side.
pub fn log(msg: &str) {
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("fsb-supervisor: {msg}");
    }
}

fn str_field<'a>(req: &'a Value, name: &str) -> Result<&'a str, OpError> {
    req.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| OpError::invalid(format!("field \"{name}\" must be a string")))
}

fn opt_str<'a>(req: &'a Value, name: &str) -> Result<Option<&'a str>, OpError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(OpError::invalid(format!(
            "field \"{name}\" must be a string"
        ))),
    }
}

fn opt_u64(req: &Value, name: &str) -> Result<Option<u64>, OpError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            OpError::invalid(format!("field \"{name}\" must be a non-negative integer"))
        }),
    }
}

fn opt_f64(req: &Value, name: &str) -> Result<Option<f64>, OpError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| OpError::invalid(format!("field \"{name}\" must be a number"))),
    }
}

fn opt_bool(req: &Value, name: &str) -> Result<Option<bool>, OpError> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| OpError::invalid(format!("field \"{name}\" must be a boolean"))),
    }
}

fn str_list(req: &Value, name: &str) -> Result<Vec<String>, OpError> {
    let bad = || OpError::invalid(format!("field \"{name}\" must be a list of strings"));
    req.get(name)
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
        .collect()
}

fn size_of(v: &Value) -> Result<(u16, u16), OpError> {
    let get = |k: &str| {
        let v = v.get("resize").unwrap_or(v);
        v.get(k)
            .and_then(Value::as_u64)
            .filter(|n| (1..=u16::MAX as u64).contains(n))
            .map(|n| n as u16)
            .ok_or_else(|| OpError::invalid(format!("field \"{k}\" must be an integer 1..65535")))
    };
    Ok((get("cols")?, get("rows")?))
}
