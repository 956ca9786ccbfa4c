//! iPXE scripts.

use kiln_core::Manifest;

/// What a booting node is told on its kernel command line.
#[derive(Debug, Clone)]
pub struct BootParams<'a> {
    /// Base URL of the server as the node reaches it (`http://10.0.2.2:8080`).
    pub base_url: &'a str,
    /// The bootstrap token.
    pub token: &'a str,
}

/// The script that boots `image`: its kernel with the image's own arguments
/// plus `kiln.server`, `kiln.token` and `kiln.image_digest`, and its initrd.
/// `initrd=` names the initrd for kernels started by UEFI's EFI stub.
pub fn boot_script(image: &Manifest, params: &BootParams<'_>) -> String {
    let base = params.base_url.trim_end_matches('/');
    let url = |file: &str| format!("{base}/images/{}/{file}", image.name);
    let mut args = vec![format!("initrd={}", image.boot.initrd)];
    args.extend(image.boot.cmdline.iter().cloned());
    args.push(format!("{}={base}", kiln_core::CMDLINE_SERVER));
    args.push(format!("{}={}", kiln_core::CMDLINE_TOKEN, params.token));
    args.push(format!("{}={}", kiln_core::CMDLINE_IMAGE_DIGEST, image.digest));
    format!(
        "#!ipxe\n\
         echo kiln: booting {name} {digest}\n\
         kernel {kernel} {args}\n\
         initrd {initrd}\n\
         boot\n",
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
    fn script_carries_what_the_agent_needs() {
        let dir = tempfile::tempdir().unwrap();
        let m = crate::store::tests::write_image(dir.path(), "tiny");
        let s = boot_script(&m, &BootParams { base_url: "http://10.0.2.2:8080/", token: "tok" });
        assert!(s.starts_with("#!ipxe\n"));
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(kernel.starts_with("kernel http://10.0.2.2:8080/images/tiny/vmlinuz initrd=initrd.img console=ttyS0 "), "{kernel}");
        assert!(kernel.contains(" kiln.server=http://10.0.2.2:8080 "), "{kernel}");
        assert!(kernel.contains(" kiln.token=tok "), "{kernel}");
        assert!(kernel.ends_with(&format!(" kiln.image_digest={}", m.digest)), "{kernel}");
        assert!(s.contains("\ninitrd http://10.0.2.2:8080/images/tiny/initrd.img\nboot\n"), "{s}");
    }
}
