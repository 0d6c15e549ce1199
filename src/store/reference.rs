//! Image references as Docker spells them (its `distribution/reference` grammar):
//! `[DOMAIN/]PATH[:TAG]`, the tag `latest` when none is given. A tag that no registry or
//! Docker would accept is refused before anything is written, so `image ls`, `save` and
//! skopeo never meet a name like `x:` or `UPPER:Tag`.

use crate::error::{Error, Result};

/// Docker's limit on the name part (domain and path).
const NAME_MAX: usize = 255;
/// Docker's limit on a tag.
const TAG_MAX: usize = 128;

/// `name[:tag]` with the default tag `latest`; an error says what is wrong with `r`.
pub fn normalize_ref(r: &str) -> Result<String> {
    check(r).map_err(|why| Error::msg(format!("bad image reference {r:?}: {why}")))
}

fn check(r: &str) -> std::result::Result<String, &'static str> {
    if r.is_empty() {
        return Err("it is empty");
    }
    if r.contains('@') {
        return Err("digest references (NAME@sha256:...) are not supported; use the image ID");
    }
    // The tag is after the last ':' of the last path component (a domain may have a port).
    let last_start = r.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match r[last_start..].rfind(':') {
        Some(i) => (&r[..last_start + i], &r[last_start + i + 1..]),
        None => (r, "latest"),
    };
    if !is_tag(tag) {
        return Err(
            "a tag is 1-128 letters, digits, '_', '.' or '-', and starts with a letter, digit or '_'",
        );
    }
    if name.len() > NAME_MAX {
        return Err("the name is longer than 255 characters");
    }
    let mut comps: Vec<&str> = name.split('/').collect();
    // Docker's rule: the first of two or more components is a registry domain when it has
    // a '.' or a ':', is `localhost`, or has an uppercase letter.
    if comps.len() > 1 {
        let first = comps[0];
        if first.contains(['.', ':'])
            || first == "localhost"
            || first.bytes().any(|b| b.is_ascii_uppercase())
        {
            if !is_domain(first) {
                return Err("the registry part is not HOST or HOST:PORT");
            }
            comps.remove(0);
        }
    }
    for c in comps {
        if c.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("the repository name must be lowercase");
        }
        if !is_path_component(c) {
            return Err(
                "each name component is lowercase letters and digits, joined by '.', '_', '__' or '-'",
            );
        }
    }
    Ok(format!("{name}:{tag}"))
}

/// `[\w][\w.-]{0,127}`
fn is_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_MAX
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false; // empty run: leading, trailing or doubled separator
        }
        if i == b.len() {
            return true;
        }
        // A separator: '.', '_', '__' or one or more '-'.
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `HOST[:PORT]`, HOST dot-separated labels of letters, digits and inner '-'.
fn is_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::normalize_ref;

    #[test]
    fn docker_references_are_accepted_and_get_the_default_tag() {
        for (r, want) in [
            ("busybox", "busybox:latest"),
            ("bb-multi", "bb-multi:latest"),
            ("bb:1", "bb:1"),
            ("library/busybox:1.36.1-musl", "library/busybox:1.36.1-musl"),
            ("localhost/bb-base:1", "localhost/bb-base:1"),
            ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
            (
                "Registry.Example.com/x_y__z-w.v:T_1.a-b",
                "Registry.Example.com/x_y__z-w.v:T_1.a-b",
            ),
            ("a--b/c:_x", "a--b/c:_x"),
            ("1.0", "1.0:latest"),
        ] {
            assert_eq!(normalize_ref(r).unwrap(), want, "{r}");
        }
    }

    #[test]
    fn malformed_references_are_refused_with_the_reason() {
        for (r, why) in [
            ("", "empty"),
            ("x:", "a tag is"),
            (":x", "name component"),
            ("x::y", "name component"),
            ("x:-y", "a tag is"),
            ("x:.y", "a tag is"),
            ("UPPER:Tag", "lowercase"),
            ("a/Upper", "lowercase"),
            ("../x", "registry part"),
            ("x/../y", "name component"),
            ("a b", "name component"),
            ("x@sha256:00", "digest references"),
            ("x_", "name component"),
            ("x___y", "name component"),
            ("-x", "name component"),
            ("x/", "name component"),
            ("bad_host.com:port/x", "registry part"),
        ] {
            let e = normalize_ref(r).unwrap_err().to_string();
            assert!(e.contains(why), "{r:?}: {e}");
            assert!(e.starts_with(&format!("bad image reference {r:?}")), "{e}");
        }
        assert!(normalize_ref(&format!("x:{}", "t".repeat(128))).is_ok());
        assert!(normalize_ref(&format!("x:{}", "t".repeat(129))).is_err());
        assert!(normalize_ref(&"n".repeat(255)).is_ok());
        assert!(normalize_ref(&"n".repeat(256)).is_err());
    }
}
