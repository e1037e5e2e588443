//! Docker's word processing: quote removal and variable substitution (`$VAR`, `${VAR}`,
//! `${VAR:-x}`, `${VAR-x}`, `${VAR:+x}`, `${VAR+x}`), honouring the parser's escape character.
//!
//! Single quotes keep everything literal; double quotes keep spaces but expand variables; the
//! escape character makes the next character literal (inside double quotes only before `"`, `$`
//! and the escape character itself, as in a shell).

/// The most bytes one expanded word (or all the words of one text) may hold: 1 MiB. Checked
/// while the result grows, so a substitution bomb fails before it takes any memory.
pub const MAX_EXPANDED: usize = 1 << 20;

/// How deeply `${A:-${B:-...}}` may nest.
pub const MAX_NESTING: usize = 32;

/// Variables visible to substitution, in definition order (later wins).
pub trait Vars {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Vars for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Vars for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Vars::get(self.as_slice(), name)
    }
}

/// A word-processing error (unterminated quote or `${`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LexError(pub String);

#[derive(Debug, Clone)]
pub struct Lexer {
    pub escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer { escape: '\\' }
    }
}

impl Lexer {
    pub fn new(escape: char) -> Self {
        Lexer { escape }
    }

    /// Process one word: quotes removed, variables expanded; whitespace is kept as is.
    pub fn process_word<V: Vars + ?Sized>(&self, word: &str, vars: &V) -> Result<String, LexError> {
        let words = self.process(word, vars, false, 0)?;
        Ok(words.into_iter().next().unwrap_or_default())
    }

