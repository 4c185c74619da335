//! Glob patterns selecting files of a restore point for a restore job:
//! `*` matches within one path segment, `?` one character, and a `**`
//! segment any number of segments (`**/*.db`, `data/**`).

/// Whether `s` is a pattern rather than a plain path.
pub fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Whether `path` (segments separated by `/`, no leading `/`) matches.
pub fn matches(pattern: &str, path: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match_segments(&pat, &segs)
}

fn match_segments(pat: &[&str], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((&"**", rest)) => (0..=segs.len()).any(|skip| match_segments(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => {
                match_segment(p.as_bytes(), s.as_bytes()) && match_segments(rest, srest)
            }
            None => false,
        },
    }
}

fn match_segment(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|skip| match_segment(rest, &s[skip..])),
        Some((b'?', rest)) => !s.is_empty() && match_segment(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && match_segment(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_stay_within_a_segment() {
        assert!(matches("*.db", "app.db"));
        assert!(!matches("*.db", "data/app.db"));
        assert!(matches("data/*.db", "data/app.db"));
        assert!(matches("d?ta/a*", "data/app.db"));
        assert!(!matches("d?ta/a*", "dta/app.db"));
    }

    #[test]
    fn double_star_spans_segments() {
        assert!(matches("**/*.db", "app.db"));
        assert!(matches("**/*.db", "a/b/c/app.db"));
        assert!(matches("data/**", "data/x/y"));
        assert!(matches("data/**", "data"));
        assert!(!matches("data/**", "other/x"));
        assert!(is_pattern("**") && !is_pattern("data/app.db"));
    }
}
