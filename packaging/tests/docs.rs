//! The documentation that ships with Weft holds together: every relative
//! link and image in `README.md`, `docs/**.md` and `e2e/README.md` names a
//! file or directory that exists, every `#fragment` into a Markdown file
//! names one of its headings (GitHub's anchors), and the README links to
//! every page in `docs/`. Needs nothing but the checkout.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use weft_testing::repository;

/// The Markdown files checked: the README, every page under `docs/`, and
/// the e2e directory's README.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut found = vec![root.join("README.md"), root.join("e2e/README.md")];
    markdown_under(&root.join("docs"), &mut found);
    found.sort();
    found
}

fn markdown_under(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("listing {}: {error}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|error| panic!("listing {}: {error}", dir.display()))
            .path();
        if path.is_dir() {
            markdown_under(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "md") {
            found.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()))
}

/// A link or image target as written, and the line it is on (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    line: usize,
    target: String,
}

/// The lines of `text` outside fenced code blocks, with their numbers.
fn unfenced_lines(text: &str) -> Vec<(usize, &str)> {
    let mut lines = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        if let Some(mark) = marker {
            let run = trimmed.chars().take_while(|c| *c == mark).count();
            if run >= 3 {
                match fence {
                    None => fence = Some((mark, run)),
                    Some((open, length))
                        if open == mark && run >= length && trimmed[run..].trim().is_empty() =>
                    {
                        fence = None
                    }
                    Some(_) => {}
                }
                continue;
            }
        }
        if fence.is_none() {
            lines.push((index + 1, line));
        }
    }
    lines
}

/// The lines of `text` that Markdown renders as text, with their numbers:
/// fenced code blocks are left out, and inline code spans blanked, since
/// link syntax in code is not a link.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    unfenced_lines(text)
        .into_iter()
        .map(|(number, line)| (number, without_code_spans(line)))
        .collect()
}

/// `line` with the contents of every inline code span replaced by spaces.
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        // The span closes at the next run of exactly as many backticks.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let other = chars[j..].iter().take_while(|c| **c == '`').count();
                if other == run {
                    close = Some(j);
                    break;
                }
                j += other;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                out.extend(std::iter::repeat_n(' ', end + run - i));
                i = end + run;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    out
}

/// Every inline link and image target (`[text](target "title")`,
/// `![alt](<target>)`) and every reference definition (`[id]: target`).
fn links(text: &str) -> Vec<Link> {
    let mut found = Vec::new();
    for (line, prose) in prose_lines(text) {
        if let Some(target) = reference_definition(&prose) {
            found.push(Link { line, target });
            continue;
        }
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let (target, used) = inline_target(after);
            if let Some(target) = target {
                found.push(Link { line, target });
            }
            rest = &after[used..];
        }
    }
    found
}

/// The target of a `[id]: target` line.
fn reference_definition(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    let rest = line[indent..].strip_prefix('[')?;
    if indent > 3 || rest.starts_with('^') {
        return None;
    }
    let (label, rest) = rest.split_once("]:")?;
    if label.is_empty() || label.contains(']') {
        return None;
    }
    let target = rest.split_whitespace().next()?;
    Some(
        target
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_owned(),
    )
}

/// The target at the start of `text`, the part of an inline link after
/// `](`, and how many bytes of `text` the link used.
fn inline_target(text: &str) -> (Option<String>, usize) {
    let body = text.trim_start();
    let skipped = text.len() - body.len();
    if let Some(inner) = body.strip_prefix('<') {
        return match inner.find('>') {
            Some(end) => (Some(inner[..end].to_owned()), skipped + end + 2),
            None => (None, skipped),
        };
    }
    // A bare target ends at whitespace (a title follows) or at the `)`
    // that balances the link's opening parenthesis.
    let mut depth = 0usize;
    for (at, c) in body.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return (Some(body[..at].to_owned()), skipped + at + 1),
            ')' => depth -= 1,
            c if c.is_whitespace() => return (Some(body[..at].to_owned()), skipped + at),
            _ => {}
        }
    }
    (None, text.len())
}

/// Whether `target` leaves the repository: a URL with a scheme
/// (`https:`, `mailto:`, …).
fn is_external(target: &str) -> bool {
    let Some((scheme, _)) = target.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The anchors GitHub gives the headings of a Markdown text: each ATX
/// heading's text, lower-cased, with every character but letters, digits,
/// `-` and `_` dropped and spaces turned into `-`; a repeated anchor gets
/// `-1`, `-2`, … .
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for (_, line) in unfenced_lines(text) {
        let Some(heading) = heading_text(line) else {
            continue;
        };
        let slug: String = link_text(&heading)
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// The text of an ATX heading line (`## Text ##`), if it is one.
fn heading_text(line: &str) -> Option<String> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let level = rest.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &rest[level..];
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let text = rest.trim();
    let text = text.trim_end_matches('#');
    Some(text.trim().to_owned())
}

/// `text` with every `[label](target)` replaced by its label, as the
/// heading renders.
fn link_text(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](") else {
            break;
        };
        let label = &rest[open + 1..open + close];
        let (_, used) = inline_target(&rest[open + close + 2..]);
        out.push_str(&rest[..open]);
        out.push_str(label);
        rest = &rest[open + close + 2 + used..];
    }
    out.push_str(rest);
    out
}

