//! A node's files on its host, through libvirt's storage API.
//!
//! Every host keeps kiln's files in one libvirt storage pool named
//! [`STORAGE_POOL`]; when a host has none, kiln defines a directory pool at
//! the path it is given, builds it, starts it and marks it autostart. Every
//! file is made, filled and deleted through libvirt, so the same calls work
//! on `qemu:///system` and on `qemu+ssh://HOST/system`: kiln needs no shell
//! and no shared filesystem on a host. In the pool:
//!
//! - `golden-<image>-<digest>.qcow2`: the pool's image, uploaded once per
//!   host and image digest. It is immutable: rebuilding the image makes a
//!   new golden volume and never changes the backing file of a node that
//!   runs. `golden-….qcow2.ok` is made after its upload finished; a golden
//!   volume without it is a broken upload (a server killed mid-way) and is
//!   uploaded again. Golden volumes of the image that no overlay uses any
//!   more are deleted after a new one is made.
//! - `kiln-<pool>-<n>.qcow2`: a disk node's overlay, backed by a golden volume;
//! - `kiln-<pool>-<n>.seed`: its cidata seed, uploaded;
//! - `kiln-<pool>-<n>.log`: any node's serial console, written by virtlogd.

use std::io::Read;
use std::path::Path;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use crate::NodeId;
use crate::hypervisor::Error;

/// The libvirt storage pool kiln keeps its files in, on every host.
pub const STORAGE_POOL: &str = "kiln";

/// The directory kiln makes [`STORAGE_POOL`] at when a host has none.
pub const DEFAULT_DIR: &str = "/var/lib/libvirt/kiln";

/// The kinds of a node's volumes, by their names' suffix.
const NODE_SUFFIXES: [&str; 3] = ["qcow2", "seed", "log"];

/// kiln's storage pool on one host.
pub struct Volumes {
    uri: String,
    conn: Connect,
    pool: StoragePool,
    dir: String,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes").field("uri", &self.uri).field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// A golden volume on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Golden {
    /// Its path on the host.
    pub path: String,
    /// Bytes uploaded now; `None` when a complete one was there.
    pub uploaded: Option<u64>,
}

/// Where a disk node's volumes are, as paths on its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDisks {
    /// The qcow2 overlay.
    pub overlay: String,
    /// The cidata seed.
    pub seed: String,
    /// Bytes the overlay takes on the host's disk as made.
    pub overlay_bytes: u64,
    /// Bytes the seed takes.
    pub seed_bytes: u64,
}

impl Volumes {
    /// Connects to `uri` and finds its [`STORAGE_POOL`], or makes it as a
    /// directory pool at `dir` (a path on that host), and starts it.
    pub fn open(uri: &str, dir: &str) -> Result<Self, Error> {
        virt::error::clear_error_callback();
        let err = |what: String| move |source| Error::Libvirt { uri: uri.to_string(), what, source };
        let conn = Connect::open(Some(uri)).map_err(err("connecting".into()))?;
        let pool = match StoragePool::lookup_by_name(&conn, STORAGE_POOL) {
            Ok(p) => p,
            Err(e) if e.code() == ErrorNumber::NoStoragePool => {
                let xml = format!("<pool type='dir'><name>{STORAGE_POOL}</name><target><path>{}</path></target></pool>", xml_text(dir));
                let p = StoragePool::define_xml(&conn, &xml, 0).map_err(err(format!("defining storage pool {STORAGE_POOL} at {dir}")))?;
                match p.build(0) {
                    Ok(_) => {}
                    Err(e) if e.code() == ErrorNumber::StoragePoolBuilt => {}
                    Err(e) => return Err(err(format!("building storage pool {STORAGE_POOL} at {dir}"))(e)),
                }
                p.set_autostart(true).map_err(err(format!("marking storage pool {STORAGE_POOL} autostart")))?;
                p
            }
            Err(e) => return Err(err(format!("looking up storage pool {STORAGE_POOL}"))(e)),
        };
        if !pool.is_active().map_err(err(format!("reading storage pool {STORAGE_POOL}'s state")))? {
            pool.create(0).map_err(err(format!("starting storage pool {STORAGE_POOL}")))?;
        }
        let xml = pool.get_xml_desc(0).map_err(err(format!("reading storage pool {STORAGE_POOL}")))?;
        let dir = element_text(&xml, "path").unwrap_or_else(|| dir.to_string());
        Ok(Volumes { uri: uri.to_string(), conn, pool, dir })
    }

