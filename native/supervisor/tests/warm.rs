//! `--warm` + `start_main` end to end: the real binary dials a listener playing the agent (the
//! handshake of PROTOCOL.md), waits, and starts its main process only when told. Timeouts only
//! bound a failing test.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: [u8; 32] = [7u8; 32];
const BOUND: Duration = Duration::from_secs(10);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn proof(label: &str, nonce: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&SECRET).unwrap();
    mac.update(label.as_bytes());
    mac.update(nonce.as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn write_json(conn: &mut UnixStream, v: &Value) {
    let body = serde_json::to_vec(v).unwrap();
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(1);
    frame.extend(body);
    conn.write_all(&frame).unwrap();
}

fn read_json(conn: &mut UnixStream) -> Value {
    let mut head = [0u8; 5];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(head[4], 1, "a JSON frame");
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize - 1;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

struct Warm {
    child: Child,
    control: UnixStream,
    dir: PathBuf,
}

impl Drop for Warm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `fsb-supervisor --warm` and accepts its control connection.
fn start(name: &str) -> Warm {
    start_with(name, &["--warm"], &[])
}

/// Starts the supervisor with `args` and `env` (plus the channel's) and accepts its control
/// connection.
fn start_with(name: &str, args: &[&str], env: &[(&str, &str)]) -> Warm {
    start_cmd(name, env!("CARGO_BIN_EXE_fsb-supervisor"), args, env)
}

/// Starts `program args` (the supervisor, or a wrapper that execs it) with `env` plus the
/// channel's, and accepts its control connection.
fn start_cmd(name: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Warm {
    let dir = std::env::temp_dir().join(format!("fsb-warm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listener = UnixListener::bind(dir.join("agent.sock")).unwrap();
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .env("FSB_CHANNEL", &dir)
        .env("FSB_SUPERVISOR_SECRET", hex(&SECRET))
        .env("FSB_SANDBOX_ID", "warm-test")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut control, _) = listener.accept().unwrap();
    control.set_read_timeout(Some(BOUND)).unwrap();
    let nonce = hex(&[1u8; 32]);
    write_json(&mut control, &json!({"v": 1, "nonce": nonce}));
    let hello = read_json(&mut control);
    assert_eq!(hello["role"], "control");
    assert_eq!(hello["proof"], proof("sup:", &nonce));
    let sup_nonce = hello["nonce"].as_str().unwrap().to_owned();
    write_json(
        &mut control,
        &json!({"ok": true, "proof": proof("agent:", &sup_nonce)}),
    );
    Warm {
        child,
        control,
        dir,
    }
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "supervisor did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn output(child: &mut Child) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

#[test]
fn start_main_runs_the_main_process_on_pid1s_stdio_and_exits_with_its_status() {
    let mut w = start("main");
    // Waiting: nothing runs but the supervisor.
    write_json(&mut w.control, &json!({"id": 1, "op": "ps"}));
    let ps = read_json(&mut w.control);
    assert_eq!(ps["processes"], json!([]));
    let cwd = w.dir.join("made/by/start_main");
    write_json(
        &mut w.control,
        &json!({"id": 2, "op": "start_main",
                "argv": ["/bin/sh", "-c", "echo \"hi $A $HOME\"; pwd; echo oops >&2; exit 7"],
                "env": ["A=1", "PATH=/usr/bin:/bin"], "cwd": cwd}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["id"], 2);
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(reply["pid"].as_i64().unwrap() > 0);
    let status = wait(&mut w.child);
    assert_eq!(status.code(), Some(7));
    let (out, err) = output(&mut w.child);
    let home = std::env::var("HOME").unwrap_or_default();
    assert_eq!(out, format!("hi 1 {home}\n{}\n", cwd.display()));
    assert_eq!(err, "oops\n");
}

#[test]
fn a_second_start_main_is_refused() {
    let mut w = start("twice");
    let main = json!({"op": "start_main", "argv": ["/bin/sleep", "30"]});
    let mut first = main.clone();
    first["id"] = json!(1);
    write_json(&mut w.control, &first);
    assert_eq!(read_json(&mut w.control)["ok"], true);
    let mut second = main;
    second["id"] = json!(2);
    write_json(&mut w.control, &second);
    let reply = read_json(&mut w.control);
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "EBUSY");
    // SIGTERM now goes to the main process (forwarded), whose death ends the supervisor.
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(w.child.id() as i32, libc::SIGTERM) };
    let status = wait(&mut w.child);
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
}

#[test]
fn sigterm_while_waiting_ends_the_supervisor_cleanly() {
    let mut w = start("term");
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(w.child.id() as i32, libc::SIGTERM) };
    let status = wait(&mut w.child);
    assert_eq!(status.code(), Some(0), "{status:?} {:?}", status.signal());
}

#[test]
fn an_unexecutable_main_ends_the_supervisor_with_127_as_a_cold_start_would() {
    let mut w = start("enoent");
    write_json(
        &mut w.control,
        &json!({"id": 1, "op": "start_main", "argv": ["/nonexistent/x"]}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["ok"], false);
    assert_eq!(reply["error"]["code"], "ENOENT");
    let status = wait(&mut w.child);
    assert_eq!(status.code(), Some(127));
    let (_, err) = output(&mut w.child);
    assert!(
        err.contains("exec /nonexistent/x: No such file or directory"),
        "{err}"
    );
}

#[test]
fn bad_fields_are_refused_and_the_supervisor_keeps_waiting() {
    let mut w = start("bad");
    write_json(
        &mut w.control,
        &json!({"id": 1, "op": "start_main", "argv": ["x"], "cwd": "relative"}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["error"]["code"], "EINVAL");
    assert!(reply["error"]["message"].as_str().unwrap().contains("cwd"));
    write_json(
        &mut w.control,
        &json!({"id": 2, "op": "start_main", "argv": ["/bin/true"]}),
    );
    assert_eq!(read_json(&mut w.control)["ok"], true);
    assert_eq!(wait(&mut w.child).code(), Some(0));
}

#[test]
fn warm_and_main_can_come_from_the_environment_leaving_the_command_line_bare() {
    let mut w = start_with("envwarm", &[], &[("FSB_WARM", "1")]);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", w.child.id())).unwrap();
    assert!(!cmdline.ends_with(b"--warm\0"), "{cmdline:?}");
    write_json(
        &mut w.control,
        &json!({"id": 1, "op": "start_main", "argv": ["/bin/sh", "-c", "echo \"$FSB_WARM.\"; exit 4"]}),
    );
    assert_eq!(read_json(&mut w.control)["ok"], true);
    assert_eq!(wait(&mut w.child).code(), Some(4));
    assert_eq!(
        output(&mut w.child).0,
        ".\n",
        "FSB_* never reaches the main process"
    );

    // The main process waits for a file, so the supervisor is still up for the handshake.
    let go = std::env::temp_dir().join(format!("fsb-warm-envmain-{}/go", std::process::id()));
    let main = format!(
        r#"["/bin/sh","-c","while [ ! -e {} ]; do sleep 0.01; done; echo cold; exit 5"]"#,
        go.display()
    );
    let mut c = start_with("envmain", &[], &[("FSB_MAIN", &main)]);
    write_json(
        &mut c.control,
        &json!({"id": 1, "op": "start_main", "argv": ["/bin/true"]}),
    );
    let reply = read_json(&mut c.control);
    assert_eq!(
        reply["error"]["code"], "EINVAL",
        "a cold supervisor has its main already"
    );
    std::fs::write(&go, b"").unwrap();
    assert_eq!(wait(&mut c.child).code(), Some(5));
    assert_eq!(output(&mut c.child).0, "cold\n");
}

/// The supervisor in a UTS namespace of its own (so setting a hostname never touches the
/// host's): `unshare` execs it, so the child's pid is the supervisor's.
fn start_in_own_uts(name: &str) -> Warm {
    let bin = env!("CARGO_BIN_EXE_fsb-supervisor");
    // SAFETY: plain geteuid(2).
    let args: &[&str] = if unsafe { libc::geteuid() } == 0 {
        &["--uts", "--", bin, "--warm"]
    } else {
        &["--user", "--map-root-user", "--uts", "--", bin, "--warm"]
    };
    start_cmd(name, "unshare", args, &[])
}

fn caps(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_owned(), u64::from_str_radix(v.trim(), 16).unwrap())
        })
        .collect()
}

/// Children of every thread of `pid` (a `children` file lists one thread's).
fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(text.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    out.sort_unstable();
    out
}

const SYS_ADMIN: u64 = 1 << 21;

#[test]
fn start_main_sets_the_hostname_and_nothing_keeps_cap_sys_admin_after_it() {
    let mut w = start_in_own_uts("hostname");
    let sup = w.child.id();
    // Waiting: the supervisor itself dropped CAP_SYS_ADMIN at startup; only its helper has it.
    for (set, value) in caps(sup) {
        assert_eq!(
            value & SYS_ADMIN,
            0,
            "the supervisor's {set} holds CAP_SYS_ADMIN"
        );
    }
    let helpers = children(sup);
    assert_eq!(helpers.len(), 1, "one helper: {helpers:?}");
    let helper_caps = caps(helpers[0]);
    assert!(
        helper_caps
            .iter()
            .any(|(k, v)| k == "CapEff" && v & SYS_ADMIN != 0)
    );

    // A bad hostname is refused before anything changes; the helper stays for the next try.
    write_json(
        &mut w.control,
        &json!({"id": 1, "op": "start_main", "argv": ["/bin/true"], "hostname": "a".repeat(65)}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["error"]["code"], "EINVAL", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hostname")
    );
    assert_eq!(children(sup), helpers);

    let script = "cat /proc/sys/kernel/hostname; grep ^Cap /proc/self/status; \
                  cat /proc/$PPID/task/*/children; echo; read _; exit 0";
    write_json(
        &mut w.control,
        &json!({"id": 2, "op": "start_main", "argv": ["/bin/sh", "-c", script],
                "hostname": "claimed-sbx"}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["ok"], true, "{reply}");
    let main = reply["pid"].as_u64().unwrap() as u32;
    // The helper is gone before the main process starts: the main is the only child.
    assert_eq!(children(sup), vec![main]);
    let sup_caps = caps(sup);
    drop(w.child.stdin.take());
    let status = wait(&mut w.child);
    assert_eq!(status.code(), Some(0));
    let (out, _) = output(&mut w.child);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("claimed-sbx"));
    let main_caps: Vec<(String, u64)> = lines
        .by_ref()
        .take(5)
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_owned(), u64::from_str_radix(v.trim(), 16).unwrap())
        })
        .collect();
    assert_eq!(main_caps.len(), 5, "{out}");
    for (set, value) in &main_caps {
        assert_eq!(
            value & SYS_ADMIN,
            0,
            "the main process's {set} holds CAP_SYS_ADMIN"
        );
    }
    // Exactly the supervisor's own (reduced) sets, as a cold main process inherits them.
    let bnd = |c: &[(String, u64)]| c.iter().find(|(k, _)| k == "CapBnd").unwrap().1;
    assert_eq!(bnd(&main_caps), bnd(&sup_caps));
    assert_eq!(lines.next().map(str::trim), Some(main.to_string().as_str()));
}

#[test]
fn start_main_without_a_hostname_still_ends_the_helper() {
    let mut w = start_in_own_uts("nohostname");
    let sup = w.child.id();
    assert_eq!(children(sup).len(), 1);
    write_json(
        &mut w.control,
        &json!({"id": 1, "op": "start_main", "argv": ["/bin/sh", "-c", "read _; exit 0"]}),
    );
    let reply = read_json(&mut w.control);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(children(sup), vec![reply["pid"].as_u64().unwrap() as u32]);
    drop(w.child.stdin.take());
    assert_eq!(wait(&mut w.child).code(), Some(0));
}
