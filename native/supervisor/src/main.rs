//! fsb-supervisor: PID 1 of every Fast Sandbox sandbox (native/supervisor/PROTOCOL.md).
//!
//! As init it reaps every child, forwards job/termination signals to the main process's group
//! and exits with the main process's status (128+N when killed by N); exit codes of its own are
//! 2 usage, 126 main not executable, 127 main not found. With FSB_CHANNEL it also serves its
//! agent over the channel. Signals are blocked in every thread and taken synchronously by the
//! main thread (sigwaitinfo), so none is lost and no handler runs in odd contexts.

mod auth;
mod channel;
mod errors;
mod files;
mod frame;
mod hostname;
mod procs;
mod spawn;
mod users;
mod warm;
mod watch;

use procs::{ExecReq, Table};
use spawn::{Spec, Stdio};
use std::path::PathBuf;
use std::sync::Arc;

const EXIT_USAGE: i32 = 2;
const FORWARDED: [i32; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

fn usage() -> ! {
    eprintln!(
        "usage: fsb-supervisor [--] [COMMAND [ARG...]]   (no COMMAND: stay up idle)\n       \
         fsb-supervisor --warm   (wait for the agent's start_main; needs FSB_CHANNEL)"
    );
    std::process::exit(EXIT_USAGE);
}

fn die(what: &str) -> ! {
    eprintln!(
        "fsb-supervisor: {what}: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

struct Config {
    channel: Option<channel::Channel>,
}

/// Reads and then removes every FSB_* variable (before any thread exists, so removing is safe).
fn take_env(table: &Arc<Table>, warm: Option<Arc<warm::WarmMain>>) -> Config {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let dir = get("FSB_CHANNEL");
    let secret = get("FSB_SUPERVISOR_SECRET");
    let sandbox = get("FSB_SANDBOX_ID").unwrap_or_default();
    channel::set_debug(get("FSB_SUPERVISOR_DEBUG").as_deref() == Some("1"));
    wipe_secret_in_place();
    let keys: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("FSB_"))
        .collect();
    for k in keys {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::remove_var(k) };
    }
    let channel = dir.map(|d| {
        let secret = match secret.as_deref().and_then(auth::unhex) {
            Some(s) if s.len() == 32 => s,
            _ => {
                eprintln!(
                    "fsb-supervisor: FSB_SUPERVISOR_SECRET must be 64 hex characters (32 bytes)"
                );
                std::process::exit(EXIT_USAGE);
            }
        };
        channel::Channel {
            socket: PathBuf::from(d).join("agent.sock"),
            secret,
            sandbox,
            table: Arc::clone(table),
            warm,
            parked: Default::default(),
        }
    });
    Config { channel }
}

unsafe extern "C" {
    static mut environ: *mut *mut libc::c_char;
}

/// Overwrites the secret's value in the process's original environment block, which is what
/// /proc/1/environ shows (unsetenv only drops the pointer). PR_SET_DUMPABLE already keeps
/// sandbox code out of that file; this holds even where a runtime's kernel (gVisor) might not.
fn wipe_secret_in_place() {
    const NAME: &[u8] = b"FSB_SUPERVISOR_SECRET=";
    // SAFETY: single-threaded; environ is a NULL-terminated array of NUL-terminated strings,
    // and only the bytes of one value (up to its NUL) are overwritten.
    unsafe {
        let mut p = environ;
        while !p.is_null() && !(*p).is_null() {
            let entry = *p;
            let len = libc::strlen(entry);
            let bytes = std::slice::from_raw_parts_mut(entry.cast::<u8>(), len);
            if bytes.starts_with(NAME) {
                bytes[NAME.len()..].fill(b'0');
            }
            p = p.add(1);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut warm_mode = false;
    let argv: Vec<String> = match args.first().map(String::as_str) {
        Some("--") => args[1..].to_vec(),
        Some("--warm") if args.len() == 1 => {
            warm_mode = true;
            Vec::new()
        }
        Some(a) if a.starts_with('-') => usage(),
        _ => args,
    };
    // The same two modes from the environment, so PID 1's command line is `/.fsb/init` alone
    // either way (sandbox code can read /proc/1/cmdline: a warm and a cold sandbox must not
    // differ there, and the main command is the sandbox's business, not PID 1's).
    let mut argv = argv;
    if argv.is_empty() && !warm_mode {
        if std::env::var("FSB_WARM").as_deref() == Ok("1") {
            warm_mode = true;
        } else if let Ok(main) = std::env::var("FSB_MAIN") {
            argv = match serde_json::from_str::<Vec<String>>(&main) {
                Ok(a) if !a.is_empty() => a,
                _ => {
                    eprintln!("fsb-supervisor: FSB_MAIN must be a JSON list of strings");
                    std::process::exit(EXIT_USAGE);
                }
            };
        }
    }
    // SAFETY: plain prctl calls. Not dumpable: sandbox code cannot read our environ or memory
    // (first, while the secret is still in our environment).
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 {
            die("prctl(PR_SET_DUMPABLE)");
        }
        // Adopt orphans even when not PID 1 (tests, nested runtimes); a no-op for a PID 1.
        if libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0 {
            die("prctl(PR_SET_CHILD_SUBREAPER)");
        }
    }
    let table = Arc::new(Table::default());
    let mut config = take_env(&table, None);
    if warm_mode && config.channel.is_none() {
        eprintln!("fsb-supervisor: --warm needs FSB_CHANNEL (start_main comes from the agent)");
        std::process::exit(EXIT_USAGE);
    }
    // Still single-threaded: a warm supervisor holding CAP_SYS_ADMIN (for the hostname) hands
    // it to a helper and drops it for good here, before any thread or child exists.
    let warm: Option<Arc<warm::WarmMain>> = warm_mode.then(|| match hostname::Hostname::start() {
        Ok(h) => Arc::new(warm::WarmMain::new(h)),
        Err(e) => {
            eprintln!("fsb-supervisor: {e}");
            std::process::exit(1);
        }
    });
    if let Some(ch) = config.channel.as_mut() {
        ch.warm = warm.clone();
    }
    // Block everything before any thread or child exists; the main thread takes signals below.
    // SAFETY: sigset manipulation on a local.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        if libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()) != 0 {
            die("sigprocmask");
        }
    }

    // Read once here, off a warm claim's path (each of its 64 syscalls traps inside gVisor).
    spawn::ignored();
    let main_pid = if argv.is_empty() {
        None
    } else {
        let env: Vec<String> = std::env::vars_os()
            .filter_map(|(k, v)| {
                Some(format!(
                    "{}={}",
                    k.into_string().ok()?,
                    v.into_string().ok()?
                ))
            })
            .collect();
        let spec = Spec {
            argv: argv.clone(),
            env,
            cwd: String::new(),
            cred: None,
            stdio: Stdio::Inherit,
        };
        match table.start(
            ExecReq {
                spec,
                tag: "main".into(),
                timeout_ms: 0,
            },
            true,
        ) {
            Ok((p, _, _)) => Some(p),
            Err(e) => {
                eprintln!("fsb-supervisor: {}", e.message);
                // The failed child exits 126/127 itself; reap it so no zombie is left behind.
                table.reap();
                std::process::exit(if e.code == "EACCES" { 126 } else { 127 });
            }
        }
    };
    if let Some(ch) = config.channel {
        let ch = Arc::new(ch);
        procs::thread_small(move || ch.run());
    }

    let pid1 = std::process::id() == 1;
    loop {
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for any (blocked) signal.
        let sig = unsafe { libc::sigwaitinfo(&all, &mut info) };
        if sig < 0 {
            continue; // EINTR
        }
        // A warm supervisor's main process appears when the agent sends start_main.
        let main_pid = main_pid
            .clone()
            .or_else(|| warm.as_ref().and_then(|w| w.main()));
        if sig == libc::SIGCHLD {
            let reaped = table.reap();
            // By the table (not main_pid): a warm main process may exit before start_main's
            // thread has published it.
            let main_exit = reaped
                .iter()
                .find(|(pid, _)| table.get(*pid).is_some_and(|p| p.main));
            if let Some((_, status)) = main_exit {
                if let Some(w) = &warm {
                    w.wait_replied(std::time::Duration::from_secs(5));
                }
                let code = procs::exit_code(*status).0;
                if pid1 {
                    // SAFETY: as PID 1, kill(-1) reaches exactly the rest of the sandbox.
                    unsafe { libc::kill(-1, libc::SIGKILL) };
                } else {
                    table.kill_all();
                }
                std::process::exit(code);
            }
        } else if FORWARDED.contains(&sig) {
            match &main_pid {
                // ESRCH: the main process already exited; its SIGCHLD is pending.
                Some(main) => {
                    let _ = main.signal(sig);
                }
                None if sig == libc::SIGTERM || sig == libc::SIGINT => {
                    if !pid1 {
                        table.kill_all();
                    }
                    std::process::exit(0);
                }
                None => {}
            }
        }
        // Anything else is dropped, as PID 1 would ignore it anyway.
    }
}
