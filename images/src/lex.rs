//! Docker's word processing: quote removal and variable substitution (`$VAR`, `${VAR}`,
//! `${VAR:-x}`, `${VAR-x}`, `${VAR:+x}`, `${VAR+x}`, `${VAR:?message}`, `${VAR?message}`),
//! honouring the parser's escape character, as BuildKit's shell lexer does (`$1`, `$@`, `$$`
//! and the other positional and special parameters are never set). BuildKit's pattern forms
//! (`${VAR#p}`, `${VAR%p}`, `${VAR/p/r}`) are refused as unsupported.
//!
//! Single quotes keep everything literal; double quotes keep spaces but expand variables; the
//! escape character makes the next character literal (inside double quotes only before `"`, `$`
//! and the escape character itself, as in a shell); an escape character ending the text is
//! dropped. The word of `${VAR:-word}` ends at the first `}` that is not quoted or escaped.

/// The most bytes one expanded word (or all the words of one text) may hold: 1 MiB. Checked
/// while the result grows, so a substitution bomb fails before it takes any memory.
pub const MAX_EXPANDED: usize = 1 << 20;

/// How deeply `${A:-${B:-...}}` may nest.
pub const MAX_NESTING: usize = 32;

/// Variables visible to substitution, in definition order (later wins).
pub trait Vars {
    /// The value of variable `name`; `None` when it is not set (an empty value is `Some("")`).
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

/// Docker's word processing (quotes, escapes, `$VAR`, `${VAR:-default}`, ...) with a given
/// escape character.
#[derive(Debug, Clone)]
pub struct Lexer {
    /// The escape character: `\` by default, or the Dockerfile's `# escape=` (e.g. `` ` ``).
    pub escape: char,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer { escape: '\\' }
    }
}

impl Lexer {
    /// A lexer with escape character `escape`.
    pub fn new(escape: char) -> Self {
        Lexer { escape }
    }

    /// Process one word: quotes removed, variables expanded; whitespace is kept as is.
    pub fn process_word<V: Vars + ?Sized>(&self, word: &str, vars: &V) -> Result<String, LexError> {
        let words = self.run(word, vars, WORD)?;
        Ok(words.into_iter().next().unwrap_or_default())
    }

    /// Split on unquoted whitespace, then process each word. An unquoted variable that expands
    /// to nothing yields no word.
    pub fn process_words<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
    ) -> Result<Vec<String>, LexError> {
        self.run(text, vars, WORDS)
    }

    /// Expand the body of an unquoted heredoc of COPY/ADD, as BuildKit does: variables are
    /// substituted everywhere, quotes are ordinary characters (kept, also in the word of a
    /// `${VAR:-word}`), the escape character makes the next character literal (`\$` is `$`,
    /// `\\` is `\`); whitespace and lines are kept.
    pub fn expand_heredoc<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
    ) -> Result<String, LexError> {
        let words = self.run(text, vars, HEREDOC)?;
        Ok(words.into_iter().next().unwrap_or_default())
    }

    fn run<V: Vars + ?Sized>(
        &self,
        text: &str,
        vars: &V,
        mode: Mode,
    ) -> Result<Vec<String>, LexError> {
        let chars: Vec<char> = text.chars().collect();
        let scan = Scan {
            escape: self.escape,
            chars: &chars,
            text,
            vars,
        };
        scan.words(&mut 0, None, mode, 0)
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
}

/// How a text is processed: split into words or not; quotes processed (removed) or kept.
#[derive(Clone, Copy)]
struct Mode {
    split: bool,
    quotes: bool,
}

const WORD: Mode = Mode {
    split: false,
    quotes: true,
};
const WORDS: Mode = Mode {
    split: true,
    quotes: true,
};
const HEREDOC: Mode = Mode {
    split: false,
    quotes: false,
};

fn too_long() -> LexError {
    LexError(format!(
        "the expanded text is longer than {} MiB",
        MAX_EXPANDED >> 20
    ))
}

