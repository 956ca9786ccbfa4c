//! The kernel command line, as `/proc/cmdline` holds it.

/// A parsed kernel command line: `key=value` parameters and bare flags, in
/// order. Double quotes group a value with spaces, as the kernel allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Parses the text of `/proc/cmdline`.
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut word = String::new();
        let mut quoted = false;
        let mut words = Vec::new();
        for c in text.chars() {
            match c {
                '"' => quoted = !quoted,
                c if c.is_whitespace() && !quoted => {
                    if !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                }
                c => word.push(c),
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
        for w in words {
            match w.split_once('=') {
                Some((k, v)) => params.push((k.to_string(), Some(v.to_string()))),
                None => params.push((w, None)),
            }
        }
        KernelCmdline { params }
    }

    /// The value of the last `key=value` for `key` (the kernel's own rule:
    /// later parameters override earlier ones).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.iter().rev().find(|(k, _)| k == key).and_then(|(_, v)| v.as_deref())
    }

    /// True when `key` appears, with or without a value.
    pub fn has(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_flags_and_quotes() {
        let c = KernelCmdline::parse(
            "BOOT_IMAGE=/vmlinuz console=ttyS0 quiet kiln.server=http://10.0.2.2:8080 note=\"a b\" kiln.token=x kiln.token=y\n",
        );
        assert_eq!(c.get("kiln.server"), Some("http://10.0.2.2:8080"));
        assert_eq!(c.get("kiln.token"), Some("y"), "the last one wins");
        assert_eq!(c.get("note"), Some("a b"));
        assert!(c.has("quiet"));
        assert_eq!(c.get("quiet"), None);
        assert_eq!(c.get("missing"), None);
    }
}
