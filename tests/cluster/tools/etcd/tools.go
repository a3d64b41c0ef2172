//go:build tools

// Package tools pins the etcd server that the test harness builds: the same
// minor as Kubernetes' own hack/lib/etcd.sh uses for its integration tests.
package tools

import _ "go.etcd.io/etcd/server/v3"
