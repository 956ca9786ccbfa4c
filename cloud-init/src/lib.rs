//! kiln-cloud-init: typed cloud-init NoCloud seeds.
//!
//! A [`Seed`] is what a NoCloud datasource reads: `meta-data`
//! ([`MetaData`]: instance id, hostname), `user-data` (a `#cloud-config`
//! document, [`CloudConfig`], or any text a profile rendered), an optional
//! `network-config` ([`NetworkConfig`], version 2) and optional `vendor-data`.
//! The same seed is served over HTTP (`ds=nocloud-net;s=http://HOST/cloud-init/MAC/`)
//! or written as a cidata ISO ([`Seed::write_iso`], [`Seed::iso`]) for disk boots.
//!
//! Every file is written as JSON, which YAML 1.2 includes and cloud-init
//! reads: the output is exact, with no YAML quoting pitfalls. `user-data`
//! starts with the `#cloud-config` line cloud-init needs to recognise it.
//!
//! To support another cloud-config module, add a field to [`CloudConfig`]
//! with its cloud-init name; `skip_serializing_if` keeps unset ones out.
//!
//! Owns the seed's files and the ISO; does not choose which machine gets
//! which seed (kiln-pxe's profiles do).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use kiln_core::Mac;
use serde::{Deserialize, Serialize};

/// Writing a seed failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be written.
    #[error("{path}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The ISO tool failed.
    #[error("xorriso (making {path}): {stderr}")]
    Iso {
        /// The ISO being made.
        path: String,
        /// What it said.
        stderr: String,
    },
}

/// `meta-data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MetaData {
    /// Changing it makes cloud-init run its per-instance modules again.
    pub instance_id: String,
    /// The hostname cloud-init sets.
    pub local_hostname: String,
}

/// A user in `users:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Supplementary groups, comma-separated as cloud-init takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<String>,
    /// Login shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// sudoers rule, e.g. `ALL=(ALL) NOPASSWD:ALL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<String>,
    /// Public keys for `~/.ssh/authorized_keys`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Whether the password is locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_passwd: Option<bool>,
}

/// A file in `write_files:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    /// Absolute path.
    pub path: String,
    /// Contents.
    pub content: String,
    /// Octal mode as a string, e.g. `"0644"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    /// `user:group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A `runcmd:` entry: a shell line, or an argument vector run without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunCmd {
    /// Run by `sh -c`.
    Shell(String),
    /// Run as is.
    Argv(Vec<String>),
}

/// A `#cloud-config` document: the modules kiln's profiles use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudConfig {
    /// Hostname to set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Users to create; `"default"` keeps the distribution's default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<User>,
    /// Keys for the default user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// Files to write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write_files: Vec<WriteFile>,
    /// Commands run once, late in the first boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runcmd: Vec<RunCmd>,
    /// Packages to install.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Where cloud-init's own output goes, e.g. `{"all": "| tee -a /dev/console"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output: BTreeMap<String, String>,
}

impl CloudConfig {
    /// The `user-data` text: `#cloud-config` and the document.
    pub fn to_user_data(&self) -> String {
        format!("#cloud-config\n{}\n", serde_json::to_string_pretty(self).expect("a cloud-config serialises"))
    }
}

/// `network-config`, version 2 (netplan's schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Always 2.
    pub version: u32,
    /// Ethernet devices by id.
    pub ethernets: BTreeMap<String, Ethernet>,
}

/// One ethernet device of a [`NetworkConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ethernet {
    /// Which NIC this is.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub match_: Option<Match>,
    /// Name to give the NIC.
    #[serde(rename = "set-name", default, skip_serializing_if = "Option::is_none")]
    pub set_name: Option<String>,
    /// DHCPv4 on this NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp4: Option<bool>,
    /// Static addresses, `10.0.0.5/24`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Nameservers>,
    /// MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `match:` of a [`NetworkConfig`] device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Match {
    /// The NIC's MAC.
    pub macaddress: Mac,
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Destination, `0.0.0.0/0` for the default route.
    pub to: String,
    /// Gateway.
    pub via: String,
}

