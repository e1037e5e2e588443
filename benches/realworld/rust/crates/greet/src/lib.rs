//! Greetings.

/// Greet `name`.
pub fn hello(name: &str) -> String {
    format!("hello, {name}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn greets() {
        assert_eq!(super::hello("x"), "hello, x");
    }
}
