package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"

	"example.com/svc/internal/greet"
)

func main() {
	addr := flag.String("addr", ":8080", "listen address")
	version := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *version {
		fmt.Println("svc", greet.Version)
		return
	}
	http.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"message": greet.Hello(r.URL.Query().Get("name"))})
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}
