//! Exponential backoff between retries: the first wait, doubling to a
//! maximum, back to the first after a success.
//!
//! The one retry pace of the agent: registration (200 ms to 10 s),
//! discovery of the node's identity and uplink, and the flannel loop (peers
//! watch, device setup). Waiting is `tokio::time::sleep`, so a task that
//! backs off never holds its runtime: the shutdown signal is still heard.

use std::time::Duration;

/// Exponential backoff: `first`, doubling up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    /// 200 ms, the first wait of every backoff in the agent.
    pub const FIRST: Duration = Duration::from_millis(200);

    /// A backoff from [`Backoff::FIRST`] doubling up to `max`.
    pub fn new(max: Duration) -> Self {
        Self::between(Self::FIRST, max)
    }

    /// A backoff from `first` doubling up to `max` (`first == max`: a fixed pace).
    pub fn between(first: Duration, max: Duration) -> Self {
        Backoff { next: first, first, max: max.max(first) }
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The next wait.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Sleeps the next wait, then doubles it (up to the maximum).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn doubles_to_the_max_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::between(ms(1), ms(5));
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(b.peek());
            b.wait().await;
        }
        assert_eq!(seen, [ms(1), ms(2), ms(4), ms(5), ms(5)]);
        b.reset();
        assert_eq!(b.peek(), ms(1));
        assert_eq!(Backoff::new(Duration::from_secs(10)).peek(), Backoff::FIRST);
        assert_eq!(Backoff::between(ms(2), ms(1)).peek(), ms(2), "a maximum below the first wait is the first wait");
    }
}