    fn err(&self, what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> Error + '_ {
        let what = what.into();
        move |source| Error::Libvirt { uri: self.uri.clone(), what, source }
    }

    /// The storage pool's directory on the host.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The volume names in the pool, after a refresh (files virtlogd made
    /// are volumes only once the pool has been refreshed).
    fn names(&self) -> Result<Vec<String>, Error> {
        self.pool.refresh(0).map_err(self.err(format!("refreshing storage pool {STORAGE_POOL}")))?;
        self.pool.list_volumes().map_err(self.err(format!("listing storage pool {STORAGE_POOL}")))
    }

    fn lookup(&self, name: &str) -> Result<Option<StorageVol>, Error> {
        match StorageVol::lookup_by_name(&self.pool, name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code() == ErrorNumber::NoStorageVolume => Ok(None),
            Err(e) => Err(self.err(format!("looking up volume {name}"))(e)),
        }
    }

    fn delete_volume(&self, name: &str) -> Result<(), Error> {
        let Some(vol) = self.lookup(name)? else { return Ok(()) };
        match vol.delete(0) {
            Ok(()) => Ok(()),
            Err(e) if e.code() == ErrorNumber::NoStorageVolume => Ok(()),
            Err(e) => Err(self.err(format!("deleting volume {name}"))(e)),
        }
    }

    fn create(&self, xml: &str, name: &str) -> Result<StorageVol, Error> {
        StorageVol::create_xml(&self.pool, xml, 0).map_err(self.err(format!("creating volume {name}")))
    }

    fn path(&self, vol: &StorageVol, name: &str) -> Result<String, Error> {
        vol.get_path().map_err(self.err(format!("reading volume {name}'s path")))
    }

