// The pod sandbox ("pause") program of the test node: holds the pod's namespaces and sleeps until
// SIGTERM or SIGINT. Built static by src/testenv/node.rs and packed into an image FROM scratch,
// so the node needs no image from a public registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	// As PID 1 of its PID namespace the process gets no default signal handling: ask for it.
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
