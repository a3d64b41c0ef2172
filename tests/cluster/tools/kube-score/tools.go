//go:build tools

// Package tools pins kube-score, the static checks a platform team runs on the
// chart's rendered manifests and on a Job built by the operator.
package tools

import _ "github.com/zegl/kube-score/cmd/kube-score"
