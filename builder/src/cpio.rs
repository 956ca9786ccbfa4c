//! A reproducible `newc` cpio writer, the format the kernel unpacks as an
//! initramfs. Written here rather than taken from a crate because every
//! header field must be fixed (inode numbers, owners, mtime) for two builds
//! to give the same bytes, and the format is a 110-byte ASCII header.

use std::io::{self, Write};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file with its bytes.
    File(Vec<u8>),
    /// A symbolic link to the target path.
    Symlink(String),
    /// A character device (major, minor), e.g. `/dev/console`.
    CharDev(u32, u32),
}

/// Writes entries into a cpio stream with every mtime `mtime` (owner 0:0
/// unless given), numbering inodes in write order.
pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    mtime: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    /// A writer stamping every entry with `mtime` (SOURCE_DATE_EPOCH).
    pub fn new(out: W, mtime: u32) -> Self {
        Writer { out, ino: 1, mtime, written: 0 }
    }

    /// Appends `path` (relative, no leading slash) with permission bits `perm`.
    pub fn add(&mut self, path: &str, perm: u32, entry: &Entry) -> io::Result<()> {
        self.add_owned(path, perm, (0, 0), entry)
    }

    /// [`Writer::add`], owned by `owner` (uid, gid).
    pub fn add_owned(&mut self, path: &str, perm: u32, owner: (u32, u32), entry: &Entry) -> io::Result<()> {
        let (kind, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (0o040000, &[], (0, 0)),
            Entry::File(bytes) => (0o100000, bytes, (0, 0)),
            Entry::Symlink(target) => (0o120000, target.as_bytes(), (0, 0)),
            Entry::CharDev(maj, min) => (0o020000, &[], (*maj, *min)),
        };
        let ino = self.ino;
        self.ino += 1;
        self.record(path, kind | (perm & 0o7777), owner, ino, data, rdev)
    }

    fn record(&mut self, path: &str, mode: u32, owner: (u32, u32), ino: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let name_len = path.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = owner.0,
            gid = owner.1,
            mtime = self.mtime,
            size = data.len(),
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name_len,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(path.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..rem])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.record("TRAILER!!!", 0, (0, 0), 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_aligned_and_fixed() {
        let mut w = Writer::new(Vec::new(), 0);
        w.add("init", 0o755, &Entry::File(b"#!/bin/sh\n".to_vec())).unwrap();
        w.add("dev", 0o755, &Entry::Dir).unwrap();
        w.add("dev/console", 0o600, &Entry::CharDev(5, 1)).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // init: mode 0100755 = 0x81ed
        assert_eq!(&out[14..22], b"000081ed");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("TRAILER!!!"));
        let again = {
            let mut w = Writer::new(Vec::new(), 0);
            w.add("init", 0o755, &Entry::File(b"#!/bin/sh\n".to_vec())).unwrap();
            w.add("dev", 0o755, &Entry::Dir).unwrap();
            w.add("dev/console", 0o600, &Entry::CharDev(5, 1)).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(out, again, "same entries, same bytes");
    }
}
