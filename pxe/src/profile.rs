//! Profiles and groups: which machine boots what, matchbox-style.
//!
//! A **profile** (`DIR/profiles/<id>.toml`) names an image, extra kernel
//! arguments and cloud-init templates:
//!
//! ```toml
//! image = "worker"
//! kernel-args = ["console=ttyS0"]
//! user-data = """
//! #cloud-config
//! hostname: {{ hostname }}
//! """
//! ```
//!
//! A **group** (`DIR/groups/<id>.toml`) maps selectors to a profile:
//!
//! ```toml
//! profile = "worker"
//! [selector]
//! mac = "52:54:00:12:34:56"   # any spelling
//! rack = "a1"                 # a free label, from the iPXE query
//! ```
//!
//! A machine matches a group when every selector matches it; among the
//! groups it matches, the one with the most selectors wins, ties going to
//! the first by name. A group with no selectors is the default. Selectors
//! are `mac`, `uuid` (any case), `hostname`, `serial`, `arch`, and any other
//! key as a free label.
//!
//! Templates are Jinja ([minijinja]) with strict undefined variables; they
//! see `mac`, `mac_hyphen`, `uuid`, `hostname`, `serial`, `arch`, `labels`,
//! `server`, `api`, `token`, `kiln_cmdline`, `image`, `image_digest` and
//! `profile`. `kiln_cmdline` is what kiln writes to `/etc/kiln/cmdline`
//! when a profile has no user-data (the agent's API URL, token and image
//! digest): a profile with its own user-data writes it there for a
//! disk-booted image's agent to join. `token` is a
//! one-use join token minted for the machine's MAC when kiln expects the
//! machine (a pool's node, or a MAC a group selects), and empty otherwise:
//! such a machine registers as pending until an operator approves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_cloud_init::{CloudConfig, MetaData, Seed, WriteFile};
use kiln_core::{Mac, Manifest};
use serde::Deserialize;

use crate::ImageStore;
use crate::ipxe::BootParams;

/// Loading profiles and groups failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A directory or file could not be read.
    #[error("{path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a valid profile or group.
    #[error("{file}: key `{key}`: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The key at fault.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A profile names an image that is not served.
    #[error("profile `{profile}` names image `{image}`, which is not among the served images ({available})")]
    MissingImage {
        /// The profile.
        profile: String,
        /// The image it names.
        image: String,
        /// The images there are.
        available: String,
    },
    /// A group names a profile that does not exist.
    #[error("group `{group}` names profile `{profile}`, which does not exist")]
    MissingProfile {
        /// The group.
        group: String,
        /// The profile it names.
        profile: String,
    },
    /// A template does not compile.
    #[error("profile `{profile}`: template `{file}`: {message}")]
    Template {
        /// The profile.
        profile: String,
        /// `user-data`, `network-config` or `vendor-data`.
        file: String,
        /// minijinja's message.
        message: String,
    },
}

/// A template failed to render for a machine: a 500 naming the profile.
#[derive(Debug, thiserror::Error)]
#[error("profile `{profile}`: rendering `{file}`: {message}")]
pub struct RenderError {
    /// The profile.
    pub profile: String,
    /// Which file.
    pub file: String,
    /// minijinja's message.
    pub message: String,
}

/// No group matches a machine and there is no default group: a 404.
#[derive(Debug, thiserror::Error)]
#[error("no group matches {machine} and no group is the default (one without selectors)")]
pub struct NoMatch {
    /// The machine, described.
    pub machine: String,
}

/// A profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Profile {
    /// Its id: the file name without `.toml`.
    #[serde(default)]
    pub id: String,
    /// The image it boots.
    pub image: String,
    /// Kernel arguments added after the image's own.
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// Template of `user-data`; when absent kiln writes a cloud-config that
    /// sets the hostname and [`kiln_core::SEED_CMDLINE_PATH`] for the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Template of `network-config` (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
    /// Template of `vendor-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
}

/// A group.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Group {
    /// Its id: the file name without `.toml`.
    #[serde(default)]
    pub id: String,
    /// The profile its machines boot.
    pub profile: String,
    /// What a machine must have to be in the group.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
}