    /// Split on unquoted whitespace, then process each word. An unquoted variable that expands
    /// to nothing yields no word.
    pub fn process_words<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
    ) -> Result<Vec<String>, LexError> {
        self.process(text, vars, true, 0)
    }

    /// Expand the body of an unquoted heredoc of COPY/ADD, as BuildKit does: variables are
    /// substituted everywhere, quotes are ordinary characters (kept), the escape character makes
    /// the next character literal (`\$` is `$`, `\\` is `\`); whitespace and lines are kept.
    pub fn expand_heredoc<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
    ) -> Result<String, LexError> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == self.escape {
                out.push(chars.get(i + 1).copied().unwrap_or(c));
                i += 2;
            } else if c == '$' {
                let (value, used) = self.variable(&chars[i..], vars, text, 0)?;
                out.push_str(&value);
                i += used;
            } else {
                out.push(c);
                i += 1;
            }
            if out.len() > MAX_EXPANDED {
                return Err(LexError(format!(
                    "the expanded text is longer than {} MiB",
                    MAX_EXPANDED >> 20
                )));
            }
        }
        Ok(out)
    }

    /// Split on unquoted whitespace without expanding or removing quotes (for `k=v` lists).
    pub fn split_raw(&self, text: &str) -> Result<Vec<String>, LexError> {
        let mut words = Vec::new();
        let mut cur = String::new();
        let mut chars = text.chars().peekable();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match quote {
                Some(q) => {
                    cur.push(c);
                    if c == self.escape && q == '"' {
                        if let Some(n) = chars.next() {
                            cur.push(n);
                        }
                    } else if c == q {
                        quote = None;
                    }
                }
                None if c.is_whitespace() => {
                    if !cur.is_empty() {
                        words.push(std::mem::take(&mut cur));
                    }
                }
                None => {
                    cur.push(c);
                    if c == self.escape {
                        if let Some(n) = chars.next() {
                            cur.push(n);
                        }
                    } else if c == '"' || c == '\'' {
                        quote = Some(c);
                    }
                }
            }
        }
        if let Some(q) = quote {
            return Err(LexError(format!("unterminated {q} quote in {text:?}")));
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        Ok(words)
    }

    fn process<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
        split: bool,
        depth: usize,
    ) -> Result<Vec<String>, LexError> {
        if depth > MAX_NESTING {
            return Err(LexError(format!(
                "variable substitutions nested more than {MAX_NESTING} deep"
            )));
        }
        let chars: Vec<char> = text.chars().collect();
        // Bytes in finished words; with `cur`, never more than MAX_EXPANDED.
        let mut done = 0usize;
        let too_long = || {
            LexError(format!(
                "the expanded text is longer than {} MiB",
                MAX_EXPANDED >> 20
            ))
        };
        let mut words = Vec::new();
        let mut cur = String::new();
        // Whether the current word has content that counts even when empty ("" or '').
        let mut started = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if split && c.is_whitespace() {
                if started || !cur.is_empty() {
                    done += cur.len();
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
                i += 1;
                continue;
            }
            if c == self.escape {
                match chars.get(i + 1) {
                    Some(&n) => {
                        cur.push(n);
                        i += 2;
                    }
                    None => {
                        cur.push(c);
                        i += 1;
                    }
                }
                continue;
            }
            match c {
                '\'' => {
                    started = true;
                    let end = chars[i + 1..]
                        .iter()
                        .position(|&x| x == '\'')
                        .ok_or_else(|| LexError(format!("unterminated ' quote in {text:?}")))?;
                    cur.extend(&chars[i + 1..i + 1 + end]);
                    i += end + 2;
                }
                '"' => {
                    started = true;
                    i += 1;
                    loop {
                        let Some(&d) = chars.get(i) else {
                            return Err(LexError(format!("unterminated \" quote in {text:?}")));
                        };
                        if d == '"' {
                            i += 1;
                            break;
                        }
                        if d == self.escape {
                            match chars.get(i + 1) {
                                Some(&n) if n == '"' || n == '$' || n == self.escape => {
                                    cur.push(n);
                                    i += 2;
                                }
                                _ => {
                                    cur.push(d);
                                    i += 1;
                                }
                            }
                            continue;
                        }
                        if d == '$' {
                            let (value, used) = self.variable(&chars[i..], vars, text, depth)?;
                            if done + cur.len() + value.len() > MAX_EXPANDED {
                                return Err(too_long());
                            }
                            cur.push_str(&value);
                            i += used;
                            continue;
                        }
                        cur.push(d);
                        i += 1;
                    }
                }
                '$' => {
                    let (value, used) = self.variable(&chars[i..], vars, text, depth)?;
                    if done + cur.len() + value.len() > MAX_EXPANDED {
                        return Err(too_long());
                    }
                    i += used;
                    if !split {
                        cur.push_str(&value);
                        continue;
                    }
                    // Field splitting of an unquoted expansion, as a shell does.
                    for v in value.chars() {
                        if v.is_whitespace() {
                            if started || !cur.is_empty() {
                                done += cur.len();
                                words.push(std::mem::take(&mut cur));
                                started = false;
                            }
                        } else {
                            cur.push(v);
                        }
                    }
                }
                _ => {
                    cur.push(c);
                    i += 1;
                }
            }
        }
        if done + cur.len() > MAX_EXPANDED {
            return Err(too_long());
        }
        if started || !cur.is_empty() || (!split && words.is_empty()) {
            words.push(cur);
        }
        Ok(words)
    }

    /// Expand the variable reference at the start of `s` (which begins with `$`). Returns the
    /// value and how many characters were consumed.
    fn variable<V: Vars + ?Sized>(
        &self,
        s: &[char],
        vars: &V,
        text: &str,
        depth: usize,
    ) -> Result<(String, usize), LexError> {
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
        match s.get(1) {
            Some('{') => {
                let mut braces = 0;
                let mut end = None;
                for (j, &c) in s.iter().enumerate().skip(2) {
                    match c {
                        '{' => braces += 1,
                        '}' if braces == 0 => {
                            end = Some(j);
                            break;
                        }
                        '}' => braces -= 1,
                        _ => {}
                    }
                }
                let end = end.ok_or_else(|| LexError(format!("missing '}}' in {text:?}")))?;
                let inner: String = s[2..end].iter().collect();
                let name_len = inner.chars().take_while(|&c| is_name(c)).count();
                let name = &inner[..name_len];
                if name.is_empty() {
                    return Err(LexError(format!("bad substitution in {text:?}")));
                }
                let rest = &inner[name_len..];
                let value = vars.get(name);
                let word = |w: &str| {
                    self.process(w, vars, false, depth + 1)
                        .map(|w| w.into_iter().next().unwrap_or_default())
                };
                let out = if rest.is_empty() {
                    value.unwrap_or("").to_string()
                } else if let Some(alt) = rest.strip_prefix(":-") {
                    match value {
                        Some(v) if !v.is_empty() => v.to_string(),
                        _ => word(alt)?,
                    }
                } else if let Some(alt) = rest.strip_prefix('-') {
                    match value {
                        Some(v) => v.to_string(),
                        None => word(alt)?,
                    }
                } else if let Some(alt) = rest.strip_prefix(":+") {
                    match value {
                        Some(v) if !v.is_empty() => word(alt)?,
                        _ => String::new(),
                    }
                } else if let Some(alt) = rest.strip_prefix('+') {
                    match value {
                        Some(_) => word(alt)?,
                        None => String::new(),
                    }
                } else {
                    return Err(LexError(format!(
                        "unsupported modifier {rest:?} in ${{{inner}}} of {text:?}"
                    )));
                };
                Ok((out, end + 1))
            }
            Some(&c) if is_name(c) && !c.is_ascii_digit() => {
                let len = s[1..].iter().take_while(|&&c| is_name(c)).count();
                let name: String = s[1..1 + len].iter().collect();
                Ok((vars.get(&name).unwrap_or("").to_string(), 1 + len))
            }
            _ => Ok(("$".to_string(), 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        [
            ("A", "apple"),
            ("EMPTY", ""),
            ("SP", "two words"),
            ("A", "avocado"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn word(s: &str) -> String {
        Lexer::default().process_word(s, &vars()).unwrap()
    }

    #[test]
    fn substitution_forms() {
        assert_eq!(word("$A"), "avocado");
        assert_eq!(word("${A}s"), "avocados");
        assert_eq!(word("$As"), "");
        assert_eq!(word("${NOPE:-dflt}"), "dflt");
        assert_eq!(word("${EMPTY:-dflt}"), "dflt");
        assert_eq!(word("${EMPTY-dflt}"), "");
        assert_eq!(word("${NOPE-dflt}"), "dflt");
        assert_eq!(word("${A:+set}"), "set");
        assert_eq!(word("${EMPTY:+set}"), "");
        assert_eq!(word("${EMPTY+set}"), "set");
        assert_eq!(word("${NOPE:-$A}"), "avocado");
        assert_eq!(word("/usr/$A/bin:$PATH"), "/usr/avocado/bin:");
        assert_eq!(word("cost $5"), "cost $5");
        assert_eq!(word("$"), "$");
    }

    #[test]
    fn quotes_and_escapes() {
        assert_eq!(word("'$A'"), "$A");
        assert_eq!(word("\"$A and $SP\""), "avocado and two words");
        assert_eq!(word("\\$A"), "$A");
        assert_eq!(word("\"a \\\" b\""), "a \" b");
        assert_eq!(word("\"c:\\path\""), "c:\\path");
        assert_eq!(word("a\\ b"), "a b");
        let bt = Lexer::new('`');
        assert_eq!(
            bt.process_word("c:\\dir\\`$A", &vars()).unwrap(),
            "c:\\dir\\$A"
        );
        assert!(Lexer::default().process_word("'open", &vars()).is_err());
        assert!(Lexer::default().process_word("${A", &vars()).is_err());
        assert!(Lexer::default().process_word("${A/x/y}", &vars()).is_err());
    }

    #[test]
    fn heredoc_bodies() {
        let l = Lexer::default();
        let v = vars();
        let x = |s: &str| l.expand_heredoc(s, &v).unwrap();
        assert_eq!(x("Hello ${A}!\n"), "Hello avocado!\n");
        assert_eq!(x("'$A' \"$A\"\n"), "'avocado' \"avocado\"\n");
        assert_eq!(x("\\\n"), "\n");
        assert_eq!(x("\\\\\n"), "\\\n");
        assert_eq!(x("\\$A ${NOPE:-d}\n"), "$A d\n");
        assert_eq!(x("\ttab  spaces\n\n"), "\ttab  spaces\n\n");
        assert!(l.expand_heredoc("${A", &v).is_err());
    }

    #[test]
    fn word_splitting() {
        let l = Lexer::default();
        assert_eq!(
            l.process_words("a  \"b c\" $SP '' $EMPTY d", &vars())
                .unwrap(),
            ["a", "b c", "two", "words", "", "d"].map(String::from)
        );
        assert_eq!(
            l.split_raw("k=v k2=\"a b\" k3='c d' k4=e\\ f").unwrap(),
            ["k=v", "k2=\"a b\"", "k3='c d'", "k4=e\\ f"].map(String::from)
        );
    }
}