    /// Writes `len` bytes from `data` into `vol` through a libvirt stream.
    fn upload(&self, vol: &StorageVol, name: &str, mut data: impl Read, len: u64) -> Result<(), Error> {
        let stream = Stream::new(&self.conn, 0).map_err(self.err(format!("opening a stream for volume {name}")))?;
        vol.upload(&stream, 0, len, 0).map_err(self.err(format!("uploading volume {name}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent_total = 0u64;
        while sent_total < len {
            let n = match data.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let _ = stream.abort();
                    return Err(Error::Local { what: format!("reading what goes into volume {name}"), source });
                }
            };
            let mut off = 0;
            while off < n {
                match stream.send(&buf[off..n]) {
                    Ok(sent) => off += sent,
                    Err(e) => {
                        let _ = stream.abort();
                        return Err(self.err(format!("uploading volume {name}"))(e));
                    }
                }
            }
            sent_total += n as u64;
        }
        if sent_total != len {
            let _ = stream.abort();
            let source = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{sent_total} of {len} bytes"));
            return Err(Error::Local { what: format!("reading what goes into volume {name}"), source });
        }
        stream.finish().map_err(self.err(format!("finishing the upload of volume {name}")))
    }

    /// The golden volume of `image` at `digest`, uploaded from
    /// `local` (a qcow2 file on the server) unless a complete one is there;
    /// its path on the host. Golden volumes of `image` at other digests
    /// that no overlay uses are deleted.
    pub fn golden(&self, image: &str, digest: &kiln_core::Digest, local: &Path) -> Result<Golden, Error> {
        let name = golden_name(image, digest);
        let ok = format!("{name}.ok");
        // No refresh: the volumes kiln made are known to libvirt without
        // one, and the pass that calls this has refreshed the pool once.
        if let (Some(vol), Some(_)) = (self.lookup(&name)?, self.lookup(&ok)?) {
            return Ok(Golden { path: self.path(&vol, &name)?, uploaded: None });
        }
        // Missing, or an upload that never finished: (re)made.
        self.delete_volume(&ok)?;
        self.delete_volume(&name)?;
        let file = std::fs::File::open(local).map_err(|source| Error::Local { what: format!("opening {}", local.display()), source })?;
        let len = file.metadata().map_err(|source| Error::Local { what: format!("reading {}", local.display()), source })?.len();
        let vol = self.create(&raw_volume(&name, len), &name)?;
        self.upload(&vol, &name, std::io::BufReader::new(file), len)?;
        self.create(&raw_volume(&ok, 0), &ok)?;
        let path = self.path(&vol, &name)?;
        self.prune_golden(image, &name)?;
        Ok(Golden { path, uploaded: Some(len) })
    }

    /// Deletes `image`'s golden volumes other than the one of generation
    /// `keep` that no overlay is backed by (after a rollout removed the last
    /// node of an older generation).
    pub fn prune_golden_except(&self, image: &str, keep: &kiln_core::Digest) -> Result<(), Error> {
        self.prune_golden(image, &golden_name(image, keep))
    }

    /// Deletes `image`'s golden volumes other than `keep` that no overlay is backed by.
    fn prune_golden(&self, image: &str, keep: &str) -> Result<(), Error> {
        let names = self.names()?;
        let mut used = Vec::new();
        for overlay in names.iter().filter(|n| n.ends_with(".qcow2") && NodeId::parse(n.trim_end_matches(".qcow2")).is_some()) {
            let Some(vol) = self.lookup(overlay)? else { continue };
            let xml = vol.get_xml_desc(0).map_err(self.err(format!("reading volume {overlay}")))?;
            if let Some(backing) = xml.split_once("<backingStore>").and_then(|(_, b)| element_text(b, "path")) {
                used.push(backing);
            }
        }
        let prefix = format!("golden-{image}-");
        for old in names.iter().filter(|n| n.starts_with(&prefix) && n.ends_with(".qcow2") && n.as_str() != keep) {
            let path = format!("{}/{old}", self.dir.trim_end_matches('/'));
            if !used.contains(&path) {
                self.delete_volume(&format!("{old}.ok"))?;
                self.delete_volume(old)?;
            }
        }
        Ok(())
    }

    /// The nodes that have any volume here (overlay, seed or console log).
    pub fn nodes(&self) -> Result<Vec<NodeId>, Error> {
        let mut out: Vec<NodeId> = self
            .names()?
            .iter()
            .filter_map(|n| {
                let (stem, suffix) = n.rsplit_once('.')?;
                NODE_SUFFIXES.contains(&suffix).then(|| NodeId::parse(stem))?
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Makes `node`'s overlay on `golden` (a golden volume's path, of
    /// `capacity` virtual bytes) and uploads its seed, replacing any it
    /// had. `seed` gives the seed's bytes; it is called once the overlay is
    /// made, so a caller can make the seed meanwhile. A server killed in
    /// the middle leaves volumes that [`Volumes::nodes`] lists, for the
    /// reconciler to delete.
    pub fn make(
        &self,
        node: &NodeId,
        golden: &str,
        capacity: u64,
        seed: impl FnOnce() -> std::io::Result<Vec<u8>>,
    ) -> Result<NodeDisks, Error> {
        let overlay = format!("{node}.qcow2");
        let seed_name = format!("{node}.seed");
        self.delete_volume(&overlay)?;
        self.delete_volume(&seed_name)?;
        let xml = format!(
            "<volume><name>{overlay}</name><capacity unit='bytes'>{capacity}</capacity>\
             <target><format type='qcow2'/></target>\
             <backingStore><path>{}</path><format type='qcow2'/></backingStore></volume>",
            xml_text(golden)
        );
        let vol = self.create(&xml, &overlay)?;
        let seed = seed().map_err(|source| Error::Local { what: format!("making {node}'s seed"), source })?;
        let seed_vol = self.create(&raw_volume(&seed_name, seed.len() as u64), &seed_name)?;
        self.upload(&seed_vol, &seed_name, seed.as_slice(), seed.len() as u64)?;
        let allocation =
            |v: &StorageVol, name: &str| v.get_info().map(|i| i.allocation).map_err(self.err(format!("reading volume {name}")));
        Ok(NodeDisks {
            overlay: self.path(&vol, &overlay)?,
            seed: self.path(&seed_vol, &seed_name)?,
            overlay_bytes: allocation(&vol, &overlay)?,
            seed_bytes: allocation(&seed_vol, &seed_name)?,
        })
    }

    /// Deletes `node`'s overlay, seed and console log; succeeds when there are none.
    pub fn delete(&self, node: &NodeId) -> Result<(), Error> {
        let names = self.names()?;
        for suffix in NODE_SUFFIXES {
            let name = format!("{node}.{suffix}");
            if names.contains(&name) {
                self.delete_volume(&name)?;
            }
        }
        Ok(())
    }

    /// The path on the host that `node`'s serial console is logged to.
    pub fn console_log(&self, node: &NodeId) -> String {
        format!("{}/{node}.log", self.dir.trim_end_matches('/'))
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        // Nothing to do about a failed close but leak the connection; the
        // pool handle, dropped after this, keeps its own reference.
        let _ = self.conn.close();
    }
}

/// A raw volume of `len` bytes, allocated as it is written.
fn raw_volume(name: &str, len: u64) -> String {
    format!(
        "<volume><name>{name}</name><capacity unit='bytes'>{len}</capacity><allocation unit='bytes'>0</allocation>\
         <target><format type='raw'/></target></volume>"
    )
}

/// The golden volume of generation `digest` of `image`.
fn golden_name(image: &str, digest: &kiln_core::Digest) -> String {
    format!("golden-{image}-{}.qcow2", &digest.hex()[..16])
}

/// The virtual size of the qcow2 image at `path`, from its header.
pub fn qcow2_virtual_size(path: &Path) -> std::io::Result<u64> {
    let mut header = [0u8; 32];
    std::fs::File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not a qcow2 image", path.display())));
    }
    Ok(u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}

/// `s` escaped for XML text and attribute values.
fn xml_text(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// The text of the first `<tag>` in `xml` (libvirt's own XML: no attributes on it).
fn element_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    quick_xml::escape::unescape(&xml[start..end]).ok().map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_qcow2_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
        header.extend_from_slice(&[0; 16]);
        header.extend_from_slice(&(3u64 << 30).to_be_bytes());
        std::fs::write(&path, &header).unwrap();
        assert_eq!(qcow2_virtual_size(&path).unwrap(), 3 << 30);
        std::fs::write(&path, [0u8; 64]).unwrap();
        assert!(qcow2_virtual_size(&path).unwrap_err().to_string().contains("not a qcow2 image"));
    }

    /// libvirt's test driver: storage pools and volumes in memory (it
    /// cannot upload, so golden images and seeds are left to the
    /// end-to-end tests on a real libvirtd).
    #[test]
    fn lists_and_deletes_a_nodes_volumes_and_nothing_else() {
        let _host = crate::TEST_DEFAULT_HOST.lock().unwrap_or_else(|e| e.into_inner());
        let v = Volumes::open("test:///default", "/kiln-unit").unwrap();
        assert_eq!(v.dir(), "/kiln-unit");
        for name in ["kiln-w-1.qcow2", "kiln-w-1.log", "kiln-w-1.seed", "kiln-w-2.seed", "golden-w-0123.qcow2", "other.img"] {
            v.create(&raw_volume(name, 1), name).unwrap();
        }
        assert_eq!(v.nodes().unwrap(), [NodeId::new("w", 1), NodeId::new("w", 2)]);
        assert_eq!(v.console_log(&NodeId::new("w", 1)), "/kiln-unit/kiln-w-1.log");
        v.delete(&NodeId::new("w", 1)).unwrap();
        v.delete(&NodeId::new("w", 9)).unwrap();
        assert_eq!(v.nodes().unwrap(), [NodeId::new("w", 2)]);
        let mut left = v.names().unwrap();
        left.sort();
        assert_eq!(left, ["golden-w-0123.qcow2", "kiln-w-2.seed", "other.img"], "only the node's volumes go");

        // Another connection finds the pool as it is, wherever it was made.
        let again = Volumes::open("test:///default", "/elsewhere").unwrap();
        assert_eq!(again.dir(), "/kiln-unit");
        assert_eq!(again.nodes().unwrap(), [NodeId::new("w", 2)]);
    }

    #[test]
    fn reads_element_text() {
        let xml = "<pool><target><path>/var/lib/a&amp;b</path></target></pool>";
        assert_eq!(element_text(xml, "path").as_deref(), Some("/var/lib/a&b"));
        assert_eq!(element_text(xml, "nothing"), None);
    }
}
