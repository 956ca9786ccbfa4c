//! The join parameters: what a node needs to join the control plane.
//!
//! The server writes them on a booting node's kernel command line (the iPXE
//! script) or into the seed's file [`SEED_CMDLINE_PATH`] (for a disk-booted
//! node, whose kernel command line kiln does not write); the agent parses
//! them from either, as both are in the kernel command line's syntax.
//! [`JoinParams`] is the one place that spells them: the keys are
//! [`CMDLINE_SERVER`], [`CMDLINE_TOKEN`] and [`CMDLINE_IMAGE_DIGEST`]. Other
//! kernel arguments kiln adds (the hostname, a diskless node's root
//! filesystem) are not for the agent and are not here. The CA the agent
//! trusts is baked into the image at [`IMAGE_CA_PATH`].

use crate::{CMDLINE_IMAGE_DIGEST, CMDLINE_SERVER, CMDLINE_TOKEN, Digest, DigestError, KernelCmdline};

/// Where a disk-booted node's NoCloud seed writes the join parameters, and
/// where its agent reads them (`kiln-agent --cmdline`).
pub const SEED_CMDLINE_PATH: &str = "/etc/kiln/cmdline";

/// Where an image carries the control plane's CA certificate (baked in by
/// `kiln build --state`), the only one its agent trusts for the API.
pub const IMAGE_CA_PATH: &str = "/etc/kiln/ca.pem";

/// What a node is told to join: the control plane, the join token when the
/// server expected the machine, and the image it booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinParams {
    /// The control plane's API URL as the node reaches it, with no
    /// trailing slash (`https://10.0.2.2:8443`).
    pub server: String,
    /// A join token: one the boot path minted for this machine's MAC, or
    /// one an operator made. `None` for a machine the server did not expect:
    /// it registers as pending, until an operator approves it.
    pub token: Option<String>,
    /// The digest of the image the node booted, when known.
    pub image_digest: Option<Digest>,
}

/// Why the join parameters cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// A parameter the node cannot join without is absent.
    #[error("no control plane: no {key}= on the kernel command line")]
    Missing {
        /// The missing key.
        key: &'static str,
    },
    /// `kiln.image_digest=` is not a digest.
    #[error("{key}= is not a digest")]
    Digest {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        #[source]
        source: DigestError,
    },
}

impl JoinParams {
    /// The parameters for joining the API at `server` (a trailing slash is
    /// dropped) with `token` if any, booted from `image_digest`.
    pub fn new(server: &str, token: Option<&str>, image_digest: Option<Digest>) -> JoinParams {
        JoinParams { server: server.trim_end_matches('/').to_string(), token: token.map(str::to_string), image_digest }
    }

    /// Reads them from a kernel command line (or the seed's file, in the
    /// same syntax). `server` and `token`, when given (the agent's
    /// `--server` and `--token`), win over the command line's.
    pub fn from_cmdline(cmdline: &KernelCmdline, server: Option<String>, token: Option<String>) -> Result<JoinParams, JoinError> {
        let get = |given: Option<String>, key: &'static str| {
            given.or_else(|| cmdline.get(key).map(str::to_string)).ok_or(JoinError::Missing { key })
        };
        let server = get(server, CMDLINE_SERVER)?;
        let token = get(token, CMDLINE_TOKEN).ok().filter(|t| !t.is_empty());
        let image_digest = cmdline
            .get(CMDLINE_IMAGE_DIGEST)
            .map(str::parse)
            .transpose()
            .map_err(|source| JoinError::Digest { key: CMDLINE_IMAGE_DIGEST, source })?;
        Ok(JoinParams::new(&server, token.as_deref(), image_digest))
    }

    /// The kernel arguments: `kiln.server=… kiln.token=… kiln.image_digest=…`
    /// (no `kiln.token=` without a token).
    pub fn kernel_args(&self) -> Vec<String> {
        let mut args = vec![format!("{CMDLINE_SERVER}={}", self.server)];
        args.extend(self.token.as_ref().map(|t| format!("{CMDLINE_TOKEN}={t}")));
        args.extend(self.image_digest.map(|d| format!("{CMDLINE_IMAGE_DIGEST}={d}")));
        args
    }

    /// The content of the seed's [`SEED_CMDLINE_PATH`]: the kernel
    /// arguments on one line.
    pub fn seed_file(&self) -> String {
        format!("{}\n", self.kernel_args().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_then_parsed_round_trips() {
        let join = JoinParams::new("https://10.0.2.2:8443/", Some("abc.def"), Some(Digest::of(b"image")));
        let file = join.seed_file();
        assert_eq!(file, format!("kiln.server=https://10.0.2.2:8443 kiln.token=abc.def kiln.image_digest={}\n", Digest::of(b"image")));
        let parsed = JoinParams::from_cmdline(&KernelCmdline::parse(&file), None, None).unwrap();
        assert_eq!(parsed, join);
        let kernel = format!("console=ttyS0 {} quiet", join.kernel_args().join(" "));
        assert_eq!(JoinParams::from_cmdline(&KernelCmdline::parse(&kernel), None, None).unwrap(), join);
        let unexpected = JoinParams::new("https://10.0.2.2:8443", None, None);
        assert_eq!(unexpected.seed_file(), "kiln.server=https://10.0.2.2:8443\n", "no token, no kiln.token=");
        assert_eq!(JoinParams::from_cmdline(&KernelCmdline::parse(&unexpected.seed_file()), None, None).unwrap(), unexpected);
    }

    #[test]
    fn parse_cases() {
        let parse = |text: &str, server: Option<&str>, token: Option<&str>| {
            JoinParams::from_cmdline(&KernelCmdline::parse(text), server.map(Into::into), token.map(Into::into))
        };
        let given = parse("console=ttyS0", Some("http://s"), Some("t")).unwrap();
        assert_eq!(given, JoinParams::new("http://s", Some("t"), None), "flags alone, no digest");
        let over = parse("kiln.server=http://a kiln.token=x", Some("http://b"), None).unwrap();
        assert_eq!((over.server.as_str(), over.token.as_deref()), ("http://b", Some("x")), "a given server wins");
        assert_eq!(parse("kiln.token=x", None, None), Err(JoinError::Missing { key: CMDLINE_SERVER }), "no server");
        assert_eq!(parse("kiln.server=http://a", None, None).unwrap().token, None, "no token: the node will be pending");
        assert_eq!(parse("kiln.server=http://a kiln.token=", None, None).unwrap().token, None, "an empty token is none");
        assert!(
            matches!(parse("kiln.server=http://a kiln.token=x kiln.image_digest=sha256:00", None, None), Err(JoinError::Digest { .. })),
            "a bad digest"
        );
    }
}
