# greet 1.2.0: a greeting.
greet() {
    echo "Hello, $1!"
}
