//! Pool files: `pools/<name>.toml`, parsed then validated.
//!
//! A pool file names the image its nodes boot, their size, how they boot,
//! how many there should be (`min <= replicas <= max`) and the libvirt hosts
//! they are spread across; an optional `[autoscale]` table lets kiln pick
//! `replicas` itself from the nodes' metrics. Parsing (serde, unknown keys
//! refused) and validation are two steps; both name the file and the key at
//! fault. To add a key: a field on [`PoolSpec`] (or [`Autoscale`]), a check
//! in `validate`, and a case in the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Reading or checking a pool file failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for a pool.
    #[error("{file}: key `{key}`: {message}")]
    SpecParse {
        /// The pool file.
        file: PathBuf,
        /// Dotted path of the key at fault (empty when the TOML itself is broken).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("{file}: key `{key}`: {message}")]
    SpecInvalid {
        /// The pool file.
        file: PathBuf,
        /// Dotted path of the key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Two files define the same pool.
    #[error("pool `{name}` is defined twice: {first} and {second}")]
    DuplicatePool {
        /// The pool name.
        name: String,
        /// The file loaded first.
        first: PathBuf,
        /// The file that repeats it.
        second: PathBuf,
    },
}

/// How a pool's nodes boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boot {
    /// From a qcow2 overlay on the golden image, with a per-node cidata seed.
    Disk,
    /// PXE from kiln's server.
    Network,
}

/// The node metric an autoscaler policy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Metric {
    /// Mean fraction of CPU time not idle, per node, in `0..=1`.
    #[serde(rename = "cpu_busy")]
    CpuBusy,
    /// Mean 1-minute load average per node.
    #[serde(rename = "load1")]
    Load1,
}

/// `[autoscale]`: kiln picks `replicas` in `min..=max` from a metric.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Autoscale {
    /// What to measure.
    pub metric: Metric,
    /// Add nodes when the pool's mean is above this.
    pub scale_up_above: f64,
    /// Remove nodes when the pool's mean is below this.
    pub scale_down_below: f64,
    /// Nodes added or removed per decision.
    #[serde(default = "default_step")]
    pub step: u32,
    /// Seconds after a change before the next one.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
}

/// `[rollout]`: how nodes not on the pool's current image generation are
/// replaced (Cluster API's MachineDeployment rolling update).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RolloutSpec {
    /// Nodes the pool may have above its replicas while it rolls.
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    /// Ready nodes the pool may have below its replicas while it rolls.
    #[serde(default)]
    pub max_unavailable: u32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec { max_surge: default_max_surge(), max_unavailable: 0 }
    }
}

fn default_max_surge() -> u32 {
    1
}

fn default_step() -> u32 {
    1
}

fn default_cooldown() -> u64 {
    300
}

/// The libvirt URI a pool uses when its file names none.
pub const DEFAULT_HOST: &str = "qemu:///system";

fn default_hosts() -> Vec<String> {
    vec![DEFAULT_HOST.to_string()]
}

/// One pool file, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PoolSpec {
    /// Pool name; default: the file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// The image the nodes boot (a name in the artifact store).
    pub image: String,
    /// The PXE profile the nodes boot with (network boot) or the seed profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// Virtual CPUs per node.
    pub vcpus: u32,
    /// Memory per node, MiB.
    pub memory_mib: u64,
    /// How the nodes boot.
    pub boot: Boot,
    /// Fewest nodes.
    pub min: u32,
    /// Most nodes.
    pub max: u32,
    /// Nodes wanted now.
    pub replicas: u32,
    /// libvirt URIs the nodes are spread across.
    #[serde(default = "default_hosts")]
    pub hosts: Vec<String>,
    /// The libvirt network the nodes' NICs join: a network's name, or
    /// [`USER_NETWORK`]; by default the server's (`--pool-network`, the
    /// network kiln makes).
    #[serde(default)]
    pub network: Option<String>,
    /// Optional autoscaler policy.
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
    /// How out-of-date nodes are replaced (max-surge 1, max-unavailable 0).
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// `network = "user"`: QEMU user networking instead of a libvirt network.
pub const USER_NETWORK: &str = "user";

/// A loaded and validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Pool name: lowercase letters, digits and '-'.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// The image the nodes boot.
    pub image: String,
    /// The profile, if any.
    pub profile: Option<String>,
    /// Virtual CPUs per node (at least 1).
    pub vcpus: u32,
    /// Memory per node, MiB (at least 1, at most the host's).
    pub memory_mib: u64,
    /// How the nodes boot.
    pub boot: Boot,
    /// Fewest nodes.
    pub min: u32,
    /// Most nodes.
    pub max: u32,
    /// Nodes wanted, in `min..=max`.
    pub replicas: u32,
    /// libvirt URIs, at least one, no repeats.
    pub hosts: Vec<String>,
    /// The network its file names (a libvirt network, or [`USER_NETWORK`]);
    /// the server's default is filled in when its hosts are loaded
    /// ([`crate::Fleet::load`]).
    pub network: Option<String>,
    /// Optional autoscaler policy.
    pub autoscale: Option<Autoscale>,
    /// How out-of-date nodes are replaced.
    pub rollout: RolloutSpec,
}

