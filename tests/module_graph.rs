//! No module circles: in every crate of the workspace, the modules that share a parent (the
//! top-level modules of a crate, the files of a directory module) must not use each other in a
//! circle. A child using its parent's items (`super::Engine`) or a parent using its children is
//! the module tree, not a circle; two siblings that need each other are.
//!
//! The sources are parsed with `syn`; every `crate::`, `super::` and `self::` path, every path
//! through a child module and every `use` is resolved to the module it names. Run with
//! `--nocapture` to print each crate's top-level graph (ARCHITECTURE.md is drawn from it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// A module's path inside its crate (empty: the crate root).
type Module = Vec<String>;

/// Every module of a crate whose root is `root` (lib.rs or main.rs), with its file.
fn modules(root: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    out.insert(Vec::new(), root.to_path_buf());
    let mut todo = vec![(Vec::<String>::new(), root.to_path_buf())];
    while let Some((module, file)) = todo.pop() {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        // Where this module's children live: beside lib.rs/main.rs/mod.rs, else in a
        // directory named after the file.
        let base = file.parent().unwrap();
        let stem = file.file_stem().unwrap().to_str().unwrap();
        let dir = if module.is_empty() || stem == "mod" {
            base.to_path_buf()
        } else {
            base.join(stem)
        };
        for item in &ast.items {
            let syn::Item::Mod(m) = item else { continue };
            if m.content.is_some() || is_test(&m.attrs) {
                continue;
            }
            let name = m.ident.to_string();
            let candidates = [
                dir.join(format!("{name}.rs")),
                dir.join(&name).join("mod.rs"),
            ];
            let Some(child) = candidates.into_iter().find(|p| p.is_file()) else {
                panic!("{}: no file for mod {name}", file.display());
            };
            let mut path = module.clone();
            path.push(name);
            out.insert(path.clone(), child.clone());
            todo.push((path, child));
        }
    }
    out
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// The paths a module's file uses (test modules and items left out).
#[derive(Default)]
struct Paths(Vec<Vec<String>>);

impl Paths {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut p = prefix.clone();
                if n.ident != "self" {
                    p.push(n.ident.to_string());
                }
                self.0.push(p);
            }
            syn::UseTree::Rename(r) => {
                let mut p = prefix.clone();
                p.push(r.ident.to_string());
                self.0.push(p);
            }
            syn::UseTree::Glob(_) => self.0.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_test(&u.attrs) {
            self.use_tree(&mut Vec::new(), &u.tree);
        }
    }
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // Inline modules other than tests are part of this file's module.
        if !is_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }
    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.leading_colon.is_none() {
            self.0
                .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, p);
    }
    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Paths inside macro calls (`tracing::warn!(..)`, `format!`) are tokens: those that
        // name this crate's modules are found by re-parsing the tokens as expressions.
        self.visit_path(&m.path);
        let parser = syn::punctuated::Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated;
        if let Ok(args) = m.parse_body_with(parser) {
            for e in &args {
                self.visit_expr(e);
            }
        }
    }
}

/// The module `path` (used in module `from`) names, if it names one of `known`: the longest
/// known prefix of its resolution.
fn resolve(from: &Module, path: &[String], known: &BTreeSet<Module>) -> Option<Module> {
    let mut full: Module = match path.first().map(String::as_str) {
        Some("crate") => path[1..].to_vec(),
        Some("self") => from.iter().chain(&path[1..]).cloned().collect(),
        Some("super") => {
            let ups = path.iter().take_while(|s| *s == "super").count();
            let keep = from.len().checked_sub(ups)?;
            from[..keep].iter().chain(&path[ups..]).cloned().collect()
        }
        Some(first) => {
            // A child module of `from` (or, at the root, a top-level module).
            let mut child = from.clone();
            child.push(first.to_string());
            if !known.contains(&child) {
                return None;
            }
            from.iter().chain(path).cloned().collect()
        }
        None => return None,
    };
    while !full.is_empty() && !known.contains(&full) {
        full.pop();
    }
    Some(full)
}

/// Circles among the children of each module of the crate at `root`, and the top-level edges.
fn check(root: &Path) -> (Vec<String>, BTreeSet<(String, String)>) {
    let mods = modules(root);
    let known: BTreeSet<Module> = mods.keys().cloned().collect();
    // parent -> sibling edges among its children
    let mut edges: BTreeMap<Module, BTreeSet<(String, String)>> = BTreeMap::new();
    for (module, file) in &mods {
        let text = std::fs::read_to_string(file).unwrap();
        let ast = syn::parse_file(&text).unwrap();
        let mut paths = Paths::default();
        paths.visit_file(&ast);
        for p in &paths.0 {
            let Some(target) = resolve(module, p, &known) else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            // An ancestor's items, or a descendant: the tree itself.
            if common == module.len() || common == target.len() {
                continue;
            }
            edges
                .entry(module[..common].to_vec())
                .or_default()
                .insert((module[common].clone(), target[common].clone()));
        }
    }
    let mut circles = Vec::new();
    for (parent, es) in &edges {
        for scc in cycles(es) {
            let at = if parent.is_empty() {
                "crate".to_string()
            } else {
                parent.join("::")
            };
            circles.push(format!("{}: {at}: {}", root.display(), scc.join(" ⇄ ")));
        }
    }
    let top = edges.get(&Vec::new()).cloned().unwrap_or_default();
    (circles, top)
}

