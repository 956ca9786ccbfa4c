//! `kiln check`: starts a connectivity check on the server and follows it
//! to its verdicts ([`kiln_core::check`]).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kiln_core::CheckResult;

/// How often a running check is read.
const POLL: Duration = Duration::from_millis(250);

/// Runs a check through `client` (an operator's) and waits at most
/// `timeout` for its verdicts.
pub async fn run(client: &kiln_client::Client, timeout: Duration) -> Result<CheckResult> {
    let started = client.start_check().await?;
    let deadline = Instant::now() + timeout;
    loop {
        let result = client.check(&started.id).await?;
        if result.done {
            return Ok(result);
        }
        if Instant::now() >= deadline {
            bail!("check {} still running after {} s", started.id, timeout.as_secs());
        }
        tokio::time::sleep(POLL).await;
    }
}