impl Pool {
    /// Where its nodes' NICs are plugged ([`Pool::network`]; a pool not
    /// loaded through a fleet, with none, is on QEMU user networking).
    pub fn nic(&self) -> crate::Nic {
        match self.network.as_deref() {
            None | Some(USER_NETWORK) => crate::Nic::User,
            Some(name) => crate::Nic::Network(name.to_string()),
        }
    }
}

impl Pool {
    /// Reads, parses and validates the pool file at `path`. `host_memory_mib`
    /// is the smallest memory of the hosts the pool may use: a node larger
    /// than that could never start.
    pub fn from_file(path: &Path, host_memory_mib: u64) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_str(&text, path, host_memory_mib)
    }

    /// Parses and validates pool text; `path` names the pool (its stem) when
    /// the text does not, and is in every error.
    pub fn from_str(text: &str, path: &Path, host_memory_mib: u64) -> Result<Self, Error> {
        let spec = parse(text, path)?;
        validate(spec, path, host_memory_mib)
    }
}

/// Loads every `*.toml` file in `dir` (not recursing), sorted by pool name.
/// Fails on the first bad file, or when two files define the same pool.
pub fn load_dir(dir: &Path, host_memory_mib: u64) -> Result<Vec<Pool>, Error> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut pools: BTreeMap<String, Pool> = BTreeMap::new();
    for file in files {
        let pool = Pool::from_file(&file, host_memory_mib)?;
        if let Some(first) = pools.get(&pool.name) {
            return Err(Error::DuplicatePool { name: pool.name, first: first.file.clone(), second: file });
        }
        pools.insert(pool.name.clone(), pool);
    }
    Ok(pools.into_values().collect())
}

fn parse(text: &str, path: &Path) -> Result<PoolSpec, Error> {
    kiln_core::toml_file::from_str(text).map_err(|e| Error::SpecParse { file: path.to_path_buf(), key: e.key, message: e.message })
}

/// Pool (and image, profile) names: lowercase letters, digits and '-', not
/// starting or ending with '-', at most 40 bytes (a domain name and a
/// hostname are made from it).
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 40
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A libvirt URI: `driver[+transport]://[host]/path`.
fn uri_ok(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else { return false };
    !scheme.is_empty()
        && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-')
        && rest.contains('/')
        && !rest.chars().any(char::is_whitespace)
}

fn validate(spec: PoolSpec, path: &Path, host_memory_mib: u64) -> Result<Pool, Error> {
    let invalid = |key: &str, message: String| Error::SpecInvalid { file: path.to_path_buf(), key: key.to_string(), message };
    let (name, name_key) = match spec.name {
        Some(n) => (n, "name"),
        None => (path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), "name (the file's stem)"),
    };
    if !name_ok(&name) {
        return Err(invalid(name_key, format!("{name:?} must be lowercase letters, digits and '-', at most 40")));
    }
    if !name_ok(&spec.image) {
        return Err(invalid("image", format!("{:?} is not an image name", spec.image)));
    }
    if let Some(p) = &spec.profile
        && !name_ok(p)
    {
        return Err(invalid("profile", format!("{p:?} is not a profile name")));
    }
    if spec.vcpus == 0 {
        return Err(invalid("vcpus", "must be at least 1".into()));
    }
    if spec.memory_mib == 0 {
        return Err(invalid("memory-mib", "must be at least 1".into()));
    }
    if spec.memory_mib > host_memory_mib {
        return Err(invalid("memory-mib", format!("{} MiB is more than the host has ({host_memory_mib} MiB)", spec.memory_mib)));
    }
    if spec.max < spec.min {
        return Err(invalid("max", format!("{} is less than min ({})", spec.max, spec.min)));
    }
    if spec.replicas < spec.min || spec.replicas > spec.max {
        return Err(invalid("replicas", format!("{} is outside min..=max ({}..={})", spec.replicas, spec.min, spec.max)));
    }
    if spec.hosts.is_empty() {
        return Err(invalid("hosts", "names no libvirt URI".into()));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if !uri_ok(h) {
            return Err(invalid(&format!("hosts[{i}]"), format!("{h:?} is not a libvirt URI")));
        }
        if spec.hosts[..i].contains(h) {
            return Err(invalid(&format!("hosts[{i}]"), format!("{h:?} is listed twice")));
        }
    }
    if let Some(n) = &spec.network
        && !network_name_ok(n)
    {
        return Err(invalid("network", format!("{n:?} is not a libvirt network name (letters, digits, '-', '_', '.'; at most 64)")));
    }
    if let Some(a) = &spec.autoscale {
        for (key, v) in [("autoscale.scale-up-above", a.scale_up_above), ("autoscale.scale-down-below", a.scale_down_below)] {
            if !v.is_finite() || v < 0.0 {
                return Err(invalid(key, format!("{v} must be a number at least 0")));
            }
            if a.metric == Metric::CpuBusy && v > 1.0 {
                return Err(invalid(key, format!("{v}: cpu_busy is a fraction, at most 1")));
            }
        }
        if a.scale_down_below >= a.scale_up_above {
            return Err(invalid(
                "autoscale.scale-down-below",
                format!("{} must be less than scale-up-above ({})", a.scale_down_below, a.scale_up_above),
            ));
        }
        if a.step == 0 {
            return Err(invalid("autoscale.step", "must be at least 1".into()));
        }
    }
    if spec.rollout.max_surge == 0 && spec.rollout.max_unavailable == 0 {
        return Err(invalid("rollout.max-unavailable", "max-surge and max-unavailable cannot both be 0: nothing could be replaced".into()));
    }
    if spec.rollout.max_surge > spec.max {
        return Err(invalid("rollout.max-surge", format!("{} is more than max ({})", spec.rollout.max_surge, spec.max)));
    }
    Ok(Pool {
        name,
        file: path.to_path_buf(),
        image: spec.image,
        profile: spec.profile,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        boot: spec.boot,
        min: spec.min,
        max: spec.max,
        replicas: spec.replicas,
        hosts: spec.hosts,
        network: spec.network,
        autoscale: spec.autoscale,
        rollout: spec.rollout,
    })
}