/// The strongly connected components of more than one node (Tarjan's, iteratively).
fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges.iter().flat_map(|(a, b)| [a, b]).collect();
    let nodes: Vec<&String> = nodes.into_iter().collect();
    let at = |n: &String| nodes.iter().position(|m| *m == n).unwrap();
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (a, b) in edges {
        next[at(a)].push(at(b));
    }
    let (mut index, mut low) = (vec![usize::MAX; nodes.len()], vec![0; nodes.len()]);
    let (mut on, mut stack, mut out, mut counter) =
        (vec![false; nodes.len()], Vec::new(), Vec::new(), 0);
    for start in 0..nodes.len() {
        if index[start] != usize::MAX {
            continue;
        }
        let mut work = vec![(start, 0usize)];
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            if *i == 0 {
                index[v] = counter;
                low[v] = counter;
                counter += 1;
                stack.push(v);
                on[v] = true;
            }
            if let Some(&w) = next[v].get(*i) {
                *i += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(u, _)) = work.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                let mut scc = Vec::new();
                while let Some(w) = stack.pop() {
                    on[w] = false;
                    scc.push(nodes[w].clone());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    out.push(scc);
                }
            }
        }
    }
    out
}

#[test]
fn no_module_circles() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut roots = vec![
        ws.join("src/lib.rs"),
        ws.join("images/src/lib.rs"),
        ws.join("sandbox/src/lib.rs"),
        ws.join("client/src/lib.rs"),
    ];
    for dir in ["src/bin", "client/src/bin"] {
        if let Ok(entries) = std::fs::read_dir(ws.join(dir)) {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
    }
    let mut all = Vec::new();
    for root in roots.iter().filter(|r| r.is_file()) {
        let (circles, top) = check(root);
        println!("{}:", root.strip_prefix(ws).unwrap_or(root).display());
        for (a, b) in &top {
            println!("  {a} -> {b}");
        }
        all.extend(circles);
    }
    assert!(all.is_empty(), "module circles:\n{}", all.join("\n"));
}

#[test]
fn a_circle_is_found() {
    let e: BTreeSet<(String, String)> = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(cycles(&e), vec![vec!["a", "b", "c"]]);
    let known: BTreeSet<Module> = [vec![], vec!["x".into()], vec!["x".into(), "y".into()]]
        .into_iter()
        .collect();
    let from: Module = vec!["x".into(), "y".into()];
    assert_eq!(
        resolve(&from, &["super".into(), "Item".into()], &known),
        Some(vec!["x".into()])
    );
    assert_eq!(
        resolve(&vec![], &["x".into(), "y".into(), "f".into()], &known),
        Some(vec!["x".into(), "y".into()])
    );
}

/// The SQL statements' first words: a string literal starting with one of them (then a space or
/// a line break) is SQL.
const SQL_WORDS: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "LISTEN", "UNLISTEN", "NOTIFY", "SET",
    "CREATE", "ALTER", "DROP", "TRUNCATE", "BEGIN", "COMMIT", "ROLLBACK",
];

/// Whether a string literal (as written: `"..."`, `r#"..."#`) is an SQL statement.
fn is_sql(literal: &str) -> bool {
    let Some(text) = literal
        .trim_start_matches('r')
        .trim_start_matches('#')
        .strip_prefix('"')
    else {
        return false;
    };
    SQL_WORDS.iter().any(|w| {
        text.strip_prefix(w)
            .is_some_and(|rest| rest.starts_with([' ', '\n', '\t']) || rest.starts_with("\\n"))
    })
}

/// The SQL string literals of `tokens` (inside macros too: `format!("UPDATE ...")`).
fn sql_literals(tokens: proc_macro2::TokenStream, out: &mut Vec<String>) {
    for t in tokens {
        match t {
            proc_macro2::TokenTree::Group(g) => sql_literals(g.stream(), out),
            proc_macro2::TokenTree::Literal(l) => {
                let text = l.to_string();
                if is_sql(&text) {
                    out.push(text.chars().take(60).collect());
                }
            }
            _ => {}
        }
    }
}

/// Every SQL string literal in the `.rs` files under `dir` but those under `allowed`:
/// `file: literal`.
fn sql_outside(dir: &Path, allowed: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.starts_with(allowed) {
                continue;
            }
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let tokens: proc_macro2::TokenStream = text
                    .parse()
                    .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                let mut sql = Vec::new();
                sql_literals(tokens, &mut sql);
                found.extend(sql.into_iter().map(|s| format!("{}: {s}", path.display())));
            }
        }
    }
    found.sort();
    found
}

/// All SQL lives in the cluster's records (`src/cluster/records/`): no other file of the
/// daemon holds an SQL statement (the migrations are `.sql` files).
#[test]
fn sql_lives_in_the_records() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = sql_outside(&ws.join("src"), &ws.join("src/cluster/records"));
    assert!(
        found.is_empty(),
        "SQL outside src/cluster/records/:\n{}",
        found.join("\n")
    );
    // The records do hold SQL (the check sees it).
    assert!(!sql_outside(&ws.join("src/cluster/records"), &ws.join("none")).is_empty());
}

#[test]
fn sql_literals_are_recognised() {
    for sql in [
        r#""SELECT 1""#,
        "\"UPDATE jobs SET state = 'x'\"",
        "r#\"WITH a AS (SELECT 1)\n SELECT * FROM a\"#",
        "\"DELETE\nFROM jobs\"",
        "\"LISTEN mistry_jobs\"",
    ] {
        assert!(is_sql(sql), "{sql}");
    }
    for text in [
        r#""Selected jobs""#,
        r#"" SELECT (a doc comment)""#,
        r#""WITHOUT""#,
        r#"b"SELECT""#,
        "'S'",
    ] {
        assert!(!is_sql(text), "{text}");
    }
    let mut found = Vec::new();
    sql_literals(
        r#"fn f() { c.execute(&format!("UPDATE jobs SET a = {}", 1), &[]); }"#
            .parse()
            .unwrap(),
        &mut found,
    );
    assert_eq!(found.len(), 1);
}
