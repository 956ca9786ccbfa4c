//! iPXE scripts.
//!
//! `/boot.ipxe` is a bootstrap every machine can fetch: it chains to
//! `/ipxe?mac=${mac:hexhyp}&uuid=${uuid}&arch=${buildarch}&...`, filled in
//! by iPXE itself, so the server can pick the machine's profile. The
//! profile's script loads the image's kernel and initrd with the kernel
//! arguments the node needs to join. Each download is retried after a pause
//! when it fails, as iPXE users expect, instead of falling out to the next
//! boot device.

use kiln_core::{JoinParams, Mac, Manifest};

/// Seconds iPXE waits before retrying a failed download.
pub const RETRY_SECS: u32 = 3;

/// Where a booting machine finds the server and how its node joins: what
/// its boot script and its NoCloud seed are rendered with, besides its
/// profile and image.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// Base URL of the server as the node reaches it (`http://10.0.2.2:8080`).
    pub base_url: &'a str,
    /// The join token for this machine: minted for its MAC when the server
    /// expects it; `None` for any other machine (it will be pending).
    pub token: Option<&'a str>,
    /// The control-plane API as the node's agent reaches it
    /// (`https://10.0.2.2:8443`; the base URL when the API is plain HTTP).
    pub api_url: &'a str,
}

impl BootParams<'_> {
    /// The join parameters of a node booting `image`.
    pub fn join(&self, image: &Manifest) -> JoinParams {
        JoinParams::new(self.api_url, self.token, Some(image.digest))
    }
}

/// The bootstrap script served at `/boot.ipxe` (BIOS and UEFI alike): it
/// asks `/ipxe` for this machine's script, with iPXE's own settings.
pub fn bootstrap_script(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    format!(
        "#!ipxe\n\
         :retry\n\
         chain --autofree {base}/ipxe?mac=${{mac:hexhyp}}&uuid=${{uuid}}&arch=${{buildarch}}&platform=${{platform}}&serial=${{serial}}&hostname=${{hostname}} || goto failed\n\
         :failed\n\
         echo kiln: could not fetch this machine's boot script, retrying in {RETRY_SECS} s\n\
         sleep {RETRY_SECS}\n\
         goto retry\n"
    )
}