/// One text being processed, read as BuildKit's shell lexer reads it: from a position up to a
/// stop character (the `}` ending the word of `${VAR:-word}`) or the end.
struct Scan<'a, V: Vars + ?Sized> {
    escape: char,
    chars: &'a [char],
    /// The whole text, for error messages.
    text: &'a str,
    vars: &'a V,
}

impl<V: Vars + ?Sized> Scan<'_, V> {
    /// The words from `chars[*i]` up to `stop` (consumed; an error if the text ends first) or
    /// the end. Without `mode.split`, exactly one word.
    fn words(
        &self,
        i: &mut usize,
        stop: Option<char>,
        mode: Mode,
        depth: usize,
    ) -> Result<Vec<String>, LexError> {
        if depth > MAX_NESTING {
            return Err(LexError(format!(
                "variable substitutions nested more than {MAX_NESTING} deep"
            )));
        }
        let chars = self.chars;
        // Bytes in finished words; with `cur`, never more than MAX_EXPANDED.
        let mut done = 0usize;
        let mut words = Vec::new();
        let mut cur = String::new();
        // Whether the current word has content that counts even when empty ("" or '').
        let mut started = false;
        let mut stopped = false;
        while let Some(&c) = chars.get(*i) {
            if Some(c) == stop {
                *i += 1;
                stopped = true;
                break;
            }
            if mode.split && c.is_whitespace() {
                if started || !cur.is_empty() {
                    done += cur.len();
                    words.push(std::mem::take(&mut cur));
                    started = false;
                }
                *i += 1;
                continue;
            }
            if c == self.escape {
                // The next character, literally; an escape at the very end is dropped.
                if let Some(&n) = chars.get(*i + 1) {
                    cur.push(n);
                }
                *i += 2;
                continue;
            }
            match c {
                '\'' if mode.quotes => {
                    started = true;
                    let end = chars[*i + 1..]
                        .iter()
                        .position(|&x| x == '\'')
                        .ok_or_else(|| {
                            LexError(format!("unterminated ' quote in {:?}", self.text))
                        })?;
                    cur.extend(&chars[*i + 1..*i + 1 + end]);
                    *i += end + 2;
                }
                '"' if mode.quotes => {
                    started = true;
                    *i += 1;
                    self.double_quoted(i, &mut cur, done, depth)?;
                }
                '$' => {
                    let value = self.dollar(i, mode, depth)?;
                    if done + cur.len() + value.len() > MAX_EXPANDED {
                        return Err(too_long());
                    }
                    if !mode.split {
                        cur.push_str(&value);
                        continue;
                    }
                    // Field splitting of an unquoted expansion, as a shell does.
                    for v in value.chars() {
                        if !v.is_whitespace() {
                            cur.push(v);
                        } else if started || !cur.is_empty() {
                            done += cur.len();
                            words.push(std::mem::take(&mut cur));
                            started = false;
                        }
                    }
                }
                _ => {
                    cur.push(c);
                    *i += 1;
                }
            }
        }
        if stop.is_some() && !stopped {
            return Err(LexError(format!("missing '}}' in {:?}", self.text)));
        }
        if done + cur.len() > MAX_EXPANDED {
            return Err(too_long());
        }
        if started || !cur.is_empty() || !mode.split {
            words.push(cur);
        }
        Ok(words)
    }

    /// The inside of double quotes, from after the opening `"` to after the closing one:
    /// variables expanded, the escape character literal except before `"`, `$` and itself.
    fn double_quoted(
        &self,
        i: &mut usize,
        cur: &mut String,
        done: usize,
        depth: usize,
    ) -> Result<(), LexError> {
        loop {
            let Some(&d) = self.chars.get(*i) else {
                return Err(LexError(format!(
                    "unterminated \" quote in {:?}",
                    self.text
                )));
            };
            match d {
                '"' => {
                    *i += 1;
                    return Ok(());
                }
                '$' => {
                    let value = self.dollar(i, WORD, depth)?;
                    if done + cur.len() + value.len() > MAX_EXPANDED {
                        return Err(too_long());
                    }
                    cur.push_str(&value);
                }
                _ if d == self.escape => match self.chars.get(*i + 1) {
                    Some(&n) if n == '"' || n == '$' || n == self.escape => {
                        cur.push(n);
                        *i += 2;
                    }
                    _ => {
                        cur.push(d);
                        *i += 1;
                    }
                },
                _ => {
                    cur.push(d);
                    *i += 1;
                }
            }
        }
    }

    /// The name after `$` or `${` at `chars[j]`, as a shell reads it: digits (a positional
    /// parameter), one special parameter character (`$@`, `$?`, ...), or letters, digits and
    /// `_`. Positional and special parameters are never set in a Dockerfile.
    fn name(&self, j: usize) -> String {
        let rest = &self.chars[j..];
        match rest.first() {
            Some(c) if c.is_ascii_digit() => {
                rest.iter().take_while(|c| c.is_ascii_digit()).collect()
            }
            Some(&c) if "@*#?-$!".contains(c) => c.to_string(),
            _ => rest
                .iter()
                .take_while(|&&c| c.is_alphanumeric() || c == '_')
                .collect(),
        }
    }

    /// Expand the variable reference at `chars[*i]` (a `$`) and move past it.
    fn dollar(&self, i: &mut usize, mode: Mode, depth: usize) -> Result<String, LexError> {
        let chars = self.chars;
        if chars.get(*i + 1) != Some(&'{') {
            let name = self.name(*i + 1);
            *i += 1 + name.chars().count();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(self.vars.get(&name).unwrap_or("").to_string());
        }
        let missing = || LexError(format!("missing '}}' in {:?}", self.text));
        let bad = || LexError(format!("bad substitution in {:?}", self.text));
        let mut j = *i + 2;
        match chars.get(j) {
            None => return Err(missing()),
            Some('{' | '}' | ':') => return Err(bad()),
            Some(_) => {}
        }
        let name = self.name(j);
        if name.is_empty() {
            return Err(bad());
        }
        j += name.chars().count();
        let value = self.vars.get(&name);
        let Some(&op) = chars.get(j) else {
            return Err(missing());
        };
        j += 1;
        if op == '}' {
            *i = j;
            return Ok(value.unwrap_or("").to_string());
        }
        // `:` makes an empty value count as unset.
        let (colon, op) = match op {
            ':' => match chars.get(j) {
                Some(&o) => {
                    j += 1;
                    (true, o)
                }
                None => return Err(missing()),
            },
            o => (false, o),
        };
        if !matches!(op, '-' | '+' | '?') {
            let modifier = if colon {
                format!(":{op}")
            } else {
                op.to_string()
            };
            return Err(LexError(format!(
                "unsupported modifier {modifier:?} in ${{{name}{modifier}...}} of {:?}",
                self.text
            )));
        }
        let word_mode = Mode {
            split: false,
            quotes: mode.quotes,
        };
        let word = self
            .words(&mut j, Some('}'), word_mode, depth + 1)?
            .into_iter()
            .next()
            .unwrap_or_default();
        *i = j;
        let set = value.filter(|v| !(colon && v.is_empty()));
        Ok(match (op, set) {
            ('-', Some(v)) => v.to_string(),
            ('-', None) => word,
            ('+', Some(_)) => word,
            ('+', None) => String::new(),
            (_, Some(v)) => v.to_string(),
            (_, None) => {
                let message = match (word.is_empty(), value.is_some()) {
                    (false, _) => word,
                    (true, false) => "is not allowed to be unset".to_string(),
                    (true, true) => "is not allowed to be empty".to_string(),
                };
                return Err(LexError(format!("{name}: {message}")));
            }
        })
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
        assert_eq!(word("cost $5"), "cost ");
        assert_eq!(word("${A:?}"), "avocado");
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
