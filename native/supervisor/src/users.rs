//! `user` fields: a name looked up in the sandbox's /etc/passwd (+ /etc/group for supplementary
//! groups), `uid`, `uid:gid`, or `name:group`. Parsed by hand: a static glibc cannot use NSS,
//! and the image's files are the only truth inside a sandbox anyway.

use crate::errors::OpError;

#[derive(Debug, Clone, PartialEq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: Option<String>,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members) of every well-formed /etc/group line.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

fn supplementary(group: &str, name: &str, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    for (_, gid, members) in group_entries(group) {
        if members.contains(&name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// Resolves `spec` against the given passwd and group file contents; "" is None (root, the
/// image's default).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Option<Cred>, OpError> {
    if spec.is_empty() {
        return Ok(None);
    }
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let mut cred = if let Ok(uid) = user.parse::<u32>() {
        // A number need not be in passwd; when it is, its gid, home and groups apply (as docker).
        match passwd_entries(passwd).find(|e| e.uid == uid) {
            Some(e) => Cred {
                uid,
                gid: e.gid,
                groups: supplementary(group, e.name, e.gid),
                home: Some(e.home.to_owned()),
            },
            None => Cred {
                uid,
                gid: 0,
                groups: vec![0],
                home: None,
            },
        }
    } else {
        let e = passwd_entries(passwd)
            .find(|e| e.name == user)
            .ok_or_else(|| {
                OpError::invalid(format!("unknown user \"{user}\" (not in /etc/passwd)"))
            })?;
        Cred {
            uid: e.uid,
            gid: e.gid,
            groups: supplementary(group, e.name, e.gid),
            home: Some(e.home.to_owned()),
        }
    };
    if let Some(g) = grp {
        let gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(n, _, _)| *n == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| {
                    OpError::invalid(format!("unknown group \"{g}\" (not in /etc/group)"))
                })?,
        };
        // An explicit group replaces the primary one and the supplementary list (as docker -u).
        cred.gid = gid;
        cred.groups = vec![gid];
    }
    Ok(Some(cred))
}

/// Resolves against the live /etc/passwd and /etc/group (missing files read as empty).
pub fn resolve_system(spec: &str) -> Result<Option<Cred>, OpError> {
    if spec.is_empty() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &passwd, &group)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken line\n\
        alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\nbob:x:1001:100::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nusers:x:100:alice\nalice:x:1000:\ndocker:x:999:alice,bob\n";

    #[test]
    fn name_gets_gid_home_and_supplementary_groups() {
        let c = resolve("alice", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!(
            c,
            Cred {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 100, 999],
                home: Some("/home/alice".into())
            }
        );
    }

    #[test]
    fn numbers_need_no_passwd_entry() {
        let c = resolve("4242", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!((c.uid, c.gid, c.home), (4242, 0, None));
        let c = resolve("4242:77", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (4242, 77, vec![77]));
        let c = resolve("1001", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!((c.gid, c.groups), (100, vec![100, 999]));
    }

    #[test]
    fn name_with_group_name() {
        let c = resolve("bob:docker", PASSWD, GROUP).unwrap().unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (1001, 999, vec![999]));
    }

    #[test]
    fn unknown_names_are_einval() {
        let e = resolve("carol", PASSWD, GROUP).unwrap_err();
        assert_eq!(e.code, "EINVAL");
        assert_eq!(e.message, "unknown user \"carol\" (not in /etc/passwd)");
        assert!(resolve("bob:nogroup", PASSWD, GROUP).is_err());
        assert_eq!(resolve("", PASSWD, GROUP).unwrap(), None);
    }
}
