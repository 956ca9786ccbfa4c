//! Reading a node's metrics: `GET http://HOST:PORT/metrics`, node_exporter's
//! text format, as the agent serves it.
//!
//! For the control plane's autoscaler, which reads its pools' nodes at the
//! address they registered (`Node::metrics_target`). A [`Scraper`] is one
//! connection pool and one time limit for every scrape: make one, and fetch
//! from many nodes at once with it. Parsing the text is the caller's
//! (kiln-pool's autoscaler reads `node_load1` and the CPU times).

use std::time::Duration;

use crate::{Error, text};

/// Reads nodes' `/metrics`, each request limited to a timeout.
#[derive(Debug, Clone)]
pub struct Scraper {
    http: reqwest::Client,
}

impl Scraper {
    /// A scraper whose requests each give up after `timeout` (connecting included).
    pub fn new(timeout: Duration) -> Result<Scraper, Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("kiln-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Build { url: "http://HOST:PORT/metrics".into(), source })?;
        Ok(Scraper { http })
    }

    /// `GET http://TARGET/metrics` (`TARGET` is `host:port`): the text.
    pub async fn fetch(&self, target: &str) -> Result<String, Error> {
        let url = format!("http://{target}/metrics");
        let builder = self.http.get(&url);
        text("GET /metrics", url, builder).await
    }
}
