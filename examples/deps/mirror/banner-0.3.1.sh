# banner 0.3.1: frames a line of text.
banner() {
    line=$(printf '%s' "$1" | sed 's/./=/g')
    printf '%s\n%s\n%s\n' "$line" "$1" "$line"
}