/// DNS servers and search domains.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nameservers {
    /// Server addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl NetworkConfig {
    /// DHCPv4 on the NIC with `mac`, the usual worker setup.
    pub fn dhcp(mac: Mac) -> Self {
        let eth = Ethernet { match_: Some(Match { macaddress: mac }), dhcp4: Some(true), ..Default::default() };
        NetworkConfig { version: 2, ethernets: BTreeMap::from([("primary".to_string(), eth)]) }
    }

    /// The `network-config` text.
    pub fn to_text(&self) -> String {
        format!("{}\n", serde_json::to_string_pretty(self).expect("a network config serialises"))
    }
}

/// A NoCloud seed: the files of a cidata volume or a `ds=nocloud-net;s=` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// `meta-data`.
    pub meta_data: MetaData,
    /// `user-data` text.
    pub user_data: String,
    /// `network-config` text, if any.
    pub network_config: Option<String>,
    /// `vendor-data` text, if any.
    pub vendor_data: Option<String>,
}

impl Seed {
    /// The seed's files, by NoCloud name. `meta-data` and `user-data` are
    /// always there (cloud-init needs both); the others when set.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        let mut files = vec![
            ("meta-data", format!("{}\n", serde_json::to_string_pretty(&self.meta_data).expect("meta-data serialises"))),
            ("user-data", self.user_data.clone()),
        ];
        if let Some(n) = &self.network_config {
            files.push(("network-config", n.clone()));
        }
        files.push(("vendor-data", self.vendor_data.clone().unwrap_or_default()));
        files
    }

    /// One file by name (`meta-data`, `user-data`, `network-config`, `vendor-data`).
    pub fn file(&self, name: &str) -> Option<String> {
        self.files().into_iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }

    /// Writes the seed as an ISO 9660 volume labelled `cidata` (Joliet and
    /// Rock Ridge names, so cloud-init finds `meta-data` and `user-data`),
    /// to a temporary name beside `path` and renamed. File dates are fixed,
    /// so the same seed gives the same bytes.
    pub fn write_iso(&self, path: &Path) -> Result<(), Error> {
        let io = |source| Error::Io { path: path.display().to_string(), source };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new().prefix(".cidata-").suffix(".iso").tempfile_in(dir).map_err(io)?;
        self.make_iso(dir, tmp.path(), path)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// The same ISO as [`Seed::write_iso`] writes, as bytes; made in a
    /// temporary directory that is removed afterwards.
    pub fn iso(&self) -> Result<Vec<u8>, Error> {
        let io = |source| Error::Io { path: std::env::temp_dir().display().to_string(), source };
        let work = tempfile::Builder::new().prefix("kiln-cidata-").tempdir().map_err(io)?;
        let out = work.path().join("cidata.iso");
        self.make_iso(work.path(), &out, &out)?;
        std::fs::read(&out).map_err(|source| Error::Io { path: out.display().to_string(), source })
    }

    /// Runs xorriso on the seed's files, staged in a temporary directory
    /// in `staging_in`, into `out`; errors name `named`.
    fn make_iso(&self, staging_in: &Path, out: &Path, named: &Path) -> Result<(), Error> {
        let io = |source| Error::Io { path: named.display().to_string(), source };
        let staging = tempfile::Builder::new().prefix(".cidata-").tempdir_in(staging_in).map_err(io)?;
        // xorriso with SOURCE_DATE_EPOCH records each file's own mtime:
        // pin them (and the root's) so equal seeds give equal bytes.
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        for (name, text) in self.files() {
            let file = staging.path().join(name);
            std::fs::write(&file, text).map_err(io)?;
            std::fs::File::options().write(true).open(&file).and_then(|f| f.set_modified(epoch)).map_err(io)?;
        }
        std::fs::File::open(staging.path()).and_then(|d| d.set_modified(epoch)).map_err(io)?;
        let run = Command::new("xorriso")
            .env("SOURCE_DATE_EPOCH", "0")
            .args(["-as", "mkisofs", "-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(out)
            .arg(staging.path())
            .output()
            .map_err(io)?;
        if !run.status.success() {
            return Err(Error::Iso { path: named.display().to_string(), stderr: String::from_utf8_lossy(&run.stderr).trim().to_string() });
        }
        Ok(())
    }
}
