use std::collections::BTreeMap;

fn main() {
    let mut counts = BTreeMap::new();
    for word in greet::hello("workspace").split_whitespace() {
        *counts.entry(word.len()).or_insert(0u32) += 1;
    }
    println!("{} {:?}", greet::hello("workspace"), counts);
}
