//! The guest's `/etc/passwd`: the role's user is looked up here by name
//! (uid, primary gid, home). Only the fields the role needs are read; a line
//! that does not parse is skipped.

/// An `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Finds `user` in passwd-format `text`.
pub fn lookup_user(text: &str, user: &str) -> Option<PasswdEntry> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || f[0] != user {
            return None;
        }
        Some(PasswdEntry {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_user_and_skips_lines_that_do_not_parse() {
        let text = "root:x:0:0:root:/root:/bin/sh\nshort:x:1\nbad:x:a:1::/:/bin/sh\nreddog:x:1000:1001:role:/home/reddog:/bin/sh\n";
        assert_eq!(
            lookup_user(text, "reddog"),
            Some(PasswdEntry {
                uid: 1000,
                gid: 1001,
                home: "/home/reddog".into()
            })
        );
        assert_eq!(lookup_user(text, "short"), None);
        assert_eq!(lookup_user(text, "bad"), None);
        assert_eq!(lookup_user(text, "nobody"), None);
    }
}
