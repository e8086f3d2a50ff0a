// Command gh-worker plays the GhostHands API and worker inside a container of the test engine's
// worker image, so the agent's deploys and env pushes are proven on a real engine:
//
//	GET  /health          (API port) 200 {"status":"ok",...}, or 503 when GH_WORKER_UNHEALTHY=1
//	GET  /worker/status   (worker port) {"active_jobs":N,"deploy_safe":bool,"draining":bool}
//	POST /worker/drain    (worker port) stop taking jobs; deploy_safe once no job is active
//	POST /test/jobs?n=N   (worker port) set the number of active jobs (for tests)
//	GET  /test/env        (both ports) the environment this process was started with, as JSON
//
// Settings (environment): GH_API_PORT (3100), GH_WORKER_PORT (3101), GH_ROLE (api, worker or
// both; default both; the first argument, when given, wins: the container's command picks the
// role, as the GhostHands image's CMD does), GH_WORKER_UNHEALTHY, GH_IGNORE_DRAIN (drain is
// acknowledged but the jobs keep running: a worker that ignores drain), GH_JOBS (active jobs at
// start), GH_IGNORE_SIGTERM (SIGTERM is ignored: only the engine's SIGKILL after the stop grace
// ends it), GH_STATUS_FAIL (the worker's status answers 503: a worker that does not come up).
package main

import (
	"encoding/json"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type state struct {
	mu       sync.Mutex
	jobs     int
	draining bool
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func envMap() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func main() {
	st := &state{}
	if n, err := strconv.Atoi(os.Getenv("GH_JOBS")); err == nil {
		st.jobs = n
	}
	role := os.Getenv("GH_ROLE")
	if len(os.Args) > 1 {
		role = os.Args[1]
	}
	if role == "" {
		role = "both"
	}
	started := time.Now().UTC()
	unhealthy := os.Getenv("GH_WORKER_UNHEALTHY") == "1"
	ignoreDrain := os.Getenv("GH_IGNORE_DRAIN") == "1"

	api := http.NewServeMux()
	api.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		body := map[string]any{
			"status":    "ok",
			"image_tag": os.Getenv("GH_IMAGE_TAG"),
			"started":   started.Format(time.RFC3339),
			"hostname":  os.Getenv("HOSTNAME"),
		}
		if unhealthy {
			body["status"] = "unhealthy"
			writeJSON(w, http.StatusServiceUnavailable, body)
			return
		}
		writeJSON(w, http.StatusOK, body)
	})
	api.HandleFunc("/test/env", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, envMap())
	})

	worker := http.NewServeMux()
	statusFail := os.Getenv("GH_STATUS_FAIL") == "1"
	worker.HandleFunc("/worker/status", func(w http.ResponseWriter, r *http.Request) {
		if statusFail {
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"error": "not ready"})
			return
		}
		st.mu.Lock()
		defer st.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{
			"active_jobs": st.jobs,
			"deploy_safe": st.jobs == 0,
			"draining":    st.draining,
		})
	})
	worker.HandleFunc("/worker/drain", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			writeJSON(w, http.StatusMethodNotAllowed, map[string]any{"error": "POST only"})
			return
		}
		st.mu.Lock()
		defer st.mu.Unlock()
		st.draining = true
		if !ignoreDrain {
			// A drained worker finishes its jobs; this stand-in finishes them at once.
			st.jobs = 0
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"success":     true,
			"deploy_safe": st.jobs == 0,
			"active_jobs": st.jobs,
		})
	})
	worker.HandleFunc("/test/jobs", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("n"))
		if r.Method != http.MethodPost || err != nil || n < 0 {
			writeJSON(w, http.StatusBadRequest, map[string]any{"error": "POST /test/jobs?n=N"})
			return
		}
		st.mu.Lock()
		st.jobs = n
		st.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{"active_jobs": n})
	})
	worker.HandleFunc("/test/env", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, envMap())
	})

	port := func(name, def string) string {
		if p := os.Getenv(name); p != "" {
			return p
		}
		return def
	}
	serve := func(addr string, h http.Handler) {
		go func() {
			if err := http.ListenAndServe(addr, h); err != nil {
				log.Fatalf("listening on %s: %v", addr, err)
			}
		}()
	}
	if role == "api" || role == "both" {
		serve("127.0.0.1:"+port("GH_API_PORT", "3100"), api)
	}
	if role == "worker" || role == "both" {
		serve("127.0.0.1:"+port("GH_WORKER_PORT", "3101"), worker)
	}
	log.Printf("gh-worker started: role=%s tag=%s unhealthy=%v", role, os.Getenv("GH_IMAGE_TAG"), unhealthy)
	sig := make(chan os.Signal, 1)
	if os.Getenv("GH_IGNORE_SIGTERM") == "1" {
		signal.Ignore(syscall.SIGTERM)
		signal.Notify(sig, syscall.SIGINT)
	} else {
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	}
	<-sig
	log.Printf("gh-worker stopping")
}