/// A libvirt network's name as kiln accepts one: it goes into domain and
/// network XML (escaped) and into `virsh` hints.
fn network_name_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_MIB: u64 = 8192;

    const GOOD: &str = r#"
image = "tiny"
vcpus = 1
memory-mib = 256
boot = "network"
min = 0
max = 5
replicas = 1
"#;

    fn load(text: &str) -> Result<Pool, Error> {
        Pool::from_str(text, Path::new("pools/tiny.toml"), HOST_MIB)
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let p = load(GOOD).unwrap();
        assert_eq!(p.name, "tiny");
        assert_eq!(p.hosts, vec!["qemu:///system".to_string()]);
        assert_eq!(p.boot, Boot::Network);
        assert_eq!(p.profile, None);
        assert_eq!(p.autoscale, None);
        assert_eq!((p.min, p.max, p.replicas, p.vcpus, p.memory_mib), (0, 5, 1, 1, 256));
    }

    #[test]
    fn full_file() {
        let text = r#"
name = "workers"
image = "worker"
profile = "worker"
vcpus = 2
memory-mib = 1024
boot = "disk"
min = 1
max = 4
replicas = 2
hosts = ["qemu:///system", "qemu+ssh://root@b.example/system"]

[autoscale]
metric = "cpu_busy"
scale-up-above = 0.8
scale-down-below = 0.2
step = 2
cooldown-secs = 60
"#;
        let p = load(text).unwrap();
        assert_eq!(p.name, "workers");
        assert_eq!(p.boot, Boot::Disk);
        assert_eq!(p.hosts.len(), 2);
        let a = p.autoscale.unwrap();
        assert_eq!((a.metric, a.step, a.cooldown_secs), (Metric::CpuBusy, 2, 60));
        let t = text.replace("cpu_busy", "load1").replace("0.8", "4.0").replace("step = 2\n", "");
        let a = load(&t).unwrap().autoscale.unwrap();
        assert_eq!((a.metric, a.step, a.scale_up_above), (Metric::Load1, 1, 4.0));
    }

    /// Each case: a change to GOOD, and the key the error must name.
    #[test]
    fn bad_files_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("max below min", "min = 3\nmax = 2\nreplicas = 2", "max"),
            ("replicas above max", "replicas = 9", "replicas"),
            ("replicas below min", "min = 2\nreplicas = 1", "replicas"),
            ("zero vcpus", "vcpus = 0", "vcpus"),
            ("negative vcpus", "vcpus = -1", "vcpus"),
            ("zero memory", "memory-mib = 0", "memory-mib"),
            ("negative memory", "memory-mib = -256", "memory-mib"),
            ("memory beyond host", "memory-mib = 9000", "memory-mib"),
            ("negative max", "max = -1", "max"),
            ("unknown key", "colour = \"red\"", "colour"),
            ("bad boot", "boot = \"usb\"", "boot"),
            ("bad name", "name = \"Big_Pool\"", "name"),
            ("no hosts", "hosts = []", "hosts"),
            ("not a uri", "hosts = [\"localhost\"]", "hosts[0]"),
            ("repeated host", "hosts = [\"test:///default\", \"test:///default\"]", "hosts[1]"),
            ("bad metric", "[autoscale]\nmetric = \"disk\"\nscale-up-above = 1.0\nscale-down-below = 0.5", "autoscale.metric"),
            (
                "unknown autoscale key",
                "[autoscale]\nmetric = \"load1\"\nscale-up-above = 2.0\nscale-down-below = 0.5\nwhen = 1",
                "autoscale.when",
            ),
            ("missing threshold", "[autoscale]\nmetric = \"load1\"\nscale-up-above = 2.0", "autoscale.scale-down-below"),
            (
                "thresholds crossed",
                "[autoscale]\nmetric = \"load1\"\nscale-up-above = 1.0\nscale-down-below = 2.0",
                "autoscale.scale-down-below",
            ),
            (
                "cpu_busy above 1",
                "[autoscale]\nmetric = \"cpu_busy\"\nscale-up-above = 80.0\nscale-down-below = 0.2",
                "autoscale.scale-up-above",
            ),
            ("zero step", "[autoscale]\nmetric = \"load1\"\nscale-up-above = 2.0\nscale-down-below = 0.5\nstep = 0", "autoscale.step"),
            ("no room to roll", "[rollout]\nmax-surge = 0", "rollout.max-unavailable"),
            ("surge above max", "[rollout]\nmax-surge = 50", "rollout.max-surge"),
            ("negative surge", "[rollout]\nmax-surge = -1", "rollout.max-surge"),
            ("unknown rollout key", "[rollout]\nmin-ready = 2", "rollout.min-ready"),
        ];
        for (case, change, key) in cases {
            let text = patch(GOOD, change);
            let err = load(&text).expect_err(case);
            let (file, got) = match &err {
                Error::SpecParse { file, key, .. } | Error::SpecInvalid { file, key, .. } => (file, key),
                other => panic!("{case}: {other}"),
            };
            assert_eq!(file, Path::new("pools/tiny.toml"), "{case}");
            assert_eq!(got, key, "{case}: {err}");
            assert!(err.to_string().starts_with("pools/tiny.toml: key `"), "{case}: {err}");
        }
    }

    #[test]
    fn missing_key_is_named() {
        let err = load(&GOOD.replace("image = \"tiny\"\n", "")).unwrap_err();
        assert!(matches!(&err, Error::SpecParse { key, .. } if key == "image"), "{err}");
    }

    #[test]
    fn bad_file_stem_is_refused() {
        let err = Pool::from_str(GOOD, Path::new("pools/Tiny Pool.toml"), HOST_MIB).unwrap_err();
        assert!(matches!(&err, Error::SpecInvalid { key, .. } if key.starts_with("name")), "{err}");
    }

    /// Replaces GOOD's lines whose keys `change` sets, and appends the rest.
    fn patch(base: &str, change: &str) -> String {
        let (top, table) = match change.strip_prefix('[') {
            Some(_) => ("", change),
            None => (change, ""),
        };
        let keys: Vec<&str> = top.lines().filter_map(|l| l.split_once(" = ").map(|(k, _)| k)).collect();
        let mut out: Vec<&str> = base.lines().filter(|l| !keys.iter().any(|k| l.starts_with(&format!("{k} = ")))).collect();
        out.extend(top.lines());
        out.push(table);
        out.join("\n")
    }

    #[test]
    fn load_dir_loads_every_pool_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("b.toml"), GOOD).unwrap();
        std::fs::write(dir.join("a.toml"), GOOD.replace("boot = \"network\"", "boot = \"disk\"")).unwrap();
        std::fs::write(dir.join("README.md"), "not a pool").unwrap();
        let pools = load_dir(&dir, HOST_MIB).unwrap();
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(pools[0].file, dir.join("a.toml"));

        std::fs::write(dir.join("c.toml"), format!("name = \"a\"\n{GOOD}")).unwrap();
        let err = load_dir(&dir, HOST_MIB).unwrap_err();
        assert!(matches!(&err, Error::DuplicatePool { name, .. } if name == "a"), "{err}");

        std::fs::write(dir.join("c.toml"), GOOD.replace("vcpus = 1", "vcpus = 0")).unwrap();
        let err = load_dir(&dir, HOST_MIB).unwrap_err();
        assert!(matches!(&err, Error::SpecInvalid { file, key, .. } if file == &dir.join("c.toml") && key == "vcpus"), "{err}");

        let err = load_dir(&dir.join("missing"), HOST_MIB).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
    }

    #[test]
    fn shipped_pool_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pools");
        if dir.is_dir() {
            load_dir(&dir, u64::MAX).unwrap();
        }
    }
}
