# greet 1.3.0: a friendlier greeting.
greet() {
    echo "Hello, $1, nice to see you!"
}
