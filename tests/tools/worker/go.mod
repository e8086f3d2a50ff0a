// The worker image's program (tests/tools/worker): a stand-in for the GhostHands API and worker
// that runs inside a real container on the test Docker engine. No dependencies.
module sandbox-operator/tools/worker

go 1.26.0
