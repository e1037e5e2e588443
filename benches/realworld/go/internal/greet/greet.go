// Package greet says hello.
package greet

// Version of the service.
const Version = "1.0.0"

// Hello greets name, or the world.
func Hello(name string) string {
	if name == "" {
		name = "world"
	}
	return "hello, " + name
}