/// A link that does not resolve.
struct Broken {
    document: PathBuf,
    line: usize,
    target: String,
    problem: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: ({}) {}",
            self.document.display(),
            self.line,
            self.target,
            self.problem
        )
    }
}

/// `path` with `.` and `..` resolved lexically, so a link that climbs out
/// of the repository is seen to.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Checks every relative link of `document` (a path under `root`).
fn check(root: &Path, document: &Path) -> Vec<Broken> {
    let text = read(document);
    let dir = document.parent().expect("a document is in a directory");
    let shown = document
        .strip_prefix(root)
        .unwrap_or(document)
        .to_path_buf();
    let mut broken = Vec::new();
    for Link { line, target } in links(&text) {
        if target.is_empty() || is_external(&target) {
            continue;
        }
        let fail = |problem: String| Broken {
            document: shown.clone(),
            line,
            target: target.clone(),
            problem,
        };
        let (path, fragment) = match target.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() {
            document.to_path_buf()
        } else if let Some(from_root) = path.strip_prefix('/') {
            normalize(&root.join(from_root))
        } else {
            normalize(&dir.join(path))
        };
        if !resolved.starts_with(root) {
            broken.push(fail("points outside the repository".to_owned()));
            continue;
        }
        if !resolved.exists() {
            let missing = resolved.strip_prefix(root).unwrap_or(&resolved);
            broken.push(fail(format!("{} does not exist", missing.display())));
            continue;
        }
        let Some(fragment) = fragment else {
            continue;
        };
        if resolved.extension().is_some_and(|ext| ext == "md") {
            let headings = anchors(&read(&resolved));
            if !headings.contains(fragment) {
                broken.push(fail(format!(
                    "no heading of {} has the anchor #{fragment}",
                    resolved.strip_prefix(root).unwrap_or(&resolved).display()
                )));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let root = repository();
    let documents = documents(root);
    assert!(
        documents.len() > 3,
        "found only {documents:?}: the docs are missing"
    );
    let broken: Vec<String> = documents
        .iter()
        .flat_map(|document| check(root, document))
        .map(|broken| broken.to_string())
        .collect();
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_readme_links_to_every_docs_page() {
    let root = repository();
    let readme = root.join("README.md");
    let linked: BTreeSet<PathBuf> = links(&read(&readme))
        .into_iter()
        .filter(|link| !is_external(&link.target))
        .map(|link| {
            let path = link.target.split('#').next().unwrap_or_default();
            normalize(&root.join(path))
        })
        .collect();
    let mut pages = Vec::new();
    markdown_under(&root.join("docs"), &mut pages);
    let missing: Vec<String> = pages
        .iter()
        .filter(|page| !linked.contains(*page))
        .map(|page| {
            page.strip_prefix(root)
                .unwrap_or(page)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README.md links to no page {missing:?}: add it to the Documentation section"
    );
}

#[test]
fn links_are_found_as_markdown_renders_them() {
    let text = "\
See [a](docs/a.md#part) and ![i](<img/x y.png> \"t\"), [w](https://x.org/(y)).
`[not](a link)` and [b](b.md 'title')
```sh
[not](in a fence)
```
[ref]: ../c.md#top
";
    let targets: Vec<(usize, String)> = links(text)
        .into_iter()
        .map(|link| (link.line, link.target))
        .collect();
    assert_eq!(
        targets,
        [
            (1, "docs/a.md#part".to_owned()),
            (1, "img/x y.png".to_owned()),
            (1, "https://x.org/(y)".to_owned()),
            (2, "b.md".to_owned()),
            (6, "../c.md#top".to_owned()),
        ]
    );
    assert!(is_external("https://x.org") && is_external("mailto:a@b.c"));
    assert!(!is_external("docs/a.md") && !is_external("#part"));
}

#[test]
fn anchors_follow_githubs_rules() {
    let text = "\
# Weft
## Agent: NetworkPolicy beside kube-router
### `weft-core` and [the plugin](x.md)
## Uninstall
## Uninstall ##
```
# not a heading
```
#not a heading either
";
    let expected: BTreeSet<String> = [
        "weft",
        "agent-networkpolicy-beside-kube-router",
        "weft-core-and-the-plugin",
        "uninstall",
        "uninstall-1",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(anchors(text), expected);
}
