//! External programs run by the client tests: long-running daemons (containerd,
//! dockerd) in a process group of their own, killed as a group on drop, and
//! one-shot commands (docker, podman, ctr, python) with a time limit, their
//! output kept in files of the test's directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt as _;

/// How long one client command may run before it is killed and counted as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);

/// A daemon in its own process group, with stdout and stderr in `log`.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Spawn `command` as the leader of a new process group. Fails the test (with
    /// the reason) when it cannot be started at all.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Daemon {
        let out = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} could not be started: {e}"));
        Daemon {
            name: name.to_owned(),
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_text(), n)
    }

    /// Poll `ready` until it holds; fails the test with the daemon's log when the
    /// daemon exits first or `within` passes.
    pub fn wait_until(&mut self, what: &str, within: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited with {status} before {what}; the last lines of its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            if start.elapsed() > within {
                panic!(
                    "{} did not reach \"{what}\" within {within:?}; the last lines of its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM to the whole process group, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let group = format!("-{}", child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the group (shims, helpers) goes too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    /// `program arg …`, for messages.
    pub what: String,
    /// `None` when it was killed for taking too long.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// stdout and stderr together, for matching error messages.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// A readable account: the command, how it ended, and its output.
    pub fn describe(&self) -> String {
        let ended = match self.status {
            Some(status) => status.to_string(),
            None => format!("killed after {COMMAND_TIMEOUT:?}"),
        };
        format!(
            "`{}` ended with {ended}\n  stdout: {}\n  stderr: {}",
            self.what,
            tail(self.stdout.trim(), 15).replace('\n', "\n          "),
            tail(self.stderr.trim(), 15).replace('\n', "\n          ")
        )
    }

    /// `Ok(stdout)` when the command succeeded, else `Err(describe())`.
    pub fn ok(self) -> Result<String, String> {
        if self.success() {
            Ok(self.stdout)
        } else {
            Err(self.describe())
        }
    }
}

static RUN_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run `command` to completion (or `COMMAND_TIMEOUT`), its own process group,
/// with `stdin` fed in and stdout/stderr kept in files under `dir`.
pub fn run(dir: &Path, mut command: Command, stdin: Option<&str>) -> Run {
    let what = describe_command(&command);
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    std::fs::create_dir_all(dir).expect("create command output directory");
    let out_path = dir.join(format!("cmd-{n}.stdout"));
    let err_path = dir.join(format!("cmd-{n}.stderr"));
    let in_path = dir.join(format!("cmd-{n}.stdin"));
    std::fs::write(&in_path, stdin.unwrap_or("")).expect("write stdin file");
    command
        .stdin(File::open(&in_path).expect("open stdin file"))
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Run {
                what,
                status: None,
                stdout: String::new(),
                stderr: format!("could not start: {e}"),
            };
        }
    };
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_file(&in_path);
    Run {
        what,
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

fn describe_command(command: &Command) -> String {
    let mut parts = vec![command.get_program().to_string_lossy().into_owned()];
    parts.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Fails the test, naming the package to install, when `program` is not on PATH;
/// returns its full path.
pub fn require(program: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{program} not found on PATH: {install}"))
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