/// What a booting machine says about itself (the iPXE query).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    /// Its NIC's MAC.
    pub mac: Option<Mac>,
    /// SMBIOS UUID.
    pub uuid: Option<String>,
    /// Hostname (from DHCP).
    pub hostname: Option<String>,
    /// SMBIOS serial number.
    pub serial: Option<String>,
    /// iPXE's `${buildarch}`: `i386`, `x86_64`, `arm64`.
    pub arch: Option<String>,
    /// Every other query parameter.
    pub labels: BTreeMap<String, String>,
}

/// A boot request's query names a machine wrongly.
#[derive(Debug, thiserror::Error)]
#[error("query parameter mac")]
pub struct BadQuery(#[source] pub kiln_core::mac::MacParseError);

impl Machine {
    /// From query parameters; a `mac` that is not a MAC is an error. Empty
    /// values (iPXE prints unset settings as empty) count as absent.
    pub fn from_query(query: &BTreeMap<String, String>) -> Result<Machine, BadQuery> {
        let mut m = Machine::default();
        for (k, v) in query {
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "mac" => m.mac = Some(v.parse().map_err(BadQuery)?),
                "uuid" => m.uuid = Some(v.to_ascii_lowercase()),
                "hostname" => m.hostname = Some(v.clone()),
                "serial" => m.serial = Some(v.clone()),
                "arch" => m.arch = Some(v.clone()),
                _ => {
                    m.labels.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(m)
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(mac) = self.mac {
            parts.push(format!("mac={mac}"));
        }
        for (k, v) in [("uuid", &self.uuid), ("hostname", &self.hostname), ("serial", &self.serial), ("arch", &self.arch)] {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        }
        parts.extend(self.labels.iter().map(|(k, v)| format!("{k}={v}")));
        if parts.is_empty() { "a machine that gave no attributes".into() } else { format!("the machine {}", parts.join(" ")) }
    }

    fn matches(&self, key: &str, want: &str) -> bool {
        match key {
            "mac" => want.parse::<Mac>().ok().is_some_and(|w| self.mac == Some(w)),
            "uuid" => self.uuid.as_deref().is_some_and(|u| u.eq_ignore_ascii_case(want)),
            "hostname" => self.hostname.as_deref() == Some(want),
            "serial" => self.serial.as_deref() == Some(want),
            "arch" => self.arch.as_deref() == Some(want),
            _ => self.labels.get(key).map(String::as_str) == Some(want),
        }
    }

    /// The hostname a seed gives the machine: its own, else `node-` and the
    /// last six hex digits of its MAC.
    pub fn node_hostname(&self) -> String {
        match (&self.hostname, self.mac) {
            (Some(h), _) => h.clone(),
            (None, Some(mac)) => format!("node-{}", &mac.to_string().replace(':', "")[6..]),
            (None, None) => "node".into(),
        }
    }
}

/// Every profile and group, checked against the served images.
#[derive(Debug, Clone)]
pub struct Catalog {
    profiles: BTreeMap<String, Profile>,
    groups: BTreeMap<String, Group>,
}

impl Catalog {
    /// One profile, `default`, booting the default image, and one group
    /// without selectors: what `kiln serve` uses without `--profiles`.
    pub fn builtin(images: &ImageStore) -> Catalog {
        let profile = Profile {
            id: "default".into(),
            image: images.default_image().name.clone(),
            kernel_args: vec![],
            user_data: None,
            network_config: None,
            vendor_data: None,
        };
        let group = Group { id: "default".into(), profile: "default".into(), selector: BTreeMap::new() };
        Catalog { profiles: BTreeMap::from([("default".into(), profile)]), groups: BTreeMap::from([("default".into(), group)]) }
    }

    /// Loads `dir/profiles/*.toml` and `dir/groups/*.toml` and checks them:
    /// every profile's image is served, every group's profile exists, every
    /// template compiles, every `mac` selector is a MAC.
    pub fn load(dir: &Path, images: &ImageStore) -> Result<Catalog, Error> {
        let profiles: BTreeMap<String, Profile> =
            read_dir_toml(&dir.join("profiles"))?.into_iter().map(|(id, p): (String, Profile)| (id.clone(), Profile { id, ..p })).collect();
        let groups: BTreeMap<String, Group> =
            read_dir_toml(&dir.join("groups"))?.into_iter().map(|(id, g): (String, Group)| (id.clone(), Group { id, ..g })).collect();
        let available = images.images().map(|m| m.name.clone()).collect::<Vec<_>>().join(", ");
        let env = environment();
        for p in profiles.values() {
            if images.get(&p.image).is_none() {
                return Err(Error::MissingImage { profile: p.id.clone(), image: p.image.clone(), available });
            }
            for (file, source) in p.templates() {
                env.template_from_str(source).map_err(|e| Error::Template {
                    profile: p.id.clone(),
                    file: file.into(),
                    message: template_message(&e),
                })?;
            }
        }
        for g in groups.values() {
            if !profiles.contains_key(&g.profile) {
                return Err(Error::MissingProfile { group: g.id.clone(), profile: g.profile.clone() });
            }
            if let Some(mac) = g.selector.get("mac")
                && mac.parse::<Mac>().is_err()
            {
                let file = dir.join("groups").join(format!("{}.toml", g.id));
                return Err(Error::Parse { file, key: "selector.mac".into(), message: format!("{mac:?} is not a MAC address") });
            }
        }
        Ok(Catalog { profiles, groups })
    }

    /// Every profile, by id.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// Every group, by id.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }

    /// The group and profile for `machine`.
    pub fn select(&self, machine: &Machine) -> Result<(&Group, &Profile), NoMatch> {
        let mut best: Option<&Group> = None;
        for g in self.groups.values() {
            if !g.selector.iter().all(|(k, v)| machine.matches(k, v)) {
                continue;
            }
            // Groups iterate by id, so on a tie the first by name stays.
            if best.is_none_or(|b| g.selector.len() > b.selector.len()) {
                best = Some(g);
            }
        }
        let group = best.ok_or_else(|| NoMatch { machine: machine.describe() })?;
        Ok((group, &self.profiles[&group.profile]))
    }

    /// The machine's NoCloud seed, rendered from its profile.
    pub fn seed(&self, profile: &Profile, image: &Manifest, machine: &Machine, server: &BootParams<'_>) -> Result<Seed, RenderError> {
        let ctx = context(profile, image, machine, server);
        let env = environment();
        let render = |file: &str, source: &Option<String>| -> Result<Option<String>, RenderError> {
            source.as_deref().map(|s| env.render_str(s, &ctx)).transpose().map_err(|e| RenderError {
                profile: profile.id.clone(),
                file: file.into(),
                message: template_message(&e),
            })
        };
        let hostname = machine.node_hostname();
        let user_data = match render("user-data", &profile.user_data)? {
            Some(text) => text,
            None => CloudConfig {
                hostname: Some(hostname.clone()),
                write_files: vec![WriteFile {
                    path: kiln_core::SEED_CMDLINE_PATH.into(),
                    content: server.join(image).seed_file(),
                    permissions: Some("0600".into()),
                    owner: None,
                }],
                ..Default::default()
            }
            .to_user_data(),
        };
        let instance = match (machine.mac, &machine.uuid) {
            (Some(mac), _) => mac.to_string().replace(':', ""),
            (None, Some(uuid)) => uuid.clone(),
            (None, None) => hostname.clone(),
        };
        Ok(Seed {
            meta_data: MetaData { instance_id: format!("kiln-{instance}-{}", &image.digest.hex()[..12]), local_hostname: hostname },
            user_data,
            network_config: render("network-config", &profile.network_config)?,
            vendor_data: render("vendor-data", &profile.vendor_data)?,
        })
    }
}

impl Profile {
    fn templates(&self) -> Vec<(&'static str, &str)> {
        [("user-data", &self.user_data), ("network-config", &self.network_config), ("vendor-data", &self.vendor_data)]
            .into_iter()
            .filter_map(|(n, s)| s.as_deref().map(|s| (n, s)))
            .collect()
    }
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env
}

fn template_message(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("line {line}: {e}"),
        None => e.to_string(),
    }
}

fn context(profile: &Profile, image: &Manifest, machine: &Machine, server: &BootParams<'_>) -> minijinja::Value {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    minijinja::context! {
        mac => machine.mac.map(|m| m.to_string()).unwrap_or_default(),
        mac_hyphen => machine.mac.map(|m| m.hyphenated()).unwrap_or_default(),
        uuid => opt(&machine.uuid),
        hostname => machine.node_hostname(),
        serial => opt(&machine.serial),
        arch => opt(&machine.arch),
        labels => machine.labels.clone(),
        server => server.base_url.trim_end_matches('/'),
        api => server.api_url.trim_end_matches('/'),
        token => server.token.unwrap_or_default(),
        kiln_cmdline => server.join(image).seed_file().trim_end(),
        image => image.name.clone(),
        image_digest => image.digest.to_string(),
        profile => profile.id.clone(),
    }
}

/// Every `*.toml` in `dir` (none if it does not exist), by file stem.
fn read_dir_toml<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<Vec<(String, T)>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::Io { path: dir.into(), source }),
    };
    let mut paths: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let de = toml::Deserializer::parse(&text).map_err(|e| Error::Parse {
            file: path.clone(),
            key: String::new(),
            message: e.message().into(),
        })?;
        let value: T = serde_path_to_error::deserialize(de).map_err(|e| Error::Parse {
            file: path.clone(),
            key: e.path().to_string(),
            message: e.inner().message().to_string(),
        })?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        out.push((stem, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn setup() -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        crate::store::tests::write_image(&dir.path().join("images"), "tiny");
        crate::store::tests::write_image(&dir.path().join("images"), "worker");
        let images = ImageStore::load(&dir.path().join("images")).unwrap();
        write(dir.path(), "cat/profiles/tiny.toml", "image = \"tiny\"\n");
        write(
            dir.path(),
            "cat/profiles/worker.toml",
            "image = \"worker\"\nkernel-args = [\"quiet\"]\nuser-data = \"\"\"\n#cloud-config\nhostname: {{ hostname }}\nruncmd: [\"echo {{ labels.rack }} {{ mac }}\"]\n\"\"\"\n",
        );
        write(dir.path(), "cat/groups/default.toml", "profile = \"tiny\"\n");
        write(dir.path(), "cat/groups/rack-a1.toml", "profile = \"worker\"\n[selector]\nrack = \"a1\"\n");
        write(dir.path(), "cat/groups/a1-node.toml", "profile = \"tiny\"\n[selector]\nrack = \"a1\"\nmac = \"52-54-00-AA-00-01\"\n");
        write(dir.path(), "cat/groups/x86.toml", "profile = \"worker\"\n[selector]\narch = \"x86_64\"\n");
        (dir, images)
    }

    fn machine(pairs: &[(&str, &str)]) -> Machine {
        Machine::from_query(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
    }

    #[test]
    fn most_selectors_win_ties_by_name_default_last() {
        let (dir, images) = setup();
        let cat = Catalog::load(&dir.path().join("cat"), &images).unwrap();
        // (case, query, group chosen)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("nothing known: default", &[], "default"),
            ("one label", &[("rack", "a1")], "rack-a1"),
            ("label and MAC in another spelling", &[("rack", "a1"), ("mac", "52:54:00:aa:00:01")], "a1-node"),
            ("MAC alone is not enough for a1-node", &[("mac", "52:54:00:aa:00:01")], "default"),
            ("tie between rack-a1 and x86: first by name", &[("rack", "a1"), ("arch", "x86_64")], "rack-a1"),
            ("empty values count as absent", &[("rack", ""), ("arch", "x86_64")], "x86"),
        ];
        for (case, query, want) in cases {
            let (g, _) = cat.select(&machine(query)).unwrap();
            assert_eq!(&g.id, want, "case {case}");
        }
    }

    #[test]
    fn no_default_group_is_a_clear_no_match() {
        let (dir, images) = setup();
        std::fs::remove_file(dir.path().join("cat/groups/default.toml")).unwrap();
        let cat = Catalog::load(&dir.path().join("cat"), &images).unwrap();
        let err = cat.select(&machine(&[("mac", "52:54:00:00:00:09")])).unwrap_err();
        assert!(err.to_string().contains("mac=52:54:00:00:00:09") && err.to_string().contains("default"), "{err}");
    }

    #[test]
    fn load_refuses_bad_catalogs_naming_what_is_wrong() {
        // (case, file, contents, what the error must mention)
        type Case<'a> = (&'a str, &'a str, &'a str, &'a [&'a str]);
        let cases: &[Case] = &[
            ("missing image", "cat/profiles/ghost.toml", "image = \"ghost\"\n", &["ghost", "tiny, worker"]),
            ("missing profile", "cat/groups/g.toml", "profile = \"nope\"\n", &["group `g`", "`nope`"]),
            ("unknown key", "cat/profiles/p.toml", "image = \"tiny\"\nkernel_args = []\n", &["p.toml", "kernel_args"]),
            ("bad template", "cat/profiles/t.toml", "image = \"tiny\"\nuser-data = \"{{ oops\"\n", &["profile `t`", "user-data"]),
            ("bad MAC selector", "cat/groups/m.toml", "profile = \"tiny\"\n[selector]\nmac = \"xx\"\n", &["m.toml", "selector.mac"]),
        ];
        for (case, file, text, wants) in cases {
            let (dir, images) = setup();
            write(dir.path(), file, text);
            let err = Catalog::load(&dir.path().join("cat"), &images).unwrap_err().to_string();
            for w in *wants {
                assert!(err.contains(w), "case {case}: {err:?} should mention {w:?}");
            }
        }
    }

    #[test]
    fn seeds_render_templates_and_errors_name_the_profile() {
        let (dir, images) = setup();
        let cat = Catalog::load(&dir.path().join("cat"), &images).unwrap();
        let m = machine(&[("rack", "a1"), ("mac", "52-54-00-00-00-07")]);
        let (_, profile) = cat.select(&m).unwrap();
        let server = BootParams { base_url: "http://10.0.2.2:8080/", token: Some("tok"), api_url: "http://10.0.2.2:8080" };
        let seed = cat.seed(profile, images.get(&profile.image).unwrap(), &m, &server).unwrap();
        assert_eq!(seed.user_data, "#cloud-config\nhostname: node-000007\nruncmd: [\"echo a1 52:54:00:00:00:07\"]\n");
        assert!(seed.meta_data.instance_id.starts_with("kiln-525400000007-"));

        // The default user-data hands the agent its server and token.
        let m = machine(&[("mac", "52:54:00:00:00:08")]);
        let (_, profile) = cat.select(&m).unwrap();
        let seed = cat.seed(profile, images.get(&profile.image).unwrap(), &m, &server).unwrap();
        assert!(seed.user_data.contains("kiln.server=http://10.0.2.2:8080 kiln.token=tok kiln.image_digest=sha256:"), "{}", seed.user_data);
        // A machine kiln does not expect gets no token at all.
        let unexpected = BootParams { token: None, ..server.clone() };
        let seed = cat.seed(profile, images.get(&profile.image).unwrap(), &m, &unexpected).unwrap();
        assert!(seed.user_data.contains("kiln.server=http://10.0.2.2:8080 kiln.image_digest=sha256:"), "{}", seed.user_data);
        assert!(!seed.user_data.contains("kiln.token"), "{}", seed.user_data);

        // A profile's own user-data writes the same file with `kiln_cmdline`.
        let mut own = profile.clone();
        own.user_data = Some("#cloud-config\nwrite_files: [{path: /etc/kiln/cmdline, content: \"{{ kiln_cmdline }}\"}]\n".into());
        let seed = cat.seed(&own, images.get(&profile.image).unwrap(), &m, &server).unwrap();
        let digest = images.get(&profile.image).unwrap().digest;
        assert_eq!(
            seed.user_data,
            format!(
                "#cloud-config\nwrite_files: [{{path: /etc/kiln/cmdline, content: \"kiln.server=http://10.0.2.2:8080 kiln.token=tok kiln.image_digest={digest}\"}}]\n"
            )
        );

        // A runtime template error (undefined variable) names the profile.
        let mut broken = profile.clone();
        broken.id = "broken".into();
        broken.user_data = Some("{{ nope.field }}".into());
        let err = cat.seed(&broken, images.get("tiny").unwrap(), &m, &server).unwrap_err();
        assert!(err.to_string().contains("profile `broken`") && err.to_string().contains("user-data"), "{err}");
    }
}
