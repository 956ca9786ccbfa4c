//! Stopping a build: Ctrl-C or SIGTERM ends every process it started.
//!
//! Every program a build runs (mmdebstrap with its apt and dpkg, mke2fs,
//! mksquashfs, qemu-img, xorriso, …) is started through [`spawn`] or
//! [`output`]: in a process group of its own, recorded here while it runs.
//! A terminal's Ctrl-C then reaches only kiln, which calls [`stop`]: every
//! recorded group gets SIGKILL at once (mmdebstrap would wait out its
//! children on SIGTERM, and dpkg defers signals), no new program starts,
//! and the build's waits return [`Error::Interrupted`], so it unwinds
//! through its own error path and its temporary directories are removed as
//! on any failure. The cache and earlier outputs are never written in place
//! (temporary names, atomic renames), so they stay usable.
//!
//! A group per program rather than one for the build: kiln itself stays in
//! the terminal's group and hears Ctrl-C; its children do not, so none of
//! them dies half-way on its own before kiln knows.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::Error;

/// The build's programs, and whether it was stopped. One per process
/// (`BUILD`), behind the free functions.
pub struct Stopper {
    /// The running programs' process groups (each led by the program).
    groups: Mutex<BTreeSet<i32>>,
    /// The signal that stopped the build; 0 while it runs.
    stopped: AtomicI32,
}

/// This process's build.
static BUILD: Stopper = Stopper::new();

/// Stops the build because of `signal`: kills every program it runs, and
/// any it would start next. Safe to call from any thread, more than once.
pub fn stop(signal: Signal) {
    BUILD.stop(signal);
}

/// The signal that stopped the build, if one did.
pub fn stopped() -> Option<Signal> {
    BUILD.stopped()
}

/// `Err(Interrupted)` once the build is stopped.
pub fn check() -> Result<(), Error> {
    BUILD.check()
}

/// Starts `cmd` in a process group of its own, unless the build is stopped.
pub fn spawn(cmd: &mut Command) -> Result<Running, Error> {
    BUILD.spawn(cmd)
}

/// Runs `cmd` to its end, as [`Command::output`] (stdin empty, stdout and
/// stderr collected), in a group of its own.
pub fn output(cmd: &mut Command) -> Result<Output, Error> {
    use std::process::Stdio;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

impl Stopper {
    const fn new() -> Stopper {
        Stopper { groups: Mutex::new(BTreeSet::new()), stopped: AtomicI32::new(0) }
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, BTreeSet<i32>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self, signal: Signal) {
        let groups = self.groups();
        // Set under the lock: a spawn either sees it or is in `groups`.
        let _ = self.stopped.compare_exchange(0, signal as i32, Ordering::SeqCst, Ordering::SeqCst);
        for &pgid in groups.iter() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    fn stopped(&self) -> Option<Signal> {
        Signal::try_from(self.stopped.load(Ordering::SeqCst)).ok()
    }

    fn check(&self) -> Result<(), Error> {
        match self.stopped() {
            Some(signal) => Err(Error::Interrupted { signal: signal.as_str() }),
            None => Ok(()),
        }
    }

    fn spawn(&'static self, cmd: &mut Command) -> Result<Running, Error> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut groups = self.groups();
        self.check()?;
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Spawn { program: program.clone(), source })?;
        groups.insert(child.id() as i32);
        Ok(Running { child, program, stopper: self })
    }
}

/// A running program, in its own process group until it is waited for.
pub struct Running {
    child: Child,
    program: String,
    stopper: &'static Stopper,
}

impl Running {
    /// The program's handle (for its stdin and stdout).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for it and collects its output, as [`Command::output`];
    /// [`Error::Interrupted`] when the build was stopped meanwhile.
    pub fn wait_with_output(self) -> Result<Output, Error> {
        let Running { child, program, stopper } = self;
        let pid = child.id() as i32;
        let out = child.wait_with_output();
        stopper.groups().remove(&pid);
        stopper.check()?;
        out.map_err(|source| Error::Spawn { program, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stopping is for good.
    #[test]
    fn stop_kills_what_runs_and_refuses_what_comes() {
        static TEST: Stopper = Stopper::new();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo $$ $(ps -o pgid= -p $$)"]).stdout(std::process::Stdio::piped());
        let out = TEST.spawn(&mut cmd).unwrap().wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        assert!(words.len() == 2 && words[0] == words[1], "the program leads its own group: {text}");
        assert!(TEST.groups().is_empty(), "a finished program is forgotten");

        // A shell and its child, which ignores SIGINT and SIGTERM.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' INT TERM; sleep 30 & wait"]).stdout(std::process::Stdio::null());
        let running_now = TEST.spawn(&mut cmd).unwrap();
        let started = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let pgid = Pid::from_raw(running_now.child.id() as i32);
        let stopper = std::thread::spawn(|| TEST.stop(Signal::SIGINT));
        let err = running_now.wait_with_output().unwrap_err();
        stopper.join().unwrap();
        assert!(matches!(err, Error::Interrupted { signal: "SIGINT" }), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "stopped at once");
        // The whole group is dead, the shell's child too (allow the kernel
        // a moment; an orphan's zombie waits for init to reap it).
        let alive = || {
            let ps = Command::new("ps").args(["-o", "pid=,stat=,comm=", "-g"]).arg(pgid.to_string()).output().unwrap();
            String::from_utf8_lossy(&ps.stdout)
                .lines()
                .filter(|l| !l.split_whitespace().nth(1).unwrap_or("").starts_with('Z'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let gone = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            alive().is_empty()
        });
        assert!(gone, "no process of the group runs: {:?}", alive());
        assert!(matches!(TEST.spawn(&mut Command::new("true")), Err(Error::Interrupted { .. })), "nothing starts after a stop");
        assert_eq!(TEST.stopped(), Some(Signal::SIGINT));
        assert_eq!(BUILD.stopped(), None, "the build itself goes on");
    }
}
