//! RUN: a command in a sandbox on the step's new snapshot, its output streamed into the log.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use sandbox::{Stdio, User};

use super::{step_err, BuildError, Run};
use crate::config::ImageConfig;
use crate::dockerfile::Step;

impl Run<'_> {
    pub(super) fn run(
        &mut self,
        step: &Step,
        rootfs: &Path,
        argv: &[String],
        env: &[(String, String)],
        config: &ImageConfig,
    ) -> Result<(), BuildError> {
        self.say(" ---> Running in a sandbox")?;
        self.stats.executed_runs += 1;
        let (r, w) = nix::unistd::pipe().map_err(|e| step_err(step, format!("pipe: {e}")))?;
        let w2: OwnedFd = w
            .try_clone()
            .map_err(|e| step_err(step, format!("pipe: {e}")))?;
        let mut sb = self
            .builder
            .store
            .target(rootfs)
            .sandbox()
            .command(argv)
            .policy(self.opts.policy.clone())
            .network(self.opts.network)
            .cwd(if config.workdir.is_empty() {
                "/"
            } else {
                &config.workdir
            })
            .stdout(Stdio::Fd(w))
            .stderr(Stdio::Fd(w2));
        if !config.user.is_empty() {
            sb = sb.user(User::Spec(config.user.clone()));
        }
        for (k, v) in env {
            sb = sb.env(k, v);
        }
        if let Some(t) = self.opts.run_timeout {
            sb = sb.timeout(t);
        }
        let mut child = sb.spawn().map_err(|e| step_err(step, e.to_string()))?;
        // Both streams share one pipe: stream it into the log as it comes.
        let mut reader = std::fs::File::from(r);
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.log.write_all(&buf[..n]).map_err(BuildError::Log)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(step_err(step, format!("reading the output: {e}"))),
            }
        }
        let status = child.wait().map_err(|e| step_err(step, e.to_string()))?;
        if status.success() {
            return Ok(());
        }
        let command = argv.join(" ");
        match status {
            sandbox::ExitStatus::Exited(code) => Err(BuildError::Run {
                command,
                code,
                status,
            }),
            other => Err(BuildError::Step {
                step: step.text.chars().take(80).collect(),
                line: step.line,
                message: format!("The command '{command}' {other}"),
            }),
        }
    }
}
