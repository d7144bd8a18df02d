//! How counts and byte strings (paths, snapshot names, tags) are shown to people: one
//! owner, so the CLI's tables and `status`'s report say them the same way.

/// A path or a name (a snapshot's, a tag's) for line-oriented output: a backslash, a
/// control character (a newline, a tab) and each byte that is not UTF-8 become `\` and
/// three octal digits, as in zfs diff and /proc/mounts, so every row is one line and
/// names exactly what it lists.
pub fn escaped(bytes: &[u8]) -> String {
    fn push_octal(out: &mut String, byte: u8) {
        out.push('\\');
        for shift in [6, 3, 0] {
            out.push(char::from(b'0' + ((byte >> shift) & 7)));
        }
    }
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c.is_control() {
                let mut utf8 = [0; 4];
                for byte in c.encode_utf8(&mut utf8).bytes() {
                    push_octal(&mut out, byte);
                }
            } else {
                out.push(c);
            }
        }
        for &byte in chunk.invalid() {
            push_octal(&mut out, byte);
        }
    }
    out
}

/// `n` and the noun that fits it: "1 file", "2 files".
pub fn counted(n: impl std::fmt::Display, one: &str, many: &str) -> String {
    let n = n.to_string();
    let noun = if n == "1" { one } else { many };
    format!("{n} {noun}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_on_one_line_and_name_their_bytes() {
        assert_eq!(escaped(b"/src/main.rs"), "/src/main.rs");
        assert_eq!(escaped("/été/日本".as_bytes()), "/été/日本");
        assert_eq!(escaped(b"/a\nb\tc"), "/a\\012b\\011c");
        assert_eq!(escaped(b"/back\\slash"), "/back\\134slash");
        assert_eq!(escaped(b"/\xffbin\x7f"), "/\\377bin\\177");
        // A C1 control is two bytes of UTF-8, each escaped.
        assert_eq!(escaped("/\u{85}".as_bytes()), "/\\302\\205");
    }

    #[test]
    fn counts_take_the_noun_that_fits() {
        assert_eq!(counted(1, "snapshot", "snapshots"), "1 snapshot");
        assert_eq!(counted(0, "snapshot", "snapshots"), "0 snapshots");
        assert_eq!(counted(2, "directory", "directories"), "2 directories");
    }
}