/// The script that boots `image` (one generation: every URL names its
/// digest, `/images/<name>/<hex>/<file>`): its kernel with the image's own
/// arguments, `extra_args` (the profile's), and `kiln.server`, `kiln.token`
/// (when the machine has one), `kiln.image_digest`; with `mac`, also the NoCloud seed URL
/// `ds=nocloud-net;s=BASE/cloud-init/MAC/HEX/` (the seed of that generation); for a diskless image, its root
/// filesystem's URL and sha256 (`kiln.rootfs`, `kiln.rootfs_sha256`).
/// `initrd=` names the initrd for kernels started by UEFI's EFI stub.
pub fn boot_script(image: &Manifest, extra_args: &[String], mac: Option<Mac>, params: &BootParams<'_>) -> String {
    let base = params.base_url.trim_end_matches('/');
    // Every URL names the generation: a build finishing mid-boot cannot mix two.
    let url = |file: &str| format!("{base}/images/{}/{}/{file}", image.name, image.digest.hex());
    let mut args = vec![format!("initrd={}", image.boot.initrd)];
    args.extend(image.boot.cmdline.iter().cloned());
    args.extend(extra_args.iter().cloned());
    args.extend(params.join(image).kernel_args());
    if let Some(rootfs) = image.boot.rootfs.as_ref().and_then(|name| image.artifact(name)) {
        args.push(format!("{}={}", kiln_core::CMDLINE_ROOTFS, url(&rootfs.name)));
        args.push(format!("{}={}", kiln_core::CMDLINE_ROOTFS_SHA256, rootfs.sha256));
    }
    if let Some(mac) = mac {
        // `nocloud-net`: cloud-init before 24.1 takes `ds=nocloud` for a
        // local seed and ignores an http:// one.
        // The seed names the generation too: its `kiln.image_digest` is the
        // one this script boots, whatever a build does meanwhile.
        args.push(format!("ds=nocloud-net;s={base}/cloud-init/{}/{}/", mac.hyphenated(), image.digest.hex()));
    }
    format!(
        "#!ipxe\n\
         echo kiln: booting {name} {digest}\n\
         :kernel\n\
         kernel {kernel} {args} || goto kernel_failed\n\
         :initrd\n\
         initrd {initrd} || goto initrd_failed\n\
         boot || goto boot_failed\n\
         :kernel_failed\n\
         echo kiln: kernel download failed, retrying in {RETRY_SECS} s\n\
         sleep {RETRY_SECS}\n\
         goto kernel\n\
         :initrd_failed\n\
         echo kiln: initrd download failed, retrying in {RETRY_SECS} s\n\
         sleep {RETRY_SECS}\n\
         goto initrd\n\
         :boot_failed\n\
         echo kiln: boot failed, starting over in {RETRY_SECS} s\n\
         sleep {RETRY_SECS}\n\
         goto kernel\n",
        name = image.name,
        digest = image.digest,
        kernel = url(&image.boot.kernel),
        args = args.join(" "),
        initrd = url(&image.boot.initrd),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_chains_with_ipxe_settings_and_retries() {
        let s = bootstrap_script("http://10.0.2.2:8080/");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("chain --autofree http://10.0.2.2:8080/ipxe?mac=${mac:hexhyp}&uuid=${uuid}&arch=${buildarch}&"), "{s}");
        assert!(s.contains("|| goto failed") && s.contains("sleep 3\ngoto retry\n"), "{s}");
    }

    #[test]
    fn script_carries_what_the_agent_needs() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::store::tests::write_image(dir.path(), "tiny");
        let mac = "52:54:00:ab:cd:ef".parse().ok();
        let s = boot_script(
            &m,
            &["quiet".into()],
            mac,
            &BootParams { base_url: "http://10.0.2.2:8080/", token: Some("tok"), api_url: "https://10.0.2.2:8443" },
        );
        assert!(s.starts_with("#!ipxe\n"));
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let hex = m.digest.hex();
        assert!(
            kernel.starts_with(&format!("kernel http://10.0.2.2:8080/images/tiny/{hex}/vmlinuz initrd=initrd.img console=ttyS0 quiet ")),
            "{kernel}"
        );
        for want in [
            " kiln.server=https://10.0.2.2:8443 ",
            " kiln.token=tok ",
            &format!(" kiln.image_digest={} ", m.digest),
            &format!(" ds=nocloud-net;s=http://10.0.2.2:8080/cloud-init/52-54-00-ab-cd-ef/{hex}/ "),
        ] {
            assert!(kernel.contains(want), "{kernel} lacks {want:?}");
        }
        assert!(kernel.ends_with(" || goto kernel_failed"), "{kernel}");
        assert!(
            s.contains(&format!(
                "\ninitrd http://10.0.2.2:8080/images/tiny/{hex}/initrd.img || goto initrd_failed\nboot || goto boot_failed\n"
            )),
            "{s}"
        );
        assert!(s.contains(":kernel_failed\necho kiln: kernel download failed, retrying in 3 s\nsleep 3\ngoto kernel\n"), "{s}");
    }

    #[test]
    fn diskless_image_gets_its_root_filesystem_url_and_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = crate::store::tests::write_image(dir.path(), "worker");
        let params = BootParams { base_url: "http://10.0.2.2:8080", token: Some("tok"), api_url: "https://10.0.2.2:8443" };
        let plain = boot_script(&m, &[], None, &params);
        assert!(!plain.contains("kiln.rootfs"), "an image with no rootfs boots from its initrd alone: {plain}");
        m.artifacts.push(kiln_core::Artifact { name: "root.squashfs".into(), size: 9, sha256: "ab".repeat(32) });
        m.boot.rootfs = Some("root.squashfs".into());
        let s = boot_script(&m, &[], None, &params);
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(kernel.contains(&format!(" kiln.rootfs=http://10.0.2.2:8080/images/worker/{}/root.squashfs ", m.digest.hex())), "{kernel}");
        assert!(kernel.contains(&format!(" kiln.rootfs_sha256={} ", "ab".repeat(32))), "{kernel}");
    }
}
